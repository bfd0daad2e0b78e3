"""What a second hostile probe found (issue "Robustness, second round"), each shrunk to the tiny synthetic run.

Every test failed before its fix.  docs/robustness.md names each one.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import shutil
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny import TINY as TINY_RUN
import ilseg.fileio
from ilseg.cli import main
from ilseg.data import splits
from ilseg.fileio import is_ilseg_temporary
from ilseg.runs.folder import is_run_temporary

TINY = [*TINY_RUN, "optim.epochs=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train_argv(root: Path, out: Path, cache_dir: Path | str, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    return ["train", "--config", "synth-demo", "--quiet", "--out", str(out), *flags, "--set", f"data.root={root}",
            f"data.cache_dir={cache_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def finished(synth_root, cache, tmp_path_factory) -> Path:
    """A finished 3-step run (read-only here: tests that change it copy it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_argv(synth_root, out, cache)) == 0
    return out


def copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def error_line(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ilseg: error") and "Traceback" not in err[0], err
    return err[0]


def log_lines(run: Path) -> list[str]:
    return (run / "train.log").read_text().splitlines()


# -- 1. --overwrite and the clean-up of temporaries remove only what ilseg wrote ------------------------------
def test_only_ilseg_temporaries_are_recognised():
    assert is_ilseg_temporary(".ilseg-tmp-results.json.1a2b3c4d.tmp")
    assert not is_ilseg_temporary(".hidden-notes.tmp") and not is_ilseg_temporary(".notes.txt.1a2b3c4d.tmp")
    # the names ilseg gave its temporaries before: only for the files it writes in a run folder
    assert is_run_temporary(".last.pth.1a2b3c4d.tmp") and is_run_temporary(".step3.pth.0000.tmp")
    assert is_run_temporary(".step0.pth.copy") and is_run_temporary(".ilseg-tmp-step1.png.abcdef01.tmp")
    assert not is_run_temporary(".hidden-notes.tmp") and not is_run_temporary(".notes.txt.1a2b3c4d.tmp")
    assert not is_run_temporary(".my.copy") and not is_run_temporary("notes.tmp")


def test_overwrite_and_clean_up_keep_every_file_ilseg_did_not_write(finished, synth_root, cache, tmp_path,
                                                                     capsys):
    run = copy(finished, tmp_path)
    mine = {".hidden-notes.tmp": b"my notes", "notes.txt": b"keep me", ".step1.pth.bak.copy": b"mine too"}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    (run / "preview").mkdir(exist_ok=True)
    (run / "preview" / "step0.png").write_bytes(b"ilseg's preview")
    (run / "preview" / "my-figure.png").write_bytes(b"mine")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"ilseg's events")
    leftovers = [".ilseg-tmp-last.pth.1a2b3c4d.tmp", ".results.json.0badc0de.tmp"]  # new and old names
    for name in leftovers:
        (run / name).write_bytes(b"half")
    assert main(train_argv(synth_root, run, cache, flags=("--overwrite", "--steps", "0"))) == 0
    capsys.readouterr()
    for name, data in mine.items():
        assert (run / name).read_bytes() == data
    assert (run / "preview" / "my-figure.png").read_bytes() == b"mine"
    assert not (run / "preview" / "step0.png").exists() and not (run / "tensorboard").exists()
    assert not [name for name in leftovers if (run / name).exists()]
    assert not (run / "step1.pth").exists() and (run / "step0.pth").is_file()
    log = "\n".join(log_lines(run))
    assert "removed 2 half-written file(s) a stopped process left" in log
    assert "kept .hidden-notes.tmp, .step1.pth.bak.copy (not written by ilseg)" in log
    assert "kept what ilseg did not write: .hidden-notes.tmp, .step1.pth.bak.copy, notes.txt, preview/" in log


# -- 2. empty, random and folder config files; a damaged config.yaml of a run ---------------------------------
@pytest.mark.parametrize("kind", ["empty", "comments", "random-bytes", "folder"])
def test_a_config_file_that_holds_no_config_is_one_line(kind, tmp_path, capsys):
    path = tmp_path / "my.yaml"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({"empty": b"", "comments": b"# nothing yet\n",
                          "random-bytes": np.random.default_rng(0).bytes(300)}[kind])
    for argv in (["train", "--config", str(path), "--out", str(tmp_path / "run")], ["config", "show", str(path)]):
        line = error_line(main(argv), capsys)
        assert str(path) in line
    assert not (tmp_path / "run").exists()


