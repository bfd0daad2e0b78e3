"""The demo: its plan, its side-by-side runner, and the command end to end (quick mode; slow)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from ilseg.cli import main
from ilseg.demo import DEMO_METHODS
from ilseg.errors import IlsegError, Interrupted


@pytest.mark.slow
def test_demo_quick_runs_every_method_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "comparison-quick.md").read_text()
    for name in DEMO_METHODS:
        assert f"| {name} |" in table and f"| {name} |" in out
        results = json.loads((tmp_path / "runs-quick" / name / "results.json").read_text())
        assert results["method"] == name
        assert results["steps"][-1]["classes_seen"] == 11
    # every incremental method reused the fine-tuning run's step-0 model
    ilt = json.loads((tmp_path / "runs-quick" / "ilt" / "results.json").read_text())
    assert ilt["steps"][0]["adopted_from"].endswith("finetune/step0.pth")
    assert (tmp_path / "data" / "synth" / "ilseg_synth.json").is_file()
    # the demo ends with the report of its runs
    assert "report-quick/report.html" in out
    report = json.loads((tmp_path / "report-quick" / "report.json").read_text())
    assert [g["label"] for g in report["groups"]] == list(DEMO_METHODS)
    assert (tmp_path / "report-quick" / "miou_by_step.png").is_file()
    # a second run, in this process, reuses the data and the finished runs instead of training again
    assert main(["demo", "--quick", "--quiet", "--processes", "1", "--out", str(tmp_path)]) == 0
    assert "already complete" in (tmp_path / "runs-quick" / "ilt" / "train.log").read_text()


# -- the demo's plan and its side-by-side runner (no training: train_job is replaced) --------------
def _plan(methods):
    from ilseg.demo import demo_config, plan_jobs

    return plan_jobs(demo_config(Path("data"), quick=True), methods, Path("runs"), quick=True)


def test_plan_trains_step0_once_and_starts_the_sharing_methods_from_it():
    jobs = _plan(DEMO_METHODS)
    assert [(j.key, j.after, j.init_from) for j in jobs] == [
        ("finetune (step 0)", None, None),
        ("finetune", "finetune (step 0)", None),
        ("ilt", "finetune (step 0)", Path("runs/finetune")),
        ("ilt-kd-out", "finetune (step 0)", Path("runs/finetune")),
        ("joint", None, None),
    ]
    assert jobs[0].steps == "0" and jobs[1].steps is None
    assert next(j for j in jobs if j.method == "joint").cfg.optim.epochs == 1  # quick: one epoch for all


def test_plan_without_finetune_shares_the_first_sharing_methods_step0_and_mib_trains_its_own():
    jobs = _plan(["mib", "ilt-kd-out", "ilt"])
    assert [(j.key, j.after) for j in jobs] == [
        ("mib", None), ("ilt-kd-out (step 0)", None), ("ilt-kd-out", "ilt-kd-out (step 0)"),
        ("ilt", "ilt-kd-out (step 0)")]
    assert [(j.key, j.after) for j in _plan(["ilt", "mib"])] == [("ilt", None), ("mib", None)]


def _fake_results(job):
    return {"steps": [{"step": 0, "miou_all": 0.5, "miou_old": 0.5, "miou_new": None}], "method": job.method}


def test_side_by_side_runs_jobs_after_what_they_wait_for(tmp_path, monkeypatch, capsys):
    import ilseg.demo as demo

    order = tmp_path / "order.txt"

    def fake_train(job, *, quiet):
        assert quiet and torch.get_num_threads() == 1
        with order.open("a") as f:
            f.write(f"start {job.key}\n")
        if job.steps == "0":  # finish only once joint has started: both must be running at once
            deadline = time.monotonic() + 30
            while "start joint" not in order.read_text() and time.monotonic() < deadline:
                time.sleep(0.01)
        with order.open("a") as f:
            f.write(f"end {job.key}\n")
        return _fake_results(job)

    monkeypatch.setattr(demo, "train_job", fake_train)
    results = demo.run_side_by_side(_plan(DEMO_METHODS), 4, time.perf_counter())
    assert set(results) == set(DEMO_METHODS)
    lines = order.read_text().splitlines()
    step0_end = lines.index("end finetune (step 0)")
    for key in ("finetune", "ilt", "ilt-kd-out"):
        assert lines.index(f"start {key}") > step0_end
    assert lines.index("start joint") < step0_end  # joint waits for nothing
    out = capsys.readouterr().out
    assert "started finetune (step 0), joint" in out and "ilt: step 0 mIoU all 50.0" in out


def test_side_by_side_failure_skips_its_dependants_and_names_the_job_and_its_log(tmp_path, monkeypatch):
    import ilseg.demo as demo

    def fake_train(job, *, quiet):
        if job.key == "finetune (step 0)":
            raise IlsegError("loss is NaN at iteration 3")
        (tmp_path / job.method).write_text("ran")
        return _fake_results(job)

    monkeypatch.setattr(demo, "train_job", fake_train)
    with pytest.raises(IlsegError, match=r"finetune \(step 0\): loss is NaN at iteration 3 \(log: runs/finetune/"
                                         r"train.log\)"):
        demo.run_side_by_side(_plan(DEMO_METHODS), 4, time.perf_counter())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joint"]  # the others waited for step 0


def test_side_by_side_stop_request_in_a_worker_stops_the_demo_resumably(monkeypatch):
    import ilseg.demo as demo

    def fake_train(job, *, quiet):
        if job.method == "joint":
            raise Interrupted("stopped by SIGTERM in step 0", int(signal.SIGTERM))
        return _fake_results(job)

    monkeypatch.setattr(demo, "train_job", fake_train)
    with pytest.raises(Interrupted, match="run the same command again to continue") as info:
        demo.run_side_by_side(_plan(DEMO_METHODS), 4, time.perf_counter())
    assert info.value.signal_number == signal.SIGTERM


def test_a_worker_that_dies_is_reported_not_a_traceback(monkeypatch):
    import ilseg.demo as demo

    def fake_train(job, *, quiet):
        if job.method == "joint":
            os._exit(9)  # as if killed by the out-of-memory killer
        return _fake_results(job)

    monkeypatch.setattr(demo, "train_job", fake_train)
    with pytest.raises(IlsegError, match=r"the demo could not finish: .*joint: BrokenProcessPool"):
        demo.run_side_by_side(_plan(DEMO_METHODS), 4, time.perf_counter())


def test_jobs_that_a_broken_pool_cannot_start_are_named(monkeypatch):
    """A worker died between two submissions: the jobs ready after it are reported as not started."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import ilseg.demo as demo

    class BreaksAfterTwo(ProcessPoolExecutor):
        submitted = 0

        def submit(self, fn, /, *args, **kwargs):
            BreaksAfterTwo.submitted += 1
            if BreaksAfterTwo.submitted > 2:  # finetune (step 0) and joint went in; the pool broke since
                raise BrokenProcessPool("A child process terminated abruptly")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(demo, "train_job", lambda job, *, quiet: _fake_results(job))
    monkeypatch.setattr(demo, "ProcessPoolExecutor", BreaksAfterTwo)
    with pytest.raises(IlsegError) as error:
        demo.run_side_by_side(_plan(DEMO_METHODS), 4, time.perf_counter())
    for method in ("finetune", "ilt", "ilt-kd-out"):
        assert f"{method}: not started, a worker process of the demo died" in str(error.value)


