"""From a VOC 2012 + SBD download to a checked tree: ``ilseg data prepare`` and ``ilseg data check``.

The trees are generated here: a ``VOCdevkit/VOC2012`` folder as the VOC tar
unpacks (8x8 images, VOC masks with 255 frames) and SBD's
``benchmark_RELEASE/dataset`` with ``.mat`` files written by SciPy.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from datatrees import (
    block_mask,
    bordered,
    make_ade_tree,
    make_sbd,
    make_voc_download,
    make_voc_tree,
)
from PIL import Image

import ilseg.data.prepare as prepare
from ilseg.cli import build_parser, main
from ilseg.data.check import check_tree
from ilseg.data.io import read_mask, write_mask_png
from ilseg.data.prepare import find_sbd_dir, prepare_voc, train_aug_ids
from ilseg.errors import IlsegError
from ilseg.tasks import get_task

pytest.importorskip("scipy.io", reason="SBD's .mat files are written with SciPy (pip install -e '.[test]')")

VOC_TRAIN = {f"2007_00000{k}": bordered(block_mask([0, k + 1])) for k in range(6)}
VOC_VAL = {f"2007_10000{k}": bordered(block_mask([0, 10 + k])) for k in range(4)}
SBD_ONLY_TRAIN = {f"2008_00000{k}": block_mask([0, k + 1, 15]) for k in range(10)}
SBD_ONLY_VAL = {f"2008_10000{k}": block_mask([k + 16]) for k in range(4)}
# SBD also annotates two VOC training images (its masks win) and two VOC validation images (left out).
SBD_TRAIN = {**SBD_ONLY_TRAIN, "2007_000000": block_mask([0, 20]), "2007_000001": block_mask([20]),
             "2007_100000": block_mask([0, 19])}
SBD_VAL = {**SBD_ONLY_VAL, "2007_100001": block_mask([0, 19])}
TRAIN_AUG = sorted([*SBD_ONLY_TRAIN, *SBD_ONLY_VAL, *VOC_TRAIN])  # 20 ids, no validation id
SHOWN_PLUS_ONE = 6  # one more problem than the text report names


@pytest.fixture
def download(tmp_path):
    """``(VOC2012 folder, SBD dataset folder)`` as unpacked from the archives."""
    voc = make_voc_download(tmp_path / "data", VOC_TRAIN, VOC_VAL, [*SBD_ONLY_TRAIN, *SBD_ONLY_VAL])
    sbd = make_sbd(tmp_path / "data", SBD_TRAIN, SBD_VAL)
    return voc, sbd


def _prepare(voc, sbd, **kwargs):
    return prepare_voc(voc, sbd, progress=False, log=lambda line: None, **kwargs)


def _aug(voc, item):
    return voc / "SegmentationClassAug" / f"{item}.png"


def _stamps(voc):
    folder = voc / "SegmentationClassAug"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# -- prepare --------------------------------------------------------------------------
def test_train_aug_is_the_union_minus_validation():
    ids, left_out = train_aug_ids(["b", "a", "v1"], ["c", "a"], ["d", "b"], ["v1", "v2"])
    assert ids == ["a", "b", "c", "d"] and left_out == ["v1"]


def test_prepare_builds_masks_and_train_aug(download):
    voc, sbd = download
    summary = _prepare(voc, sbd)
    assert (summary.written, summary.skipped) == (24, 0)
    assert (summary.from_sbd, summary.from_voc_train, summary.from_voc_val) == (16, 4, 4)
    assert summary.val_excluded == 2 and summary.train_aug_size == 20 and summary.train_aug_written
    listed = (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert listed == TRAIN_AUG and not set(listed) & set(VOC_VAL)
    # SBD's mask where SBD has one, VOC's (255 frame kept) otherwise; validation masks are always VOC's.
    np.testing.assert_array_equal(read_mask(_aug(voc, "2007_000000"), 21), SBD_TRAIN["2007_000000"])
    np.testing.assert_array_equal(read_mask(_aug(voc, "2007_000003"), 21), VOC_TRAIN["2007_000003"])
    np.testing.assert_array_equal(read_mask(_aug(voc, "2008_000004"), 21), SBD_ONLY_TRAIN["2008_000004"])
    np.testing.assert_array_equal(read_mask(_aug(voc, "2007_100000"), 21), VOC_VAL["2007_100000"])
    with Image.open(_aug(voc, "2008_100001")) as img:
        assert img.mode == "P"  # a palette PNG like VOC's
    lines = summary.lines()
    assert "24 written, 0 already there" in lines[0] and "DIFFERS from the published 10,582" in lines[-1]
    assert "validation ids left out of train_aug (they were in SBD train/val or VOC train): 2" in lines[2]


@pytest.mark.parametrize("given, how", [
    ("benchmark_RELEASE/dataset", "the folder given"),
    ("benchmark_RELEASE", "its dataset/ subfolder"),
    (".", "its benchmark_RELEASE/dataset/ subfolder"),
])
def test_sbd_folder_forms(download, tmp_path, given, how):
    _, sbd = download
    assert find_sbd_dir(tmp_path / "data" / given) == (sbd, how)


def test_sbd_folder_errors(download, tmp_path):
    with pytest.raises(IlsegError, match=r"SBD folder .*nowhere does not exist; unpack SBD's benchmark\.tgz"):
        find_sbd_dir(tmp_path / "nowhere")
    with pytest.raises(IlsegError, match=r"no SBD cls/ folder with train\.txt in .*VOCdevkit"):
        find_sbd_dir(tmp_path / "data" / "VOCdevkit")


def test_second_run_writes_nothing(download):
    voc, sbd = download
    _prepare(voc, sbd)
    train_aug = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    before, list_stamp = _stamps(voc), train_aug.stat().st_mtime_ns
    again = _prepare(voc, sbd, workers=2)
    assert (again.written, again.skipped, again.train_aug_written) == (0, 24, False)
    assert _stamps(voc) == before and train_aug.stat().st_mtime_ns == list_stamp
    assert "(unchanged)" in again.lines()[-1]
    assert _prepare(voc, sbd, overwrite=True).written == 24


def test_interrupted_run_says_what_to_rerun_and_resumes(download, monkeypatch, capsys):
    voc, sbd = download
    real = prepare.read_sbd_mat
    calls = []

    def stopped_by_ctrl_c(path):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(prepare, "read_sbd_mat", stopped_by_ctrl_c)
    argv = ["data", "prepare", "voc", "--voc", str(voc), "--sbd", str(sbd), "--workers", "1", "--quiet"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err == ("ilseg: interrupted: every mask written so far is complete and kept; run "
                   f"`ilseg data prepare voc --voc {voc} --sbd {sbd}` again to finish (masks already written are "
                   "skipped)")
    assert not (voc / "ImageSets" / "Segmentation" / "train_aug.txt").exists()  # written last
    assert not list((voc / "SegmentationClassAug").glob(".*"))  # no temporary file left behind
    monkeypatch.setattr(prepare, "read_sbd_mat", real)
    assert main(argv) == 0
    out = capsys.readouterr().out
    # sorted ids: 2 from SBD, 4 from VOC, 3 from SBD were written, then Ctrl-C while reading the next .mat
    assert "15 written, 9 already there (skipped)" in out and "20 ids (written)" in out


def test_resume_rewrites_incomplete_and_missing_masks(download):
    voc, sbd = download
    _prepare(voc, sbd)
    _aug(voc, "2008_000001").unlink()
    full = _aug(voc, "2008_000002").read_bytes()
    _aug(voc, "2008_000002").write_bytes(full[: len(full) // 2])  # as a copy cut short would leave it
    (voc / "SegmentationClassAug" / ".2008_000003.png.1a2b3c4d.tmp").write_bytes(b"half")  # from a killed run
    again = _prepare(voc, sbd)
    assert (again.written, again.skipped, again.temporary_removed) == (2, 22, 1)
    np.testing.assert_array_equal(read_mask(_aug(voc, "2008_000002"), 21), SBD_ONLY_TRAIN["2008_000002"])
    assert not list((voc / "SegmentationClassAug").glob(".*"))


def test_corrupt_mat_is_named_in_one_line(download, capsys):
    voc, sbd = download
    (sbd / "cls" / "2008_000007.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(IlsegError) as info:
        _prepare(voc, sbd)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("1 of 24 masks could not be made; first: cannot read SBD annotation ")
    assert "2008_000007.mat" in message and "corrupt" in message and "benchmark.tgz" in message
    assert len(list((voc / "SegmentationClassAug").glob("*.png"))) == 23  # every other mask is written
    assert not (voc / "ImageSets" / "Segmentation" / "train_aug.txt").exists()
    assert main(["data", "prepare", "voc", "--voc", str(voc), "--sbd", str(sbd), "--workers", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "2008_000007.mat" in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    ({"GTinst": {"Segmentation": np.zeros((8, 8), np.uint8)}}, r"has no GTcls\.Segmentation field"),
    ({"GTcls": {"Segmentation": block_mask([0, 30])}}, r"has class values 30 outside 0\.\.20"),
    ({"GTcls": {"Segmentation": np.zeros((2, 8, 8), np.uint8)}},
     r"holds a GTcls\.Segmentation uint8 array of shape \(2, 8, 8\), not an HxW integer mask"),
])
def test_wrong_mat_contents_are_named(download, content, message):
    from scipy.io import savemat

    voc, sbd = download
    savemat(sbd / "cls" / "2008_000003.mat", content)
    with pytest.raises(IlsegError, match=r"2008_000003\.mat " + message):
        _prepare(voc, sbd)


def test_missing_sources_are_named(download):
    voc, sbd = download
    (sbd / "cls" / "2008_100002.mat").unlink()
    (voc / "SegmentationClass" / "2007_000004.png").unlink()
    with pytest.raises(IlsegError, match=r"^2 of 24 masks could not be made; first: .*does not exist"):
        _prepare(voc, sbd)


def test_missing_scipy_says_how_to_install(download, monkeypatch):
    voc, sbd = download
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as on an install without the [data] extra
    with pytest.raises(IlsegError, match=r"needs SciPy: pip install 'ilseg\[data\]'"):
        _prepare(voc, sbd)


# -- check ----------------------------------------------------------------------------
def _check(root, dataset="voc", **kwargs):
    return check_tree(dataset, root, progress=False, **kwargs)


def _finding(report, name):
    return next(f for f in report.findings if f.check == name)


def test_prepare_then_check_from_the_command_line(download, capsys):
    voc, sbd = download
    assert main(["data", "prepare", "voc", "--voc", str(voc), "--sbd", str(sbd.parent), "--workers", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"SBD: {sbd} (its dataset/ subfolder)" in out and f"next: ilseg data check --dataset voc --root {voc}" in out
    root = voc.parent.parent
    assert main(["data", "check", "--dataset", "voc", "--root", str(root), "--workers", "2", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "ok    lists    train: train_aug.txt, val: val.txt" in out
    assert "SegmentationClassAug/ for 24 ids" in out
    assert out.count("DIFFER") == 8  # the train list (20 of 10,582) and every published task, both modes
    assert "the train split has 10562 fewer images than published: usually a partial download" in out
    assert out.strip().splitlines()[-1] == ("data check: FAILED counts (1 of 7 checks); fix what is listed above "
                                            "and run the check again")
    assert main(["data", "check", "--dataset", "voc", "--root", str(root), "--ignore-counts", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("data check: OK, all 7 checks passed")


def test_check_compares_every_published_task(tmp_path):
    # voc 15-1 (see test_data_splits.py): disjoint counts 1/1/2/0/0/1, overlapped 3/2/2/0/0/1.
    masks = {"i0": block_mask([0, 15]), "i1": block_mask([0, 16, 255]), "i2": block_mask([0, 5, 16, 17]),
             "i3": block_mask([0, 255]), "i4": block_mask([3, 20]), "i5": block_mask([17]),
             "v0": block_mask([0, 1])}
    make_voc_tree(tmp_path, masks, val_ids=["v0"])
    report = _check(tmp_path)
    rows = {row.what: row for row in report.counts}
    assert rows["train list"].found == [6] and rows["train list"].expected == [10582]
    assert rows["val list"].found == [1] and rows["val list"].expected == [1449]
    assert rows["15-1 disjoint"].found == [1, 1, 2, 0, 0, 1]
    assert rows["15-1 disjoint"].expected == [8437, 378, 299, 420, 500, 548]
    assert rows["15-1 overlapped"].found == [3, 2, 2, 0, 0, 1]
    assert len(rows) == 2 + 6 and all(row.match is False for row in rows.values())
    one = _check(tmp_path, task=get_task("voc", "15-5s"), mode="overlap")
    assert [row.what for row in one.counts] == ["train list", "val list", "15-5s overlapped"]
    assert one.counts[2].expected == [9568, 487, 299, 491, 500, 548]  # the alias is 15-1


def test_check_catches_overlap_of_train_and_val(download):
    voc, sbd = download
    _prepare(voc, sbd)
    with open(voc / "ImageSets" / "Segmentation" / "train_aug.txt", "a") as f:
        f.write("2007_100002\n2007_100003\n")
    report = _check(voc)
    overlap = _finding(report, "overlap")
    assert not overlap.ok and overlap.details == ["2007_100002", "2007_100003"]
    assert overlap.summary.startswith("2 ids are in both the train and the val list")
    assert any("2 validation ids are in the training list" in h for h in report.hints)


def test_check_catches_label_30_in_a_validation_mask(download, capsys):
    voc, sbd = download
    _prepare(voc, sbd)
    write_mask_png(_aug(voc, "2007_100003"), block_mask([0, 30, 255]))
    report = _check(voc, ignore_counts=True)
    labels = _finding(report, "labels")
    assert report.failed == ["labels"]
    assert labels.details == [f"val: {_aug(voc, '2007_100003')} has 30"]
    assert main(["data", "check", "--dataset", "voc", "--root", str(voc), "--ignore-counts", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  labels   1 mask holds values outside 0..20 and 255 (file: values)" in out
    assert f"val: {_aug(voc, '2007_100003')} has 30" in out


def test_check_catches_missing_mask_and_size_mismatch(download):
    voc, sbd = download
    _prepare(voc, sbd)
    _aug(voc, "2008_000005").unlink()
    write_mask_png(_aug(voc, "2008_000006"), np.zeros((8, 9), np.uint8))
    (voc / "JPEGImages" / "2007_100001.jpg").unlink()
    report = _check(voc, ignore_counts=True)
    assert report.failed == ["pairs", "sizes"]
    pairs = _finding(report, "pairs")
    assert pairs.details == [f"train: {_aug(voc, '2008_000005')} does not exist",
                             f"val: {voc / 'JPEGImages' / '2007_100001.jpg'} does not exist"]
    assert _finding(report, "sizes").details == [
        f"train: {_aug(voc, '2008_000006')} is 9x8 but 2008_000006.jpg is 8x8 (WxH)"]
    rows = {row.what: row for row in report.counts}
    assert rows["15-1 disjoint"].found is None  # not computed on an incomplete training set
    assert any("1 training mask is missing or unreadable" in h for h in report.hints)


def test_check_refuses_the_silent_train_txt_fallback(download, capsys, tmp_path):
    voc, _ = download  # as unpacked: VOC's own train.txt, no train_aug.txt
    report = _check(voc)
    lists = _finding(report, "lists")
    assert not lists.ok
    assert lists.summary.startswith(f"{voc / 'ImageSets' / 'Segmentation' / 'train_aug.txt'} is missing, so "
                                    f"training would use {voc / 'ImageSets' / 'Segmentation' / 'train.txt'} (6 ids")
    assert f"ilseg data prepare voc --voc {voc} --sbd SBD_DIR" in lists.summary
    assert report.sources["train"] == f"list file {voc / 'ImageSets' / 'Segmentation' / 'train.txt'} (6 ids)"
    assert any(h.startswith("the training list is train.txt (6 ids") for h in report.hints)
    # ilseg splits names the list it used too, and points to the check.
    assert main(["splits", "--dataset", "voc", "--root", str(voc), "--task", "15-1", "--workers", "1",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"training images from {voc / 'ImageSets' / 'Segmentation' / 'train.txt'}" in out
    assert "train_aug.txt is missing, so VOC's own train.txt is used" in out
    assert f"ilseg data check --dataset voc --root {voc}" in out


def test_check_json_lists_everything(download, capsys):
    voc, sbd = download
    _prepare(voc, sbd)
    for item in list(VOC_TRAIN)[:SHOWN_PLUS_ONE]:
        write_mask_png(_aug(voc, item), block_mask([0, 21]))
    assert main(["data", "check", "--dataset", "voc", "--root", str(voc), "--json", "--ignore-counts"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False and report["failed"] == ["labels"]
    labels = next(f for f in report["findings"] if f["check"] == "labels")
    assert len(labels["details"]) == SHOWN_PLUS_ONE
    assert captured.err.startswith("data check: FAILED labels")
    assert {row["what"]: row["match"] for row in report["counts"]}["train list"] is False



def test_check_ade_tree_and_prepare_ade(tmp_path, capsys):
    base = make_ade_tree(tmp_path, {"ADE_train_00000001": block_mask([0, 150]), "ADE_train_00000002":
                                    block_mask([1, 2])}, {"ADE_val_00000001": block_mask([0, 151])})
    report = _check(tmp_path, "ade", task=get_task("ade", "100-50"))
    assert report.failed == ["labels", "counts"]
    assert _finding(report, "labels").details == [
        f"val: {base / 'annotations' / 'validation' / 'ADE_val_00000001.png'} has 151"]
    rows = {row.what: row for row in report.counts}
    assert rows["train list"].expected == [20210] and rows["val list"].expected == [2000]
    assert rows["100-50 disjoint"].found == [1, 1] and rows["100-50 disjoint"].expected is None
    assert any("partial download or unzip of ADEChallengeData2016.zip" in h for h in report.hints)
    assert main(["data", "prepare", "ade", "--root", str(tmp_path), "--ignore-counts", "--workers", "1",
                 "--quiet"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("ADE20k needs no conversion") and "FAIL  labels" in out


def test_check_synth_tree_passes(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(root), "--num-images", "30", "--size", "32"]) == 0
    assert main(["data", "check", "--dataset", "synth", "--root", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no published counts for synth" in out and "data check: OK, all 7 checks passed" in out


def test_check_option_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["data", "check", "--dataset", "voc", "--root", ".", "--workers", "0"])
    assert info.value.code == 2 and "must be 1 or more, got 0" in capsys.readouterr().err
    assert main(["data", "check", "--dataset", "voc", "--root", str(tmp_path), "--overlap"]) == 2
    assert "--overlap chooses the mode of --task" in capsys.readouterr().err
    assert main(["data", "check", "--dataset", "voc", "--root", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["data", "prepare", "voc"], ["data", "prepare", "ade"], ["data", "check"]])
def test_new_commands_end_their_help_with_examples(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    tail = capsys.readouterr().out.rstrip().splitlines()
    examples = tail[tail.index("examples:") + 1:]
    assert 2 <= len(examples) <= 3 and all(line.startswith("  ilseg data ") for line in examples)
