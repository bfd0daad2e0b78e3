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

from ilseg.data.parallel import leave_signals_to_parent
from ilseg.data.synth import generate_synth

TINY = ["model.width=8", "model.head_channels=8", "model.output_stride=16", "optim.batch_size=4",
        "optim.epochs=50", "optim.epochs_next=1", "data.crop_size=32", "eval.batch_size=16"]


def test_a_worker_ignores_the_signals_its_parent_handles():
    script = ("import signal; from ilseg.data.parallel import leave_signals_to_parent; leave_signals_to_parent(0); "
              "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is "
              "signal.SIG_IGN)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
    assert callable(leave_signals_to_parent)


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ilseg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_stops_and_saves(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    run = tmp_path / "run"
    proc = _start(["train", "--config", "synth-demo", "--out", str(run), "--quiet", "--set", f"data.root={root}",
                   f"data.cache_dir={tmp_path / 'cache'}", "data.workers=2", *TINY])
    _wait_for(lambda: (run / "last.pth").is_file() or proc.poll() is not None)  # an epoch or more has trained
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], err
    assert "DataLoader worker" not in err and "Traceback" not in err


def _children(pid: int) -> int:
    """How many processes have ``pid`` as parent (Linux's /proc)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        count += fields[1] == str(pid)
    return count


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the pool's workers through /proc")
def test_ctrl_c_to_the_process_group_while_masks_are_indexed_is_one_line(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=3000, size=32, workers=2)
    proc = _start(["splits", "--dataset", "synth", "--root", str(root), "--task", "6-2-2", "--workers", "2",
                   "--cache-dir", str(tmp_path / "cache")])
    _wait_for(lambda: _children(proc.pid) >= 2 or proc.poll() is not None)  # the pool's workers are reading
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the masks were all read before the signal came (a fast machine)")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("ilseg: interrupted"), err


@pytest.mark.slow
def test_two_ctrl_c_to_the_process_group_50_ms_apart_end_without_a_worker_traceback(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    run = tmp_path / "run"
    proc = _start(["train", "--config", "synth-demo", "--out", str(run), "--quiet", "--set", f"data.root={root}",
                   f"data.cache_dir={tmp_path / 'cache'}", "data.workers=2", *TINY])
    _wait_for(lambda: (run / "last.pth").is_file() or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "__del__" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("ilseg: "), err
