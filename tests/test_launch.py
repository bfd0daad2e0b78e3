"""``ilseg launch``: N processes of one job on this machine, and one line when one of them fails."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

import processes
from tiny import TINY as TINY_RUN
from ilseg.cli import main
from ilseg.data.synth import generate_synth
from ilseg.engine import launch as launch_module
from ilseg.engine.launch import _job_status, rank_environment

TINY = [*TINY_RUN, "optim.batch_size=8", "optim.epochs=1", "runtime.backend=gloo",
        "runtime.collective_timeout_s=20"]

# A method that sends its own process SIGNAL on rank 1 at its third batch: SIGKILL, a rank dying mid-step;
# SIGSTOP, a rank that freezes (a hung file system, a GPU fault) without a message or an exit.
DYING_METHOD = textwrap.dedent('''
    import dataclasses, os, signal
    from ilseg.methods import MethodConfig, register_method
    from ilseg.methods.finetune import Finetune

    @dataclasses.dataclass(frozen=True)
    class DieConfig(MethodConfig):
        pass

    class Die(Finetune):
        config_class = DieConfig
        batches = 0

        def loss(self, student, teacher, target, step):
            self.batches += 1
            if os.environ.get("RANK") == "1" and self.batches == 3:
                os.kill(os.getpid(), signal.SIGNAL)
            return super().loss(student, teacher, target, step)

    register_method("die", Die, {"die-on-rank-1": DieConfig(name="die-on-rank-1")})
''')


def test_each_process_gets_the_environment_torchrun_would_give_it():
    env = rank_environment(1, 4, 29511)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "1", "1", "4", "127.0.0.1", "29511")


def test_the_job_status_is_the_reporting_process_s_or_a_line_for_a_killed_one(capsys):
    assert _job_status([0, 0], None, []) == 0
    assert _job_status([2, -9], 1, []) == 2  # rank 0 said why (its line is the user's last): nothing added
    assert capsys.readouterr().err == ""
    assert _job_status([-15, -9], 1, []) == 128 + 9
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "process 1 of 2 was killed by SIGKILL" in err
    assert _job_status([-2, -2], 0, [signal.SIGINT]) == 130 and capsys.readouterr().err == ""  # the user's Ctrl-C


def test_launch_runs_only_train_or_eval(capsys):
    assert main(["launch", "--nproc", "2", "report", "runs/x"]) == 2
    assert "ilseg launch runs train or eval" in capsys.readouterr().err


@pytest.mark.slow
def test_a_rank_killed_mid_step_ends_the_job_with_one_line_and_a_resumable_run(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    (tmp_path / "dying.py").write_text(DYING_METHOD.replace("SIGNAL", "SIGKILL"))
    run = tmp_path / "run"
    args = ["--methods-from", "dying", "launch", "--nproc", "2", "train", "--config", "synth-demo", "--out", str(run),
            "--quiet", "--set", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *TINY,
            "method.name=die-on-rank-1"]
    proc = processes.run([sys.executable, "-m", "ilseg", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert lines and lines[-1].startswith("ilseg"), proc.stderr
    assert len(lines) <= 2 and "Traceback" not in proc.stderr and "torch.distributed" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_two_launched_processes_train_a_run(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    run = tmp_path / "run"
    proc = processes.run([sys.executable, "-m", "ilseg", "launch", "--nproc", "2", "train", "--config", "synth-demo",
                           "--out", str(run), "--quiet", "--steps", "0:2", "--set", f"data.root={root}",
                           f"data.cache_dir={tmp_path / 'cache'}", *TINY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (run / "step1.pth").is_file() and "device cpu x2" in (run / "train.log").read_text()


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_soon_after_the_collective_timeout(tmp_path: Path):
    """torchrun waits 30 s more before it kills a stopped process; the launcher stops it at once."""
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    (tmp_path / "dying.py").write_text(DYING_METHOD.replace("SIGNAL", "SIGSTOP"))
    args = ["--methods-from", "dying", "launch", "--nproc", "2", "train", "--config", "synth-demo", "--out",
            str(tmp_path / "run"), "--quiet", "--set", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
            *TINY, "runtime.collective_timeout_s=5", "method.name=die-on-rank-1"]
    started = time.monotonic()
    proc = processes.run([sys.executable, "-m", "ilseg", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    seconds = time.monotonic() - started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0
    assert lines and lines[-1].startswith("ilseg: error: another process of this job stopped"), proc.stderr
    assert seconds < 5 + launch_module.GRACE_S + 15, seconds  # the timeout, the grace, start-up: not 30 s more
