"""Killed, stopped or diverged runs continue to exactly what an uninterrupted run gives.

The kills are real: a child process running ``ilseg train`` SIGKILLs itself at
a chosen point (no ``finally`` runs, the lock and half-written files stay
behind), then ``ilseg train --resume`` finishes the run, and every step's
weights and scores are compared with those of an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import InterruptAt, tiny_sets

import processes
import ilseg
from ilseg.cli import main
from ilseg.engine import run as run_mod

# The tiny run with two epochs at every step (the fault points below count on step 1 having two).
TWO_EPOCHS_ILT = ["optim.epochs_next=2", "method.name=ilt"]

# Runs ``ilseg train ARGS`` after arranging for this process to die (SIGKILL) or
# be asked to stop (SIGTERM) at the point named by ILSEG_TEST_FAULT.
_FAULTY_TRAIN = textwrap.dedent('''
    import os, signal, sys
    import torch
    from ilseg.cli import main
    from ilseg.engine import step as step_mod
    from ilseg.methods import Method

    fault = os.environ["ILSEG_TEST_FAULT"]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    calls = {"batch": 0, "save": 0}
    real_call, real_save = Method.__call__, torch.save
    real_eval, real_record, real_initial = step_mod.evaluate_step, step_mod.record_step, step_mod.initial_model

    def method_call(self, student, teacher, target, step):
        if step == 1:
            calls["batch"] += 1
            if fault == "mid-epoch" and calls["batch"] == 5:  # step 1, epoch 2, iteration 2 of 3
                die()
            if fault == "sigterm" and calls["batch"] == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this iteration, saves, stops
        return real_call(self, student, teacher, target, step)

    def save(obj, f, *args, **kwargs):
        of_step1 = isinstance(obj, dict) and obj.get("step") == 1
        final = of_step1 and "metrics" in obj  # step1.pth, else last.pth
        if (fault == "epoch-checkpoint-write" and of_step1 and not final) or (
                fault == "step-checkpoint-write" and final):
            f.write(b"half a checkpoint")
            f.flush()
            die()
        return real_save(obj, f, *args, **kwargs)

    def evaluate(cfg, task, train_task, model, step, *args):
        if fault == "evaluation" and step == 1:
            die()
        return real_eval(cfg, task, train_task, model, step, *args)

    def record(ctx, entry):
        if fault == "after-step-checkpoint" and entry["step"] == 1:
            die()  # step1.pth is in place, the results do not have step 1 yet
        return real_record(ctx, entry)

    def initial(ctx, step):
        if fault == "between-steps" and step == 2:
            die()
        return real_initial(ctx, step)

    Method.__call__ = method_call
    torch.save = save
    step_mod.evaluate_step, step_mod.record_step, step_mod.initial_model = evaluate, record, initial
    raise SystemExit(main(sys.argv[1:]))
''')


def _train_args(root: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "synth-demo", "--quiet",
            "--set", *tiny_sets(root, *TWO_EPOCHS_ILT, *extra, cache_dir=cache), "--out", str(out)]


def _child(args: list[str], fault: str, script: Path) -> subprocess.CompletedProcess:
    src = str(Path(ilseg.__file__).resolve().parents[1])
    env = dict(os.environ, ILSEG_TEST_FAULT=fault, PYTHONPATH=src)
    return processes.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "faulty_train.py"
    path.write_text(_FAULTY_TRAIN)
    return path


@pytest.fixture(scope="module")
def reference(synth_root, script, tmp_path_factory) -> Path:
    """An uninterrupted run, in a child process like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = _child(_train_args(synth_root, out.parent / "cache", out), "none", script)
    assert done.returncode == 0, done.stderr
    # the fault points above count on step 1 having 3 iterations per epoch
    assert "2 epochs x 3 iterations" in next(line for line in (out / "train.log").read_text().splitlines()
                                             if "step 1: classes" in line)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _same_run(a: Path, b: Path) -> None:
    for step in (0, 1, 2):
        wa, wb = _weights(a / f"step{step}.pth"), _weights(b / f"step{step}.pth")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (b.name, step)
    ra, rb = (json.loads((run / "results.json").read_text()) for run in (a, b))
    scores = lambda r: [{k: v for k, v in s.items() if k != "train_seconds"} for s in r["steps"]]
    assert scores(rb) == scores(ra)
    assert rb["mean_miou_over_steps"] == ra["mean_miou_over_steps"]


