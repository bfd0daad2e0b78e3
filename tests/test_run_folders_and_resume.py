"""Faults a hostile review found in resume, settings changes, overwrite and predict (each failed before its fix)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tiny import TINY as TINY_RUN
from ilseg.cli import main
from ilseg.engine import step as step_mod

TINY = [*TINY_RUN, "optim.epochs=1"]


def interrupt_epoch(monkeypatch: pytest.MonkeyPatch, n: int) -> Callable[..., object]:
    """Make the ``n``-th epoch the engine trains raise KeyboardInterrupt (Ctrl-C); returns the real function."""
    real = step_mod.train_one_epoch
    calls = {"n": 0}

    def stop(**kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(**kwargs)

    monkeypatch.setattr(step_mod, "train_one_epoch", stop)
    return real


def train(root: Path, out: Path, *flags: str, extra: tuple[str, ...] = ()) -> int:
    return main(["train", "--config", "synth-demo", "--quiet", "--out", str(out), *flags, "--set", f"data.root={root}",
                 f"data.cache_dir={root.parent / 'cache'}", *TINY, *extra])


@pytest.fixture(scope="module")
def finished(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(synth_root, out) == 0
    return out


def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def error_line(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ilseg: error") and "Traceback" not in err[0], err
    return err[0]


def test_new_settings_never_apply_to_finished_steps(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    assert main(["train", "--resume", str(run), "--steps", "0", "--quiet", "--set", "optim.lr_next=1e-4"]) == 0
    capsys.readouterr()
    history = json.loads((run / "config-history.json").read_text())
    assert history[-1]["from_step"] == 3  # after the last step: no finished step changes its settings
    for step in (0, 1, 2):  # every finished step still loads against its own settings
        assert main(["eval", "--run", str(run), "--step", str(step), "--json"]) == 0
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    partial = copy(finished, tmp_path / "p")
    (partial / "step2.pth").unlink()
    # --steps starting after an unfinished step is refused, with or without new settings
    (partial / "step1.pth").unlink()
    line = error_line(main(["train", "--resume", str(partial), "--steps", "2:3", "--quiet", "--set",
                            "optim.lr_next=1e-4"]), capsys)
    assert "step 1" in line


def test_a_last_checkpoint_from_before_a_settings_change_is_ignored(synth_root, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = interrupt_epoch(monkeypatch, 3)  # step 0, step 1's first epoch, then Ctrl-C in its second
    assert train(synth_root, run, extra=("optim.epochs_next=2",)) == 130
    monkeypatch.setattr(step_mod, "train_one_epoch", real)
    assert torch.load(run / "last.pth", weights_only=True)["step"] == 1
    # the settings change is recorded, then the process dies before it saves anything with them
    from ilseg.engine import run as run_mod

    monkeypatch.setattr(run_mod, "train_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["train", "--resume", str(run), "--quiet", "--set", "optim.lr_next=1e-4"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "was saved with settings this run has changed since" in (run / "train.log").read_text()


def test_refusals_before_anything_is_created_or_deleted(finished, synth_root, tmp_path, capsys):
    new = tmp_path / "new"
    line = error_line(train(synth_root, new, "--steps", "2"), capsys)
    assert "step1.pth" in line and not new.exists()
    line = error_line(train(synth_root, new, "--init-from", str(tmp_path / "nowhere")), capsys)
    assert "nowhere" in line and not new.exists()
    line = error_line(train(synth_root, new, "--init-from", str(finished), extra=("optim.lr=0.01",)), capsys)
    assert "optim.lr" in line and not new.exists()
    line = error_line(train(synth_root, new, "--steps", "1:3", "--init-from", str(finished)), capsys)
    assert "--init-from" in line and not new.exists()
    run = copy(finished, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    line = error_line(train(synth_root, run, "--steps", "1:3", "--overwrite"), capsys)
    assert "--overwrite" in line and sorted(p.name for p in run.iterdir()) == before


def test_a_corrupt_middle_checkpoint_is_named(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    results = (run / "results.json").read_text()
    data = (run / "step1.pth").read_bytes()
    (run / "step1.pth").write_bytes(data[: len(data) // 3])
    line = error_line(main(["train", "--resume", str(run), "--quiet"]), capsys)
    assert "step1.pth" in line and "train that step again" in line
    assert (run / "results.json").read_text() == results  # no row dropped


@pytest.mark.parametrize("content", [b"{garbage", b"", b"\xff\xfe", b'{"steps": 5}', b'{"steps": [{"foo": 1}]}'])
def test_a_corrupt_results_file_is_rebuilt(finished, tmp_path, capsys, content):
    run = copy(finished, tmp_path)
    good = json.loads((run / "results.json").read_text())
    (run / "results.json").write_bytes(content)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    rebuilt = json.loads((run / "results.json").read_text())
    assert [s["miou_all"] for s in rebuilt["steps"]] == [s["miou_all"] for s in good["steps"]]


def test_predict_refuses_photos_that_share_a_name(finished, synth_root, tmp_path, capsys):
    photo = next((synth_root / "JPEGImages").glob("*.jpg"))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(photo, tmp_path / folder / "x.jpg")
    line = error_line(main(["predict", "--run", str(finished), str(tmp_path / "a" / "x.jpg"),
                            str(tmp_path / "b" / "x.jpg"), "--out", str(tmp_path / "p")]), capsys)
    assert "share a file name" in line and not (tmp_path / "p").exists()


def test_eval_refuses_run_and_checkpoint_together(finished, capsys):
    line = error_line(main(["eval", "--run", str(finished), "--checkpoint", str(finished / "step1.pth")]), capsys)
    assert "not both" in line


def test_a_relative_data_root_is_saved_absolute(synth_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(synth_root.parent)
    out = tmp_path / "rel"
    assert main(["train", "--config", "synth-demo", "--quiet", "--out", str(out), "--steps", "0", "--set",
                 f"data.root={synth_root.name}", f"data.cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    saved = (out / "config.yaml").read_text()
    assert f"root: {synth_root}" in saved
    monkeypatch.chdir(os.sep)
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--json"]) == 0


def test_eval_of_a_step_that_is_not_there_lists_the_finished_ones(finished, capsys):
    line = error_line(main(["eval", "--run", str(finished), "--step", "5"]), capsys)
    assert "no finished step 5" in line and "finished steps: 0, 1, 2" in line


def test_new_settings_from_a_later_step_still_load_the_steps_before(synth_root, tmp_path, capsys, monkeypatch):
    """Stopped in step 2, resumed with a new lr_next: step 2 starts from step1.pth, trained with the old one."""
    run = tmp_path / "run"
    interrupt_epoch(monkeypatch, 3)  # step 0, step 1, then Ctrl-C in step 2's first epoch
    assert train(synth_root, run) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet", "--set", "optim.lr_next=1e-4"]) == 0
    history = json.loads((run / "config-history.json").read_text())
    assert [e["from_step"] for e in history] == [0, 2]
    for step in (1, 2):
        assert main(["eval", "--run", str(run), "--step", str(step), "--json"]) == 0


def test_a_checkpoint_from_before_a_new_setting_stays_usable_when_the_setting_is_at_its_default(tmp_path):
    """Settings added later (e.g. a method's new field) are absent from older checkpoints; those trained as
    the default does, so a run at the default accepts them, and a run that sets the new value does not."""
    from ilseg.config import load_config, preset_dir
    from ilseg.errors import IlsegError
    from ilseg.runs.checkpoint import check_compatible
    from ilseg.runs.folder import checkpoint_identity

    cfg = load_config(preset_dir() / "synth-demo.yaml", ["method.name=ilt"])
    identity = checkpoint_identity(cfg, 1)
    older = {k: v for k, v in identity.items() if k not in ("method.kd_temperature", "runtime.sync_bn")}
    check_compatible({"identity": older, "format_version": 2}, identity, tmp_path / "step1.pth")
    changed = checkpoint_identity(load_config(preset_dir() / "synth-demo.yaml",
                                              ["method.name=ilt", "method.kd_temperature=2"]), 1)
    with pytest.raises(IlsegError, match=r"method.kd_temperature: checkpoint has '\(not recorded\)', this run has 2.0"):
        check_compatible({"identity": older, "format_version": 2}, changed, tmp_path / "step1.pth")
