"""Signals sent to a whole process group (Ctrl-C in a terminal, ``kill -TERM -- -PGID`` as SLURM ends a job
step) stop ilseg with its own line, not a worker's death: worker processes leave them to the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import processes
from tiny import TINY as TINY_RUN
from ilseg.data.parallel import leave_signals_to_parent
from ilseg.data.synth import generate_synth
from ilseg.engine.signals import StopRequests

TINY = [*TINY_RUN, "optim.epochs=50"]  # long enough to be signalled mid-run


def test_a_worker_ignores_the_signals_its_parent_handles():
    script = ("import signal; from ilseg.data.parallel import leave_signals_to_parent; leave_signals_to_parent(0); "
              "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is "
              "signal.SIG_IGN)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
    assert callable(leave_signals_to_parent)


def test_a_second_ctrl_c_interrupts_a_stuck_iteration_but_not_the_saving_that_follows_a_stop():
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a program; pytest may have its own
    with StopRequests() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signal_number == signal.SIGINT and not stop.stopping
        with pytest.raises(KeyboardInterrupt):  # the loop has not seen the first one yet: stop now
            signal.raise_signal(signal.SIGINT)
        assert stop.requested() and stop.stopping
        signal.raise_signal(signal.SIGINT)  # saving and leaving: ignored
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal_number == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture
def start():
    """``start(args)``: ``python -m ilseg ARGS`` in a process group of its own, killed whole at the test's end."""
    started: list[subprocess.Popen[str]] = []

    def _start(args: list[str], *, before: str = "") -> subprocess.Popen[str]:
        """``before``: Python run first (to slow a function down, say), then the command line."""
        # Ctrl-C as an interactive terminal delivers it: a job started in the background by a non-interactive
        # shell (how some CI runners start their steps) inherits SIGINT ignored, as POSIX asks of background jobs.
        code = (f"import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n{before}\n"
                "from ilseg.cli import run_command_line\nrun_command_line()")
        started.append(subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True))
        return started[-1]

    yield _start
    for proc in started:
        processes.kill_tree(proc.pid)
        proc.communicate()


def _wait_for(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def _training_with_loader_workers(tmp_path: Path, start) -> subprocess.Popen[str]:
    """``ilseg train`` of the tiny run with 2 loader workers, returned once an epoch or more has trained."""
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    run = tmp_path / "run"
    proc = start(["train", "--config", "synth-demo", "--out", str(run), "--quiet", "--set", f"data.root={root}",
                  f"data.cache_dir={tmp_path / 'cache'}", *TINY, "data.workers=2"])
    _wait_for(lambda: (run / "last.pth").is_file() or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    return proc


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_stops_and_saves(tmp_path: Path, start):
    proc = _training_with_loader_workers(tmp_path, start)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], err
    assert "DataLoader worker" not in err and "Traceback" not in err


# Each chunk of masks takes a second more to read, so that the signal surely comes while the pool is at work.
SLOW_MASK_CHUNKS = """
import time
from ilseg.data import splits
read = splits._mask_values_chunk
def slow(*args, **kwargs):
    time.sleep(1)
    return read(*args, **kwargs)
splits._mask_values_chunk = slow
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the pool's workers through /proc")
def test_ctrl_c_to_the_process_group_while_masks_are_indexed_is_one_line(tmp_path: Path, start):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=600, size=32, workers=2)
    proc = start(["splits", "--dataset", "synth", "--root", str(root), "--task", "6-2-2", "--workers", "2",
                  "--cache-dir", str(tmp_path / "cache")], before=SLOW_MASK_CHUNKS)
    _wait_for(lambda: len(processes.descendants(proc.pid)) >= 2 or proc.poll() is not None)  # the pool's workers are reading
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("ilseg: interrupted"), err


@pytest.mark.slow
def test_two_ctrl_c_to_the_process_group_50_ms_apart_end_without_a_worker_traceback(tmp_path: Path, start):
    proc = _training_with_loader_workers(tmp_path, start)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "__del__" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("ilseg: "), err
