"""Per-step image lists: the filter over real files, the caches, index files, the report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from datatrees import block_mask, make_voc_tree

import ilseg.data.splits as splits
from ilseg.data import io
from ilseg.data.datasets import build_dataset
from ilseg.data.splits import (
    PUBLISHED_COUNTS,
    class_presence,
    load_index_file,
    split_report,
    step_image_indices,
)
from ilseg.errors import IlsegError
from ilseg.tasks import get_task

# voc 15-1: step 1 learns 16, step 2 learns 17.
MASKS = {
    "i0": block_mask([0, 15]),          # step 0 only
    "i1": block_mask([0, 16, 255]),     # step 1, both modes
    "i2": block_mask([0, 5, 16, 17]),   # step 1 overlap only (17 is future); step 2 both
    "i3": block_mask([0, 255]),         # nothing
    "i4": block_mask([3, 20]),          # step 0 overlap only; step 5 both
    "i5": block_mask([17]),             # step 2 both
}
EXPECTED = {
    ("disjoint", 0): [0], ("overlap", 0): [0, 2, 4],
    ("disjoint", 1): [1], ("overlap", 1): [1, 2],
    ("disjoint", 2): [2, 5], ("overlap", 2): [2, 5],
    ("disjoint", 5): [4], ("overlap", 5): [4],
}


@pytest.fixture
def voc(tmp_path):
    make_voc_tree(tmp_path / "data", MASKS)
    return build_dataset("voc", tmp_path / "data", "train")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _count_reads(monkeypatch) -> list[str]:
    """Record every mask read by the presence scan (in this process)."""
    calls: list[str] = []
    original = io.read_mask_and_counts

    def counting(path, num_classes, **kw):
        calls.append(os.path.basename(path))
        return original(path, num_classes, **kw)

    monkeypatch.setattr(io, "read_mask_and_counts", counting)
    return calls


def _forbid_reads(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a mask was read although the cache should have answered")

    monkeypatch.setattr(io, "read_mask_and_counts", fail)


def test_class_presence(voc, cache):
    presence = class_presence(voc, cache_dir=cache, progress=False)
    assert presence == [frozenset(v) for v in ({0, 15}, {0, 16, 255}, {0, 5, 16, 17}, {0, 255}, {3, 20}, {17})]


@pytest.mark.parametrize("mode", ["disjoint", "overlap"])
def test_step_indices_match_hand_computed(voc, cache, mode):
    task = get_task("voc", "15-1")
    for step in (0, 1, 2, 5):
        got = step_image_indices(voc, task, step, mode, cache_dir=cache, progress=False)
        assert got == EXPECTED[(mode, step)], (mode, step)


def test_parallel_scan_matches_serial(voc, tmp_path):
    serial = class_presence(voc, cache_dir=tmp_path / "a", progress=False)
    parallel = class_presence(voc, workers=2, cache_dir=tmp_path / "b", progress=False)
    assert serial == parallel


def test_caches_are_reused(voc, cache, monkeypatch):
    task = get_task("voc", "15-1")
    calls = _count_reads(monkeypatch)
    first = step_image_indices(voc, task, 1, "overlap", cache_dir=cache, progress=False)
    assert sorted(calls) == sorted(f"{i}.png" for i in MASKS)  # each mask read exactly once
    _forbid_reads(monkeypatch)
    assert class_presence(voc, cache_dir=cache, progress=False)[1] == frozenset({0, 16, 255})
    assert step_image_indices(voc, task, 1, "overlap", cache_dir=cache, progress=False) == first
    # Another task or mode reuses the presence cache but gets its own lists.
    assert step_image_indices(voc, task, 1, "disjoint", cache_dir=cache, progress=False) == [1]
    assert step_image_indices(voc, get_task("voc", "15-5"), 1, "overlap", cache_dir=cache,
                              progress=False) == [1, 2, 4, 5]
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))  # atomic writes left nothing behind


def test_modified_mask_invalidates_the_cache(voc, cache, monkeypatch):
    task = get_task("voc", "15-1")
    assert step_image_indices(voc, task, 1, "disjoint", cache_dir=cache, progress=False) == [1]
    path = voc.masks[3]
    io.write_mask_png(path, block_mask([0, 16]))  # i3 now shows the new class
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    calls = _count_reads(monkeypatch)
    assert step_image_indices(voc, task, 1, "disjoint", cache_dir=cache, progress=False) == [1, 3]
    assert len(calls) == len(MASKS)


def test_changed_list_invalidates_the_cache(voc, cache, monkeypatch):
    task = get_task("voc", "15-1")
    step_image_indices(voc, task, 1, "overlap", cache_dir=cache, progress=False)
    sub = voc.subset([2, 1])
    calls = _count_reads(monkeypatch)
    assert step_image_indices(sub, task, 1, "overlap", cache_dir=cache, progress=False) == [0, 1]
    assert sorted(calls) == ["i1.png", "i2.png"]


def test_custom_order_changes_the_lists(voc, cache):
    order = list(range(21))
    order[16], order[17] = 17, 16  # learn 17 before 16
    shuffled = get_task("voc", "15-1", order=order)
    assert step_image_indices(voc, shuffled, 1, "disjoint", cache_dir=cache, progress=False) == [5]
    assert step_image_indices(voc, get_task("voc", "15-1"), 1, "disjoint", cache_dir=cache, progress=False) == [1]


def test_corrupt_cache_is_recomputed(voc, cache):
    class_presence(voc, cache_dir=cache, progress=False)
    for f in cache.glob("presence-*.json"):
        f.write_text("{not json")
    with pytest.warns(UserWarning, match="recomputing"):
        assert class_presence(voc, cache_dir=cache, progress=False)[0] == frozenset({0, 15})


def test_default_cache_dir_from_environment(voc, tmp_path, monkeypatch):
    monkeypatch.setenv("ILSEG_CACHE", str(tmp_path / "envcache"))
    class_presence(voc, progress=False)
    assert len(list((tmp_path / "envcache").glob("presence-voc-*.json"))) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_mask_values_name_the_file(voc, cache, workers):
    io.write_mask_png(voc.masks[4], block_mask([0, 42]))
    with pytest.raises(IlsegError, match=r"i4\.png has label values 42"):
        class_presence(voc, workers=workers, cache_dir=cache, progress=False)


def test_rgb_and_corrupt_masks_name_the_file(voc, cache):
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc.masks[0])
    with pytest.raises(IlsegError, match=r"i0\.png.*index PNG"):
        class_presence(voc, cache_dir=cache, progress=False)
    voc.masks[0].write_bytes(b"\x89PNG broken")
    with pytest.raises(IlsegError, match=r"i0\.png"):
        class_presence(voc, cache_dir=cache, progress=False)
    voc.masks[0].unlink()
    with pytest.raises(IlsegError, match=r"i0\.png does not exist"):
        class_presence(voc, cache_dir=cache, progress=False)


def test_wrong_dataset_or_mode(voc, cache):
    with pytest.raises(IlsegError, match="does not belong"):
        step_image_indices(voc, get_task("synth", "6-4"), 1, "overlap", cache_dir=cache)
    with pytest.raises(IlsegError, match="unknown mode"):
        step_image_indices(voc, get_task("voc", "15-1"), 1, "both", cache_dir=cache)  # type: ignore[arg-type]


# -- index files ----------------------------------------------------------------------
def test_index_files_in_every_format(voc, tmp_path, cache):
    task = get_task("voc", "15-1")
    np.save(tmp_path / "step1.npy", np.array([4, 0, 2], dtype=np.int64))
    (tmp_path / "step1.txt").write_text("i4\ni0\n\ni2\n")
    (tmp_path / "step1.json").write_text(json.dumps([4, "i0", 2]))
    for name in ("step1.npy", "step1.txt", "step1.json"):
        got = step_image_indices(voc, task, 1, "overlap", cache_dir=cache, index_file=tmp_path / name)
        assert got == [4, 0, 2], name


@pytest.mark.parametrize("name, content, message", [
    ("range.npy", np.array([0, 6]), r"range\.npy, entry 2: index 6 is out of range"),
    ("neg.npy", np.array([-1]), r"neg\.npy, entry 1: index -1"),
    ("float.npy", np.array([0.5]), r"float\.npy must hold a 1-D integer array"),
    ("twod.npy", np.zeros((2, 2), np.int64), r"twod\.npy must hold a 1-D integer array"),
    ("dup.npy", np.array([1, 1]), r"dup\.npy lists some images more than once"),
    ("ids.txt", "i0\nnope\n", r"ids\.txt, entry 2: image id 'nope'"),
    ("bad.json", '{"a": 1}', r"bad\.json must hold a JSON list"),
    ("broken.json", "[1, 2", r"cannot read index file .*broken\.json"),
    ("junk.npy", b"not numpy", r"cannot read index file .*junk\.npy"),
    ("empty.txt", "", r"empty\.txt is empty"),
])
def test_bad_index_files(voc, tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(IlsegError, match=message):
        load_index_file(path, voc)


def test_missing_index_file(voc, tmp_path):
    with pytest.raises(IlsegError, match=r"gone\.npy does not exist"):
        load_index_file(tmp_path / "gone.npy", voc)


# -- report ---------------------------------------------------------------------------
def test_split_report(voc, cache, monkeypatch):
    task = get_task("voc", "15-1")
    report = split_report(voc, task, "disjoint", cache_dir=cache, progress=False)
    assert report["dataset"] == "voc" and report["task"] == "15-1" and report["overlap"] is False
    assert report["total_images"] == 6
    assert [s["count"] for s in report["steps"]] == [1, 1, 2, 0, 0, 1]
    assert report["steps"][1]["classes"] == ["pottedplant"]
    assert all(s["published"] is None and s["match"] is None for s in report["steps"])
    # On the full train_aug list (faked here by its size) the published counts are compared;
    # the alias 15-5s is recognised by its classes.
    monkeypatch.setattr(splits, "VOC_TRAIN_AUG_SIZE", 6)
    report = split_report(voc, get_task("voc", "15-5s"), "overlap", cache_dir=cache, progress=False)
    assert [s["published"] for s in report["steps"]] == [9568, 487, 299, 491, 500, 548]
    assert all(s["match"] is False for s in report["steps"])


def test_published_counts_table():
    assert PUBLISHED_COUNTS[("19-1", "disjoint")] == (10034, 548)
    assert PUBLISHED_COUNTS[("15-5", "overlap")] == (9568, 2145)
    assert PUBLISHED_COUNTS[("15-1", "disjoint")] == (8437, 378, 299, 420, 500, 548)
    for (name, _), counts in PUBLISHED_COUNTS.items():
        assert len(counts) == get_task("voc", name).num_steps