def test_a_damaged_run_config_is_refused_never_the_defaults_and_restored(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    good = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("")
    for argv in (["train", "--resume", str(run), "--quiet"], ["eval", "--run", str(run), "--json"]):
        line = error_line(main(argv), capsys)
        assert f"{run / 'config.yaml'} is empty" in line and "never takes the default settings" in line
        assert f"ilseg config restore {run}" in line and "step2.pth" in line  # no history: the checkpoints hold it
    assert main(["config", "restore", str(run)]) == 0
    assert (run / "config.yaml").read_text() == good and not list(run.glob("config.yaml.damaged*"))
    line = error_line(main(["config", "restore", str(run)]), capsys)
    assert "nothing to restore" in line
    # a run whose settings changed: config-history.json holds them; a damaged file is kept
    assert main(["train", "--resume", str(run), "--quiet", "--set", "eval.batch_size=8"]) == 0
    changed = (run / "config.yaml").read_text()
    garbage = np.random.default_rng(1).bytes(200)
    (run / "config.yaml").write_bytes(garbage)
    capsys.readouterr()
    line = error_line(main(["train", "--resume", str(run), "--quiet"]), capsys)
    assert "config-history.json" in line and f"ilseg config restore {run}" in line
    assert main(["config", "restore", str(run)]) == 0
    assert (run / "config.yaml").read_text() == changed
    assert (run / "config.yaml.damaged").read_bytes() == garbage
    # a folder where config.yaml belongs
    (run / "config.yaml").unlink()
    (run / "config.yaml").mkdir()
    capsys.readouterr()
    line = error_line(main(["eval", "--run", str(run)]), capsys)
    assert "config.yaml is a folder" in line


# -- 3. a bad model.pretrained is refused before the run folder exists -----------------------------------------
@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_a_bad_pretrained_file_creates_nothing_so_the_corrected_command_runs(kind, synth_root, cache, tmp_path,
                                                                             capsys):
    weights = tmp_path / "weights.pth"
    if kind == "garbage":
        weights.write_bytes(np.random.default_rng(2).bytes(4096))
    out = tmp_path / "run"
    line = error_line(main(train_argv(synth_root, out, cache, "model.width=64", f"model.pretrained={weights}",
                                      flags=("--steps", "0"))), capsys)
    assert str(weights) in line and not out.exists()
    assert main(train_argv(synth_root, out, cache, flags=("--steps", "0"))) == 0


# -- 4. ilseg report on a damaged results.json; --skip-bad ----------------------------------------------------
def _damage(results: dict, kind: str) -> str:
    if kind == "nested":
        return "[" * 100_000 + "]" * 100_000
    if kind == "text-score":
        results["steps"][1]["miou_all"] = "abc"
    elif kind == "missing-scores":
        del results["steps"][2]["miou_new"]
    elif kind == "nan":
        return json.dumps(results).replace('"miou_old": ', '"miou_old": NaN, "was": ', 1)
    elif kind == "infinity":
        results["steps"][0]["iou_per_class"]["disc"] = float("inf")
    return json.dumps(results)


@pytest.mark.parametrize("kind, field", [("nested", "nested too deeply"), ("text-score", "steps[1].miou_all is 'abc'"),
                                         ("missing-scores", "steps[2].miou_new is missing"),
                                         ("nan", "steps[0].miou_old is NaN"),
                                         ("infinity", "steps[0].iou_per_class.disc is Infinity")])
def test_report_names_the_damaged_results_file_and_field_and_skip_bad_reports_the_others(
        kind, field, finished, tmp_path, capsys):
    good = copy(finished, tmp_path, "good")
    bad = copy(finished, tmp_path, "bad")
    (bad / "results.json").write_text(_damage(json.loads((bad / "results.json").read_text()), kind))
    line = error_line(main(["report", str(good), str(bad), "--out", str(tmp_path / "report")]), capsys)
    assert str(bad / "results.json") in line and field in line and "--skip-bad" in line
    assert main(["report", str(good), str(bad), "--out", str(tmp_path / "report"), "--skip-bad"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ilseg: left out {bad}") and field in err[0]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Left out (--skip-bad)" in report and str(bad) in report
    assert json.loads((tmp_path / "report" / "report.json").read_text())["left_out"][0]["run"] == str(bad)
    if kind == "nested":  # resuming rebuilds it from the step checkpoints
        assert main(["train", "--resume", str(bad), "--quiet"]) == 0
        capsys.readouterr()
        assert main(["report", str(good), str(bad), "--out", str(tmp_path / "again")]) == 0


# -- 5. --workers, background-only step 0, demo --out of a user's folder ---------------------------------------
@pytest.mark.parametrize("argv", [["data", "synth", "--out", "{tmp}/s", "--workers", "-1"],
                                  ["splits", "--dataset", "synth", "--root", "{tmp}", "--task", "6-4",
                                   "--workers", "-1"]])
def test_negative_workers_are_refused(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--workers" in err and "Traceback" not in err and not (tmp_path / "s").exists()


def test_a_task_whose_step0_is_background_alone_is_refused_where_tasks_are_parsed(synth_root, cache, tmp_path,
                                                                                  capsys):
    line = error_line(main(["tasks", "synth", "0-10"]), capsys)
    assert "'0-10'" in line and "background alone" in line
    line = error_line(main(train_argv(synth_root, tmp_path / "run", cache, "data.task=0-10")), capsys)
    assert "'0-10'" in line and "background alone" in line and not (tmp_path / "run").exists()
    line = error_line(main(train_argv(synth_root, tmp_path / "run", cache, "data.step_sizes=[1, 10]")), capsys)
    assert "background alone" in line


def test_train_data_synth_and_demo_refuse_a_folder_of_the_users_files_alike(synth_root, cache, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for argv in (train_argv(synth_root, folder, cache), ["data", "synth", "--out", str(folder)],
                 ["demo", "--quick", "--out", str(folder)]):
        line = error_line(main(argv), capsys)
        assert f"--out {folder} is not empty" in line and "(it holds notes.txt)" in line
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    # hidden entries (.DS_Store, .git) are left aside by all three alike
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"finder")
    assert main(["data", "synth", "--out", str(hidden), "--num-images", "4", "--size", "16", "--workers", "1"]) == 0
    assert (hidden / ".DS_Store").read_bytes() == b"finder"


def test_demo_accepts_its_own_folder_and_refuses_a_user_file_of_its_names(tmp_path):
    from ilseg.demo import demo_entry

    (tmp_path / "comparison.md").write_text("ilseg demo: synthetic 6-2-2\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ilt").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synth").mkdir()
    assert all(demo_entry(p) for p in tmp_path.iterdir())
    (tmp_path / "comparison.md").write_text("my own comparison\n")
    (tmp_path / "data" / "voc").mkdir()
    assert not demo_entry(tmp_path / "comparison.md") and not demo_entry(tmp_path / "data")


# -- 6. a cache folder that cannot be written: warned once, the run goes on ------------------------------------
@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_unwritable_cache_is_warned_about_once_and_the_run_goes_on(kind, synth_root, tmp_path, monkeypatch,
                                                                     caplog, capsys):
    monkeypatch.setattr(splits, "_UNWRITABLE", set())
    cache_dir = tmp_path / "cache"
    if kind == "file":
        cache_dir.write_text("not a folder")
    else:
        cache_dir.mkdir()
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(os.fsdecode(path)).is_relative_to(cache_dir):
                raise OSError(errno.EROFS, "Read-only file system")
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(ilseg.fileio.os, "open", read_only)
    assert main(train_argv(synth_root, tmp_path / "run", cache_dir, flags=("--steps", "0"))) == 0
    warned = [r.getMessage() for r in caplog.records if "cache folder" in r.getMessage()]
    assert len(warned) == 1 and str(cache_dir) in warned[0] and "going on without it" in warned[0], warned
    assert ("it is a file" if kind == "file" else "Read-only file system") in warned[0]
    caplog.clear()
    capsys.readouterr()
    monkeypatch.setattr(splits, "_UNWRITABLE", set())
    assert main(["splits", "--dataset", "synth", "--root", str(synth_root), "--task", "6-4", "--workers", "1",
                 "--cache-dir", str(cache_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_images"] > 0
    assert len([r for r in caplog.records if "cache folder" in r.getMessage()]) == 1


# -- 7. data synth on a full disk names the file ---------------------------------------------------------------
def test_data_synth_on_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    import ilseg.data.synth as synth

    def full(path, mask):
        Path(path).write_bytes(b"half")  # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")  # as PIL's write reports it: no file name

    monkeypatch.setattr(synth, "write_mask_png", full)
    out = tmp_path / "synth"
    line = error_line(main(["data", "synth", "--out", str(out), "--num-images", "4", "--size", "16",
                            "--workers", "1"]), capsys)
    assert f"cannot write {out / 'SegmentationClassAug' / 'synth_00000.png'} (No space left on device" in line
    assert not (out / "SegmentationClassAug" / "synth_00000.png").exists()  # the part written is removed


# -- 8. files where folders are expected and the reverse; pickles for ilseg import -----------------------------
def test_a_folder_where_a_file_is_expected_says_so(finished, synth_root, cache, tmp_path, capsys):
    from ilseg.data.datasets import build_dataset
    from ilseg.data.splits import step_image_indices
    from ilseg.tasks import get_task

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    train = build_dataset("synth", root, "train")
    image = train.images[step_image_indices(train, get_task("synth", "6-2-2"), 0, "disjoint",
                                            cache_dir=tmp_path / "cache2", progress=False)[0]]
    image.unlink()
    image.mkdir()  # a training image of step 0
    line = error_line(main(train_argv(root, tmp_path / "run", tmp_path / "cache2", flags=("--steps", "0"))), capsys)
    assert f"{image}, which is a folder, not a file" in line
    line = error_line(main(["eval", "--checkpoint", str(finished), "--config", str(finished / "config.yaml")]),
                      capsys)
    assert f"checkpoint {finished} is a folder" in line and "--run" in line
    line = error_line(main(["train", "--config", str(finished), "--out", str(tmp_path / "r")]), capsys)
    assert f"--config {finished} is a folder" in line


class _System:
    """Unpickling this would run a shell command; ``weights_only=True`` refuses it, nothing runs."""

    def __reduce__(self):
        return (os.system, ("exit 0",))


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-save-os-system", "raw-pickle-os-system"])
def test_import_of_pickled_python_objects_says_so_without_torch_warnings(kind, tmp_path, capsys):
    path = tmp_path / "6-2-2-synth_MIB_0.pth"
    if kind == "raw-pickle":
        path.write_bytes(pickle.dumps({"model_state": {"w": [1.0, 2.0]}, "epoch": 3}, protocol=4))
    elif kind == "torch-save-os-system":
        torch.save({"model_state": _System()}, path)
    else:
        path.write_bytes(pickle.dumps({"model_state": _System()}, protocol=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = error_line(main(["import", "--format", "mib", str(path), "--config", "synth-demo", "--out",
                                str(tmp_path / "run")]), capsys)
    assert "it holds Python objects" in line and str(path) in line
    assert not [w for w in caught if "pickle protocol" in str(w.message)]
    assert not (tmp_path / "run").exists()


# -- 9. the last line in train.log, a .lock folder, predict one model at a time ---------------------------------
def test_the_final_error_and_stop_lines_also_go_to_train_log(finished, synth_root, cache, tmp_path, capsys,
                                                             monkeypatch):
    run = copy(finished, tmp_path)
    line = error_line(main(["train", "--resume", str(run), "--quiet", "--set", "model.width=16"]), capsys)
    assert log_lines(run)[-1].endswith(line)
    stopped = tmp_path / "stopped"
    from ilseg.engine import step as step_mod

    monkeypatch.setattr(step_mod, "train_one_epoch", lambda **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(train_argv(synth_root, stopped, cache)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert log_lines(stopped)[-1].endswith(err[-1]) and "--resume" in err[-1]
    # a folder that is not a run folder gets no train.log
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    error_line(main(train_argv(synth_root, foreign, cache)), capsys)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_lock_that_is_a_folder_is_named_with_what_to_do(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    (run / ".lock").mkdir()
    line = error_line(main(["train", "--resume", str(run), "--quiet"]), capsys)
    assert f"{run / '.lock'} is a folder" in line and "move it out of the folder" in line
    assert (run / ".lock").is_dir()


def test_predict_steps_all_holds_one_model_at_a_time(finished, synth_root, tmp_path, monkeypatch, capsys):
    import ilseg.visual.predict as predict

    alive: weakref.WeakSet = weakref.WeakSet()
    most = []
    real = predict.column_model

    def counting(column, device):
        gc.collect()
        most.append(len(alive))
        model, to_ids = real(column, device)
        alive.add(model)
        return model, to_ids

    monkeypatch.setattr(predict, "column_model", counting)
    photo = sorted((synth_root / "JPEGImages").glob("*.jpg"))[0]
    out = tmp_path / "all"
    assert main(["predict", "--run", str(finished), "--steps", "all", str(photo), "--out", str(out)]) == 0
    assert most == [0, 0, 0]  # each model was freed before the next was loaded
    assert (out / f"{photo.stem}_panel.png").is_file()