def test_demo_refuses_zero_processes(tmp_path, capsys):
    assert main(["demo", "--quick", "--processes", "0", "--out", str(tmp_path)]) == 2
    assert "at least 1 process" in capsys.readouterr().err
    assert not tmp_path.joinpath("data").exists()


def test_runs_of_an_earlier_demo_recipe_are_refused_before_anything_changes(tmp_path, capsys):
    import dataclasses

    from ilseg.config import dump_config
    from ilseg.data.synth import META_FILE
    from ilseg.demo import demo_config, plan_jobs

    out = tmp_path / "demo"
    cfg = plan_jobs(demo_config(out / "data" / "synth"), ["ilt"], out / "runs", quick=False)[0].cfg
    older = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, crop_size=64))
    (out / "runs" / "ilt").mkdir(parents=True)
    (out / "runs" / "ilt" / "config.yaml").write_text(dump_config(older))
    (out / "data" / "synth").mkdir(parents=True)
    (out / "data" / "synth" / META_FILE).write_text('{"format": "ilseg-synth", "version": 4}')
    assert main(["demo", "--methods", "ilt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'runs'} holds runs of an earlier demo" in err
    assert "ilt (data.crop_size: 64 -> 48; the synthetic set in" in err and "of another version or seed" in err
    assert f"Move or delete {out / 'runs'}" in err
    # nothing was touched: the old data's description and the old run are as they were
    assert (out / "data" / "synth" / META_FILE).read_text() == '{"format": "ilseg-synth", "version": 4}'
    assert sorted(p.name for p in (out / "runs" / "ilt").iterdir()) == ["config.yaml"]
