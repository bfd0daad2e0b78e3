"""What a run prints and keeps at real sizes: per-class IoU lines or files, percentages, time estimates,
TensorBoard points within an epoch, progress bars in files, a divergence's advice, a folder reused."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_config, tiny_sets

import processes
from ilseg.cli import main
from ilseg.engine import runlog
from ilseg.engine.run import run_training
from ilseg.engine.runlog import MAX_CLASSES_IN_LOG, RunLogger, iou_lines
from ilseg.engine.step import duration
from ilseg.errors import IlsegError
from ilseg.tasks import get_task


def _entry(names: list[str]) -> dict:
    ious = {name: (i % 10) / 10 for i, name in enumerate(names)}
    ious[names[3]] = None  # absent from the test masks
    return {"step": 2, "miou_all": 0.4567, "miou_old": 0.5, "miou_new": 0.25, "pixel_accuracy": 0.9,
            "iou_per_class": ious}


def test_voc_ious_wrap_in_percent_and_ade_ious_go_to_a_table(tmp_path, caplog):
    voc = get_task("voc", "15-1").class_names
    lines = iou_lines(_entry(list(voc))["iou_per_class"])
    assert 1 < len(lines) <= 4 and all(len(line) <= runlog.LINE_WIDTH for line in lines)
    assert lines[0].startswith("  IoU (%): background 0.0  aeroplane 10.0")
    assert " ".join(" ".join(lines).split()).count(" ") == 2 * len(voc) + 1  # every class once, with its value
    assert "bird -" in " ".join(lines)

    ade = list(get_task("ade", "100-5").class_names)
    assert len(ade) > MAX_CLASSES_IN_LOG
    with RunLogger(tmp_path, quiet=True) as log:
        log.step_table(_entry(ade))
    text = (tmp_path / "train.log").read_text()
    assert "step 2 done: mIoU all 45.7% | old 50.0% | new 25.0% | pixel acc 90.0%" in text
    assert f"IoU (%) of the 151 classes: {tmp_path / 'iou-step2.md'}" in text and "results.csv" in text
    assert len(text.splitlines()) == 2  # no line of 151 values
    table = (tmp_path / "iou-step2.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| class")]
    assert len(rows) == 151 and rows[0].endswith("| 90.0 |") and rows[-1] == f"| {ade[3]} | - |"


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_a_bar_drawn_into_a_file_ends_its_line_when_it_closes(monkeypatch):
    """In a SLURM log (stdout and stderr in one file), the next line, an error on stderr included, starts on a
    line of its own."""
    out = _Pipe()
    monkeypatch.setattr(sys, "stdout", out)
    log = RunLogger(None)
    bar = log.progress(5, "step 0 epoch 1/2")
    bar.update()
    bar.close()
    bar.close()  # closing twice ends the line once
    log.close()
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (4.4, 59, 61, 3599, 3600, 3 * 3600 + 5 * 60)] == [
        "4 s", "59 s", "1 min", "1 h", "1 h", "3 h 5 min"]


def test_a_tiny_run_logs_percentages_time_left_and_tensorboard_points(synth_root, tmp_path, monkeypatch):
    every = 3
    monkeypatch.setattr("ilseg.engine.step.TENSORBOARD_EVERY", every)
    points: list[tuple[int, int, dict]] = []
    original = RunLogger.iteration_scalars

    def spy(self, step, iteration, values):
        points.append((step, iteration, dict(values)))
        original(self, step, iteration, values)

    monkeypatch.setattr(RunLogger, "iteration_scalars", spy)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    cfg = tiny_config(synth_root, "data.task=6-4", "optim.epochs=1", "optim.epochs_next=1", "optim.batch_size=2",
                      f"runtime.tensorboard={str(tensorboard).lower()}", cache_dir=tmp_path / "cache")
    results = run_training(cfg, tmp_path / "run", quiet=True)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "epochs x" not in log and "1 epoch x" in log  # "1 epoch", not "1 epochs"
    finals = [f"step {s['step']} {100 * s['miou_all']:.1f}%" for s in results["steps"]]
    assert "results: mIoU all " + ", ".join(finals) in log
    epoch_lines = [line for line in log.splitlines() if " epoch 1/1: " in line]
    assert len(epoch_lines) == 2
    assert "left in step 0, " in epoch_lines[0] and "in the run (to step 1, at this step's pace)" in epoch_lines[0]
    assert "left in step 1" in epoch_lines[1] and "in the run" not in epoch_lines[1]
    assert "IoU (%): background" in log and "% | old " in log
    # TensorBoard: a point (the means of the last `every` iterations) every `every` iterations of each step
    batches = {s["step"]: s["num_train_images"] // 2 for s in results["steps"]}
    expected = [(t, i) for t in sorted(batches) for i in range(every, batches[t] + 1, every)]
    assert expected and [(t, i) for t, i, _ in points] == expected
    assert all(set(v) >= {"train/loss", "lr"} for _, _, v in points)
    if tensorboard:  # the points are in the event files, beside the per-epoch ones
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
        events.Reload()
        assert {"step0/iter/train/loss", "step0/train/loss"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("step0/iter/train/loss")] == [i for t, i in expected if t == 0]


def test_a_diverged_run_records_its_advice_and_its_folder_takes_a_new_config(synth_root, tmp_path, capsys):
    """A loss that diverges in step 0's first epoch: results.json keeps the advice (the report repeats it), and
    the folder, in which nothing was trained, starts again with another config without --overwrite."""
    run = tmp_path / "run"
    sets = tiny_sets(synth_root, "optim.epochs=1", "optim.lr=1e30", cache_dir=tmp_path / "cache")
    assert main(["train", "--config", "synth-demo", "--out", str(run), "--quiet", "--set", *sets]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "--set optim.lr=1e+29" in err
    diverged = json.loads((run / "results.json").read_text())["diverged"]
    assert diverged["step"] == 0 and diverged["advice"] in err
    assert not list(run.glob("*.pth"))
    # the report repeats the run's own advice, not a bare --resume
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    assert diverged["advice"] in capsys.readouterr().err
    # nothing trained there: a corrected command reuses the folder, without --overwrite
    fixed = tiny_sets(synth_root, "optim.epochs=1", "optim.epochs_next=1", cache_dir=tmp_path / "cache")
    assert main(["train", "--config", "synth-demo", "--out", str(run), "--quiet", "--steps", "0",
                 "--set", *fixed]) == 0
    results = json.loads((run / "results.json").read_text())
    assert "diverged" not in results and [s["step"] for s in results["steps"]] == [0]
    assert "optim.lr: 1e+30" not in (run / "config.yaml").read_text()
    # once something is trained, another config is refused again
    with pytest.raises(IlsegError, match="holds a run with another config"):
        run_training(tiny_config(synth_root, "optim.epochs=2", cache_dir=tmp_path / "cache"), run, quiet=True)


def test_the_error_line_starts_its_own_line_when_stdout_and_stderr_share_a_file(synth_root, tmp_path):
    """As under SLURM: progress bars (not --quiet) and the error in one file."""
    sets = tiny_sets(synth_root, "optim.epochs=1", "optim.lr=1e30", cache_dir=tmp_path / "cache")
    with open(tmp_path / "slurm.out", "w") as out:
        proc = processes.run([sys.executable, "-m", "ilseg", "train", "--config", "synth-demo", "--out",
                               str(tmp_path / "run"), "--set", *sets], stdout=out, stderr=subprocess.STDOUT,
                              timeout=300)
    assert proc.returncode == 2
    text = (tmp_path / "slurm.out").read_text()
    assert "\nilseg: error: " in text
    assert all(line.startswith("ilseg: error: ") for line in text.split("\n") if "ilseg: error" in line)
