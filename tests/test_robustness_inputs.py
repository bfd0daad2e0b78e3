"""Robustness of ``ilseg train`` / ``ilseg predict`` against bad inputs, bad folders and failing disks.

Every refusal reaches the user as exactly one ``ilseg: error: ...`` line on
stderr (exit status 2, no traceback) that names the file or value at fault,
and leaves nothing half-written behind.  Runs use the tiny synthetic config
of ``test_engine.py`` (seconds on a CPU) and their own cache folder.
"""

from __future__ import annotations

import errno
import gc
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import TINY
import ilseg.fileio
from ilseg.cli import main
from ilseg.config import dump_config, load_config
from ilseg.data.datasets import build_dataset
from ilseg.data.io import write_mask_png
from ilseg.data.splits import step_image_indices
from ilseg.errors import IlsegError, WriteError, one_line
from ilseg.runs import checkpoint as checkpoint_mod
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.tasks import get_task

STEP_CLASSES = {0: ["background", "disc", "square", "triangle", "ring", "cross", "bar"],
                1: ["diamond", "star"], 2: ["crescent", "checker"]}


class _Opaque:
    """A plain Python object: ``torch.load(weights_only=True)`` refuses to unpickle it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


# -- fixtures and helpers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The module's mask cache (never the user's ``~/.cache/ilseg``)."""
    return tmp_path_factory.mktemp("cache")