@pytest.mark.parametrize("fault", ["mid-epoch", "epoch-checkpoint-write", "evaluation", "step-checkpoint-write",
                                   "after-step-checkpoint", "between-steps"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(fault, synth_root, script, reference, tmp_path):
    out = tmp_path / "run"
    killed = _child(_train_args(synth_root, tmp_path / "cache", out), fault, script)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / ".lock").is_file()  # the dead process could not release it
    if fault == "epoch-checkpoint-write":
        assert list(out.glob(".ilseg-tmp-last.pth.*.tmp"))  # the half-written file it left
    if fault == "step-checkpoint-write":
        assert list(out.glob(".ilseg-tmp-step1.pth.*.tmp")) and not (out / "step1.pth").exists()
    if fault == "after-step-checkpoint":
        assert (out / "step1.pth").is_file()
        assert [s["step"] for s in json.loads((out / "results.json").read_text())["steps"]] == [0]
    resumed = _child(["train", "--resume", str(out), "--quiet"], "none", script)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(reference, out)
    assert not (out / ".lock").exists()
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".copy"))]
    trained = (out / "train.log").read_text()
    if fault in ("evaluation", "step-checkpoint-write", "after-step-checkpoint"):  # step 1 is not trained twice
        assert trained.count("step 1 epoch 2/2") == 1


def test_sigterm_stops_at_the_next_iteration_and_resumes_there(synth_root, script, reference, tmp_path):
    out = tmp_path / "run"
    stopped = _child(_train_args(synth_root, tmp_path / "cache", out), "sigterm", script)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("ilseg:")]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "Traceback" not in stopped.stderr
    assert f"ilseg train --resume {out.resolve()}" in lines[0]
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["step"] == 1 and last["partial"]["epoch"] == 1 and last["partial"]["iterations"] == 2
    assert not (out / ".lock").exists()  # a clean stop releases the lock
    command = lines[0].split("Continue with: ", 1)[1]
    resumed = _child(shlex.split(command)[1:] + ["--quiet"], "none", script)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(reference, out)
    # the interrupted epoch's logged means are those of the whole epoch
    means = lambda run: [(e["step"], e["epoch"], e["train/loss"])
                         for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                         if "train/loss" in e]
    assert means(out) == means(reference)