def train_argv(root: Path, out: Path | None, cache_dir: Path, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    """``ilseg train`` of the tiny synth config; ``--set`` items go last (they end at the next option)."""
    argv = ["train", "--config", "synth-demo", "--quiet", *flags]
    if out is not None:
        argv += ["--out", str(out)]
    return argv + ["--set", f"data.root={root}", f"data.cache_dir={cache_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def finished_run(synth_root, cache, tmp_path_factory) -> Path:
    """A finished 3-step run made by the CLI (read-only here: tests that change a run copy it)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(train_argv(synth_root, out, cache)) == 0
    assert {f"step{t}.pth" for t in range(3)} <= {p.name for p in out.iterdir()}
    return out


def garbage(size: int, seed: int = 0) -> bytes:
    """Fixed random bytes: not an image, not a checkpoint (the same every run)."""
    return np.random.default_rng(seed).bytes(size)


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def copy_data(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    return dst


def one_error(code: int, capsys) -> str:
    """The single ``ilseg: error`` line of a refused command (exit 2, no traceback)."""
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ilseg: error"), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def ids_of(root: Path, split: str) -> list[str]:
    name = "train_aug.txt" if split == "train" else "val.txt"
    return (root / "ImageSets" / "Segmentation" / name).read_text().split()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith((".tmp", ".copy")) or p.name == ".lock")


# -- 1. --out is a file --------------------------------------------------------------------
def test_out_that_is_a_regular_file_is_refused_and_kept(synth_root, cache, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    line = one_error(main(train_argv(synth_root, target, cache, flags=("--steps", "0"))), capsys)
    assert str(target) in line and "is a file" in line
    assert target.read_text() == "my notes\n"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_out_below_a_regular_file_is_one_line(synth_root, cache, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    line = one_error(main(train_argv(synth_root, target / "run", cache, flags=("--steps", "0"))), capsys)
    assert str(target) in line
    assert target.read_text() == "my notes\n"


# -- 2. read-only file system -------------------------------------------------------------
def _refuse_writes_under(monkeypatch, folder: Path, *, only=lambda path: True) -> list[str]:
    """``os.open`` for writing (as in :mod:`ilseg.fileio` and the run lock) fails with EROFS under ``folder``."""
    real_open = os.open
    refused: list[str] = []
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def fake_open(path, flags, *args, **kwargs):
        p = Path(os.fsdecode(path))
        if flags & writing and p.is_relative_to(folder) and only(p):
            refused.append(p.name)
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(ilseg.fileio.os, "open", fake_open)
    return refused


def test_read_only_run_folder_fails_on_one_line_and_writes_nothing(synth_root, cache, tmp_path, monkeypatch,
                                                                   capsys):
    run = tmp_path / "mnt"
    run.mkdir()  # e.g. a mount point that exists but is mounted read-only
    refused = _refuse_writes_under(monkeypatch, run)
    line = one_error(main(train_argv(synth_root, run, cache, flags=("--steps", "0"))), capsys)
    assert refused  # the patch did act
    assert "Read-only file system" in line and str(run) in line and "cannot write" in line
    assert list(run.iterdir()) == []


def test_read_only_config_write_releases_the_lock(synth_root, cache, tmp_path, monkeypatch, capsys):
    """The lock can be taken but no file written (e.g. the quota of the folder): config.yaml is named."""
    run = tmp_path / "run"
    _refuse_writes_under(monkeypatch, run, only=lambda p: p.name.endswith(".tmp"))
    line = one_error(main(train_argv(synth_root, run, cache, flags=("--steps", "0"))), capsys)
    assert f"cannot write {run / 'config.yaml'}" in line and "Read-only file system" in line
    assert list(run.iterdir()) == []  # no config, no temporary, the lock released


def test_run_folder_that_cannot_be_created_is_named(synth_root, cache, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    run = parent / "run"
    real_mkdir = os.mkdir

    def fake_mkdir(path, *args, **kwargs):
        if Path(os.fsdecode(path)).is_relative_to(parent):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    line = one_error(main(train_argv(synth_root, run, cache, flags=("--steps", "0"))), capsys)
    assert str(run) in line and "Read-only file system" in line
    assert not run.exists()


# -- 3. the disk fills while a checkpoint is written ---------------------------------------
@pytest.mark.parametrize("target", ["last.pth", "step1.pth"])
def test_disk_full_during_a_checkpoint_then_resume(synth_root, cache, tmp_path, monkeypatch, capsys, target):
    run = tmp_path / "run"
    real_save = torch.save
    calls: list[str] = []

    def full_disk(obj, f, *args, **kwargs):
        is_step1 = isinstance(obj, dict) and obj.get("step") == 1
        name = "step1.pth" if is_step1 and "metrics" in obj else "last.pth"
        if is_step1 and name == target:
            calls.append(name)
            f.write(b"\0" * 123)  # a partial write, as when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, "save", full_disk)
    line = one_error(main(train_argv(synth_root, run, cache, flags=("--steps", "0:2"))), capsys)
    assert calls == [target]
    assert "cannot write" in line and str(run / target) in line
    assert f"ilseg train --resume {run.resolve()}" in line
    assert load_checkpoint(run / "step0.pth")["step"] == 0
    assert not (run / "step1.pth").exists()
    last = load_checkpoint(run / "last.pth")  # the previous version is intact
    assert last["step"] == (0 if target == "last.pth" else 1)
    assert leftovers(run) == []  # no temporary file, no lock

    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    assert main(["train", "--resume", str(run), "--quiet", "--steps", "0:2"]) == 0
    capsys.readouterr()
    assert load_checkpoint(run / "step1.pth")["step"] == 1
    assert leftovers(run) == []
    assert [s["step"] for s in json.loads((run / "results.json").read_text())["steps"]] == [0, 1]


def test_run_folder_unwritable_mid_run_for_the_log_then_resume(synth_root, cache, tmp_path, monkeypatch, capsys):
    """train.log cannot be written any more after step 0 (folder gone read-only, disk full): one line, resumable."""
    from ilseg.engine import runlog

    run = tmp_path / "run"
    broken = {"on": False}
    real_table, real_flush = runlog.RunLogger.step_table, runlog._LogFile.flush

    def table_then_break(self, entry):
        real_table(self, entry)
        broken["on"] = True

    def flush(self):
        if broken["on"]:
            raise OSError(errno.EACCES, "Permission denied")
        real_flush(self)

    monkeypatch.setattr(runlog.RunLogger, "step_table", table_then_break)
    monkeypatch.setattr(runlog._LogFile, "flush", flush)
    line = one_error(main(train_argv(synth_root, run, cache, flags=("--steps", "0:2"))), capsys)
    assert f"cannot write {run / 'train.log'} (Permission denied)" in line
    assert f"ilseg train --resume {run.resolve()}" in line
    assert load_checkpoint(run / "step0.pth")["step"] == 0 and leftovers(run) == []
    monkeypatch.setattr(runlog._LogFile, "flush", real_flush)
    monkeypatch.setattr(runlog.RunLogger, "step_table", real_table)
    assert main(["train", "--resume", str(run), "--quiet", "--steps", "0:2"]) == 0
    assert load_checkpoint(run / "step1.pth")["step"] == 1


# -- 4. predict ----------------------------------------------------------------------------
def _photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_predict_out_that_is_a_file_is_refused(finished_run, tmp_path, capsys):
    photo = _photo(tmp_path / "a.jpg", 0)
    target = tmp_path / "masks.png"
    target.write_bytes(b"keep")
    line = one_error(main(["predict", "--run", str(finished_run), str(photo), "--out", str(target)]), capsys)
    assert str(target) in line and "is a file" in line
    assert target.read_bytes() == b"keep"


def test_predict_of_a_folder_asks_for_image_files(finished_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a.jpg", 0)
    out = tmp_path / "out"
    line = one_error(main(["predict", "--run", str(finished_run), str(folder), "--out", str(out)]), capsys)
    assert f"{folder} is a folder" in line and f"{folder}/*.jpg" in line and "corrupt" not in line
    assert not out.exists()


def test_predict_corrupt_photo_is_named_and_nothing_is_written(finished_run, tmp_path, capsys):
    good = _photo(tmp_path / "first.jpg", 1)
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(garbage(2000, 1))
    out = tmp_path / "out"
    line = one_error(main(["predict", "--run", str(finished_run), str(good), str(bad), "--out", str(out)]), capsys)
    assert str(bad) in line
    advice = line.replace(str(bad), "").lower()
    assert "re-download" not in advice and "dataset" not in advice
    assert not out.exists() or list(out.iterdir()) == []
    # the good photo alone works (the run is fine)
    assert main(["predict", "--run", str(finished_run), str(good), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"first_mask.png", "first_overlay.png"}


def test_predict_truncated_photo_writes_nothing(finished_run, tmp_path, capsys):
    good = _photo(tmp_path / "first.jpg", 1)
    whole = _photo(tmp_path / "whole.jpg", 2).read_bytes()
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(whole[: len(whole) // 2])  # header intact, pixel data cut off
    out = tmp_path / "out"
    line = one_error(main(["predict", "--run", str(finished_run), str(good), str(bad), "--out", str(out)]), capsys)
    assert str(bad) in line and "re-download" not in line.replace(str(bad), "")
    assert not out.exists() or list(out.iterdir()) == []


# -- 5. early checks, before training and before the run folder exists ----------------------
def _val_mask(root: Path) -> Path:
    return root / "SegmentationClassAug" / f"{ids_of(root, 'val')[0]}.png"


def _assert_refused_early(code: int, capsys, out: Path, *fragments: str) -> str:
    line = one_error(code, capsys)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not out.exists()
    return line


def test_early_check_val_mask_with_a_label_out_of_range(synth_root, tmp_path, capsys):
    root = copy_data(synth_root, tmp_path)
    mask_path = _val_mask(root)
    mask = np.array(Image.open(mask_path))
    mask[:4, :4] = 200
    write_mask_png(mask_path, mask)
    out = tmp_path / "run"
    line = _assert_refused_early(main(train_argv(root, out, tmp_path / "cache")), capsys, out, str(mask_path))
    assert "200" in line


def test_early_check_corrupt_val_mask(synth_root, tmp_path, capsys):
    root = copy_data(synth_root, tmp_path)
    mask_path = _val_mask(root)
    mask_path.write_bytes(garbage(500, 2))
    out = tmp_path / "run"
    _assert_refused_early(main(train_argv(root, out, tmp_path / "cache")), capsys, out, str(mask_path))


def test_early_check_val_mask_of_another_size(synth_root, tmp_path, capsys):
    root = copy_data(synth_root, tmp_path)
    mask_path = _val_mask(root)
    write_mask_png(mask_path, np.zeros((16, 20), np.uint8))
    out = tmp_path / "run"
    line = _assert_refused_early(main(train_argv(root, out, tmp_path / "cache")), capsys, out, str(mask_path))
    assert "size" in line


def _index_files(root: Path, folder: Path, counts: dict[int, int]) -> str:
    ids = ids_of(root, "train")
    start = 0
    for step, n in counts.items():
        (folder / f"step{step}.txt").write_text("".join(f"{i}\n" for i in ids[start:start + n]))
        start += n
    return f"data.index_file={folder}/step{{step}}.txt"


def test_early_check_step_without_training_images_from_index_files(synth_root, cache, tmp_path, capsys):
    setting = _index_files(synth_root, tmp_path, {0: 8, 1: 0, 2: 6})
    out = tmp_path / "run"
    _assert_refused_early(main(train_argv(synth_root, out, cache, setting)), capsys, out,
                          "step 1", *STEP_CLASSES[1])


def test_early_check_missing_index_file_is_named(synth_root, cache, tmp_path, capsys):
    setting = _index_files(synth_root, tmp_path, {0: 8, 2: 6})
    out = tmp_path / "run"
    _assert_refused_early(main(train_argv(synth_root, out, cache, setting)), capsys, out,
                          str(tmp_path / "step1.txt"))


def test_early_check_batch_larger_than_a_steps_images(synth_root, cache, tmp_path, capsys):
    task = get_task("synth", "6-2-2")
    train = build_dataset("synth", synth_root, "train")
    counts = [len(step_image_indices(train, task, t, "disjoint", cache_dir=cache, progress=False))
              for t in range(3)]
    small = int(np.argmin(counts))
    batch = counts[small] + 1
    assert all(c >= batch for c in counts[:small])  # the smallest step is the first one refused
    out = tmp_path / "run"
    _assert_refused_early(main(train_argv(synth_root, out, cache, f"optim.batch_size={batch}")), capsys, out,
                          f"step {small}", f"optim.batch_size={batch}", f"only {counts[small]}")


def test_early_check_steps_out_of_range(synth_root, cache, tmp_path, capsys):
    out = tmp_path / "run"
    _assert_refused_early(main(train_argv(synth_root, out, cache, flags=("--steps", "7:9"))), capsys, out,
                          "--steps", "7:9", "0..2")


# -- 6. an error inside a DataLoader worker --------------------------------------------------
def test_corrupt_training_image_in_a_worker_is_one_line(synth_root, tmp_path, capsys, monkeypatch):
    # torch joins a failed loader's worker for MP_STATUS_CHECK_INTERVAL (5 s) when the iterator is collected;
    # shorten it and collect here, so the stall neither slows this test nor lands in a later one
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    root = copy_data(synth_root, tmp_path)
    cache_dir = tmp_path / "cache"
    train = build_dataset("synth", root, "train")
    step0 = step_image_indices(train, get_task("synth", "6-2-2"), 0, "disjoint", cache_dir=cache_dir,
                               progress=False)
    # every step-0 JPEG (the batch sampler drops a tail, so one image alone might never be read); masks stay valid
    images = [train.images[i] for i in step0]
    for k, image in enumerate(images):
        image.write_bytes(garbage(1500, 100 + k))
    out = tmp_path / "run"
    code = main(train_argv(root, out, cache_dir, "data.workers=1", flags=("--steps", "0")))
    gc.collect()
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ilseg: error"), err
    for noise in ("Traceback", "Original Traceback", "DataLoader worker"):
        assert noise not in err
    assert "cannot read image" in lines[0]
    assert sum(str(image) in lines[0] for image in images) == 1
    # no loader worker outlives the run: they ignore SIGTERM, so one left over would keep the process (this
    # test session, or the `ilseg` command) from exiting: multiprocessing's exit waits for its children
    assert not [child for child in multiprocessing.active_children() if child.is_alive()]
    assert (out / "config.yaml").is_file()  # it failed while training, after the early checks
    assert not (out / "step0.pth").exists()


def test_one_line_unwraps_a_dataloader_worker_error():
    wrapped = ("Caught IlsegError in DataLoader worker process 0.\n"
               "Original Traceback (most recent call last):\n"
               '  File "/x/torch/utils/data/_utils/worker.py", line 351, in _worker_loop\n'
               "    data = fetcher.fetch(index)\n"
               "ilseg.errors.IlsegError: mask x.png is broken\n")
    assert one_line(IlsegError(wrapped)) == "mask x.png is broken"
    # a subclass keeps its own name in the wrapper; a colon inside the message is kept
    sub = wrapped.replace("IlsegError", "WriteError").replace("mask x.png is broken", "cannot write a.pth (x: y)")
    assert one_line(WriteError(sub)) == "cannot write a.pth (x: y)"
    assert one_line(IlsegError("plain message")) == "plain message"


# -- 7. model.pretrained that is not a weights file -----------------------------------------
def _not_weights(path: Path, kind: str) -> Path:
    if kind == "random-bytes":
        path.write_bytes(garbage(4096, 4))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    else:
        torch.save({"x": _Opaque()}, path)
    return path


@pytest.mark.parametrize("kind", ["random-bytes", "text", "python-object"])
def test_pretrained_that_is_not_a_weights_file(synth_root, cache, tmp_path, capsys, kind):
    path = _not_weights(tmp_path / f"{kind}.pth", kind)
    argv = train_argv(synth_root, tmp_path / "run", cache, "model.width=64", f"model.pretrained={path}",
                      flags=("--steps", "0"))
    line = one_error(main(argv), capsys)
    assert "not a weights file" in line and str(path) in line
    assert "weights_only=False" not in line and "weights_only" not in line
    if kind == "python-object":
        assert "Python objects" in line


@pytest.mark.parametrize("kind", ["random-bytes", "text"])
def test_pretrained_garbage_is_not_said_to_hold_python_objects(tmp_path, kind):
    from ilseg.models.backbone import ResNet
    from ilseg.models.pretrained import load_pretrained

    path = _not_weights(tmp_path / f"{kind}.pth", kind)
    with pytest.raises(IlsegError, match="not a weights file") as info:
        load_pretrained(ResNet(18), path)
    assert "Python objects" not in str(info.value)


def test_corrupt_run_checkpoint_message_has_no_weights_only_advice(finished_run, tmp_path, capsys):
    bad = tmp_path / "step2.pth"
    bad.write_bytes(garbage(4096, 4))
    line = one_error(main(["eval", "--checkpoint", str(bad), "--config", str(finished_run / "config.yaml")]),
                     capsys)
    assert str(bad) in line
    assert "weights_only" not in line


# -- 8. config floats -----------------------------------------------------------------------
def test_config_file_floats_in_exponent_notation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {dataset: synth, task: 6-2-2}\nmodel: {pretrained: null}\n"
                    "optim: {lr: 1e-3, lr_next: 1E-4}\n")
    cfg = load_config(path)
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 0.001
    assert type(cfg.optim.lr_next) is float and cfg.optim.lr_next == 0.0001
    assert load_config(path, ["optim.lr=5e-3"]).optim.lr == 0.005
    # the saved form reads back the same
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(saved) == cfg


@pytest.mark.parametrize("item, key", [
    ("optim.lr=.inf", "optim.lr"), ("optim.lr=-.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.weight_decay=1e400", "optim.weight_decay"), ("optim.lr_next=1.0e999", "optim.lr_next"),
])
def test_config_non_finite_numbers_are_refused(item, key, tmp_path, capsys):
    with pytest.raises(IlsegError, match=key.replace(".", r"\.")):
        load_config(None, ["data.dataset=synth", "data.task=6-2-2", "model.pretrained=null", item])
    line = one_error(main(["tasks", "--config", "synth-demo", "--set", item]), capsys)
    assert key in line


# -- 9. what --resume --set may change -------------------------------------------------------
def test_resume_refuses_a_setting_the_finished_steps_trained_on(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    line = one_error(main(["train", "--resume", str(run), "--quiet", "--set", "model.width=16"]), capsys)
    assert "model.width" in line
    after = snapshot(run)
    log = after.pop("train.log")  # the error line is also the log's last (a batch job's user reads the log)
    assert log.startswith(before.pop("train.log")) and log.decode().splitlines()[-1].endswith(line)
    assert after == before


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_accepts_a_loader_setting(finished_run, tmp_path, capsys, workers):
    run = copy_run(finished_run, tmp_path)
    assert main(["train", "--resume", str(run), "--quiet", "--set", f"data.workers={workers}"]) == 0
    capsys.readouterr()
    assert load_config(run / "config.yaml").data.workers == workers
    assert leftovers(run) == []


# -- 10. the same command twice; --overwrite -------------------------------------------------
def test_rerun_of_a_finished_run_is_refused_then_overwrite_retrains(finished_run, synth_root, cache, tmp_path,
                                                                    capsys):
    run = copy_run(finished_run, tmp_path)
    checkpoints = {p.name: p.read_bytes() for p in run.glob("step*.pth")}
    line = one_error(main(train_argv(synth_root, run, cache)), capsys)
    assert "--resume" in line and "--overwrite" in line and str(run) in line
    assert {p.name: p.read_bytes() for p in run.glob("step*.pth")} == checkpoints
    assert leftovers(run) == []

    old = 1_000_000_000
    os.utime(run / "step0.pth", (old, old))
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps(results | {"marker": "old run"}))
    assert main(train_argv(synth_root, run, cache, flags=("--overwrite",))) == 0
    capsys.readouterr()
    assert (run / "step0.pth").stat().st_mtime_ns > old * 10**9
    rewritten = json.loads((run / "results.json").read_text())
    assert "marker" not in rewritten and [s["step"] for s in rewritten["steps"]] == [0, 1, 2]
    assert leftovers(run) == []


def test_resume_with_overwrite_is_refused(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    line = one_error(main(["train", "--resume", str(run), "--overwrite", "--quiet"]), capsys)
    assert "--resume" in line and "--overwrite" in line
    after = snapshot(run)
    log = after.pop("train.log")  # the error line is also the log's last (a batch job's user reads the log)
    assert log.startswith(before.pop("train.log")) and log.decode().splitlines()[-1].endswith(line)
    assert after == before


# -- 11. the run lock ------------------------------------------------------------------------
_HOLD_LOCK = """\
import sys, time
from pathlib import Path
from ilseg.runs.folder import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_of_a_live_process_refuses_then_a_killed_ones_is_taken_over(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    script = tmp_path / "hold_lock.py"
    script.write_text(_HOLD_LOCK)
    holder = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        line = one_error(main(["train", "--resume", str(run), "--quiet"]), capsys)
        assert f"PID {holder.pid}" in line and socket.gethostname() in line
        assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # not taken
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays, the kernel releases the lock
        holder.wait()
    assert (run / ".lock").is_file()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert not (run / ".lock").exists()


def test_a_lock_file_nobody_holds_is_taken_over(finished_run, tmp_path, capsys):
    """Garbage, or a record of a process on another host that no longer holds the lock."""
    for content in ("", "not json", json.dumps({"pid": 4242, "host": "elsewhere", "started": "2024-01-01"})):
        run = copy_run(finished_run, tmp_path / str(len(content)))
        (run / ".lock").write_text(content)
        assert main(["train", "--resume", str(run), "--quiet"]) == 0
        capsys.readouterr()
        assert not (run / ".lock").exists()


def test_two_processes_racing_for_one_lock_never_both_hold_it(tmp_path):
    from ilseg.runs.folder import RunLock

    for trial in range(20):
        folder = tmp_path / str(trial)
        folder.mkdir()
        first, second = RunLock(folder), RunLock(folder)
        first.acquire()
        with pytest.raises(IlsegError, match="in use by another ilseg process"):
            second.acquire()
        first.release()
        second.acquire()  # free again once released
        assert second.held and not (first.held)
        second.release()
        assert not (folder / ".lock").exists()


# -- 12. temporaries of a killed process -----------------------------------------------------
def test_resume_removes_temporaries_and_keeps_other_hidden_files(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    temporaries = [".step1.pth.abcd1234.tmp", ".last.pth.0000.tmp", ".step0.pth.copy"]
    kept = [".keep", "notes.tmp"]
    for name in temporaries + kept:
        (run / name).write_bytes(b"partial")
    (run / ".hidden-dir.tmp").mkdir()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    names = {p.name for p in run.iterdir()}
    assert not names & set(temporaries)
    assert set(kept) | {".hidden-dir.tmp"} <= names
    assert (run / ".keep").read_bytes() == b"partial"


# -- 13. results rebuilt from the step checkpoints ------------------------------------------
def test_results_are_rebuilt_from_the_step_checkpoints(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    original = json.loads((run / "results.json").read_text())
    stale = dict(original, steps=[s for s in original["steps"] if s["step"] != 1])
    (run / "results.json").write_text(json.dumps(stale))
    (run / "results.csv").write_text("stale\n")
    (run / "results.md").write_text("stale\n")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    rebuilt = json.loads((run / "results.json").read_text())
    assert rebuilt["steps"] == original["steps"]
    assert rebuilt["mean_miou_over_steps"] == pytest.approx(
        statistics.fmean(s["miou_all"] for s in original["steps"]), abs=1e-12)
    assert rebuilt["mean_miou_over_steps"] == pytest.approx(original["mean_miou_over_steps"], abs=1e-12)
    md = (run / "results.md").read_text()
    for s in original["steps"]:
        assert f"| {s['step']} | {s['classes_seen']} |" in md
    csv_lines = (run / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("step,")