def test_following_the_non_finite_loss_advice_finishes_the_run(synth_root, tmp_path, capsys):
    """A learning rate of 1e6 from step 1 on: each error's advice, followed as a user would, ends in a finished run.

    Two kinds of advice: the loss diverged within a step (resume, that step
    again, lr / 10), or on a later step's first batch, when the step before
    ended with a diverged model (a new run from this run's step 0, lr / 10).
    """
    run = tmp_path / "run"
    args = _train_args(synth_root, tmp_path / "cache", run, "method.name=finetune", "optim.lr_next=1e6",
                       "optim.epochs_next=1")
    code, kinds = main(args), []
    for _ in range(16):
        err = capsys.readouterr().err
        if code == 0:
            break
        assert code == 2 and "non-finite" in err and "Traceback" not in err
        if "first batch, before any update" in err:
            advice = err.strip().split("with a lower learning rate: ", 1)[1]
            argv = shlex.split(advice)
            assert argv[:4] == ["ilseg", "train", "--config", str(run.resolve() / "config.yaml")]
            assert argv[4:6] == ["--init-from", str(run.resolve())]
            run = Path(argv[7])
            kinds.append("init-from")
        else:
            advice = err.strip().split("keeping the finished steps: ", 1)[1]
            argv = shlex.split(advice)
            assert argv[:3] == ["ilseg", "train", "--resume"] and argv[3] == str(run.resolve())
            kinds.append("resume")
        lr = float(argv[-1].split("=", 1)[1])
        code = main(argv[1:] + ["--quiet", "--set", f"data.cache_dir={tmp_path / 'cache'}"] if kinds[-1] == "init-from"
                    else argv[1:] + ["--quiet"])
    assert code == 0 and lr < 1e6
    results = json.loads((run / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    assert all(math.isfinite(s["miou_all"]) for s in results["steps"])
    if kinds[-1] == "resume":  # the last advice resumed: the run's history names the change
        history = json.loads((run / "config-history.json").read_text())
        assert history[-1]["changed"] == ["optim.lr_next"] and history[-1]["config"]["optim"]["lr_next"] == lr
    # the finished steps still load and evaluate under the settings they were trained with
    assert main(["eval", "--run", str(run), "--step", "0", "--json"]) == 0
    assert main(["eval", "--run", str(run), "--step", "2", "--json"]) == 0


def test_changed_optimisation_restarts_the_unfinished_step_and_a_moved_dataset_does_not(synth_root, tmp_path,
                                                                                         monkeypatch, capsys):
    out = tmp_path / "run"
    # Ctrl-C before step 1's second epoch (the command line takes no callbacks: they are given to the run it starts)
    with monkeypatch.context() as patch:
        patch.setattr(run_mod, "run_training",
                      functools.partial(run_mod.run_training, callbacks=InterruptAt(step=1, epoch=1)))
        assert main(_train_args(synth_root, tmp_path / "cache", out)) == 130
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 1  # step 1's first epoch is saved
    capsys.readouterr()

    assert main(["train", "--resume", str(out), "--set", "optim.lr_next=0.0001", "--quiet"]) == 0
    log = (out / "train.log").read_text()
    assert "settings changed from step 1 on" in log
    assert log.count("step 1 epoch 1/2") == 2  # step 1 started again with the new learning rate
    history = json.loads((out / "config-history.json").read_text())
    assert [e["from_step"] for e in history] == [0, 1]
    assert [e["config"]["optim"]["lr_next"] for e in history] == [0.001, 0.0001]  # the preset's, then the new
    assert torch.load(out / "step1.pth", weights_only=True)["identity"]["optim.lr_next"] == 0.0001

    moved = tmp_path / "moved-data"
    moved.symlink_to(synth_root, target_is_directory=True)
    assert main(["train", "--resume", str(out), "--set", f"data.root={moved}", "--quiet"]) == 0
    history = json.loads((out / "config-history.json").read_text())
    assert [e["from_step"] for e in history] == [0, 1]  # no new era: where the data is changes no step
    assert all(e["config"]["data"]["root"] == str(moved) for e in history)
    assert "step 2 already complete" in (out / "train.log").read_text()
    assert main(["eval", "--run", str(out), "--step", "0", "--json"]) == 0  # step 0: old lr, new root


def test_a_step_trained_before_an_optimisation_change_evaluates_with_the_runs_config(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(synth_root, tmp_path / "cache", out, "--steps", "0:2")) == 0
    assert main(["train", "--resume", str(out), "--set", "optim.lr_next=0.0002", "--quiet"]) == 0
    capsys.readouterr()
    # step 1 was trained with lr_next 0.001, config.yaml now says 0.0002: how it was optimised does not matter here
    config = str(out / "config.yaml")
    assert main(["eval", "--checkpoint", str(out / "step1.pth"), "--config", config, "--json"]) == 0
    # what the model is still has to match
    assert main(["eval", "--checkpoint", str(out / "step1.pth"), "--config", config,
                 "--set", "model.head_channels=16"]) == 2
    assert "model.head_channels: checkpoint has 8, this run has 16" in capsys.readouterr().err
