"""VOC, ADE20k and synth loaders on tiny generated trees, and their errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datatrees import block_mask, make_ade_tree, make_voc_tree
from torch.utils.data import DataLoader

from ilseg.data.datasets import SegmentationDataset, build_dataset
from ilseg.data.io import read_image, write_mask_png
from ilseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    train_transform,
)
from ilseg.errors import IlsegError
from ilseg.tasks import get_task, train_lut

MASKS = {
    "a": block_mask([0, 15, 255]),
    "b": block_mask([0, 16]),
    "c": block_mask([3, 20]),
    "v": block_mask([0, 1]),
}


@pytest.fixture
def voc_root(tmp_path):
    make_voc_tree(tmp_path, MASKS, val_ids=["v"])
    return tmp_path


def test_voc_nested_root_and_items(voc_root):
    ds = build_dataset("voc", voc_root, "train")
    assert ds.name == "voc" and ds.num_classes == 21
    assert ds.ids == ["a", "b", "c"]
    assert ds.root == voc_root / "VOCdevkit" / "VOC2012"
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8)
    assert target.dtype == torch.int64 and target.shape == (8, 8)
    np.testing.assert_array_equal(target.numpy(), MASKS["a"])
    raw = read_image(ds.images[0]).astype(np.float32) / 255
    expected = (raw - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert build_dataset("voc", voc_root, "val").ids == ["v"]


@pytest.mark.parametrize("sub", [".", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_root_forms(voc_root, sub):
    assert len(build_dataset("voc", voc_root / sub, "train")) == 3


def test_voc_lut_subset_copies_and_pickle(voc_root):
    ds = build_dataset("voc", voc_root, "train")
    task = get_task("voc", "15-1")
    stepped = ds.with_lut(train_lut(task, 1))
    assert ds.lut is None
    np.testing.assert_array_equal(stepped[0][1].numpy(), np.where(MASKS["a"] == 15, 0, MASKS["a"]))
    np.testing.assert_array_equal(stepped[1][1].numpy(), MASKS["b"])
    sub = stepped.subset([2, 0])
    assert sub.ids == ["c", "a"] and len(sub) == 2 and len(stepped) == 3
    assert sub.mask_path(0).name == "c.png"
    resized = sub.with_transform(eval_transform(4))
    assert resized[0][0].shape == (3, 4, 4) and sub[0][0].shape == (3, 8, 8)
    clone = pickle.loads(pickle.dumps(resized))
    torch.testing.assert_close(clone[1][1], resized[1][1])
    with pytest.raises(IndexError):
        ds.subset([3])


def test_dataloader_with_worker_processes(voc_root):
    ds = build_dataset("voc", voc_root, "train", transform=train_transform(6))
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(2, 3, 6, 6), (1, 3, 6, 6)]
    assert batches[0][1].dtype == torch.int64
    assert set(torch.cat([b[1].flatten() for b in batches]).tolist()) <= {0, 3, 15, 16, 20, 255}


def test_voc_grayscale_masks_segmentationclass_fallback_and_train_txt(tmp_path):
    make_voc_tree(tmp_path, MASKS, nested=False, mask_dir="SegmentationClass", train_list="train.txt",
                  gray=True, val_ids=["v"])
    ds = build_dataset("voc", tmp_path, "train")
    assert ds.masks[0].parent.name == "SegmentationClass"
    np.testing.assert_array_equal(ds[2][1].numpy(), MASKS["c"])


def test_voc_aug_preferred_over_segmentationclass(voc_root):
    base = voc_root / "VOCdevkit" / "VOC2012"
    (base / "SegmentationClass").mkdir()
    (base / "SegmentationClass" / "a.png").write_bytes(b"")
    ds = build_dataset("voc", voc_root, "train")
    assert {p.parent.name for p in ds.masks} == {"SegmentationClassAug"}


def test_voc_mib_style_list_lines(tmp_path):
    make_voc_tree(tmp_path, MASKS, mib_lines=True, val_ids=["v"])
    ds = build_dataset("voc", tmp_path, "train")
    assert ds.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(ds[1][1].numpy(), MASKS["b"])


def test_voc_explicit_list_file(voc_root, tmp_path):
    (tmp_path / "mine.txt").write_text("c\n\n# a comment\nv\n")
    ds = build_dataset("voc", voc_root, "train", list_file=tmp_path / "mine.txt")
    assert ds.ids == ["c", "v"]


def test_voc_errors(voc_root, tmp_path):
    with pytest.raises(IlsegError, match=r"missing does not exist"):
        build_dataset("voc", tmp_path / "missing", "train")
    (tmp_path / "wrong").mkdir()
    with pytest.raises(IlsegError, match=r"no JPEGImages/ folder found in .*wrong.*VOCdevkit"):
        build_dataset("voc", tmp_path / "wrong", "train")
    with pytest.raises(IlsegError, match="unknown split"):
        build_dataset("voc", voc_root, "test")
    with pytest.raises(IlsegError, match="unknown dataset"):
        build_dataset("coco", voc_root, "train")
    lists = voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    with open(lists / "train_aug.txt", "a") as f:
        f.write("ghost\n")
    with pytest.raises(IlsegError, match=r"train_aug\.txt names files that do not exist: .*ghost\.jpg"):
        build_dataset("voc", voc_root, "train")
    (lists / "val.txt").unlink()
    with pytest.raises(IlsegError, match=r"val\.txt does not exist"):
        build_dataset("voc", voc_root, "val")


def test_synth_errors_say_how_to_generate(tmp_path):
    with pytest.raises(IlsegError, match="ilseg data synth --out"):
        build_dataset("synth", tmp_path / "none", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IlsegError, match="ilseg data synth --out"):
        build_dataset("synth", tmp_path / "empty", "train")


def test_bad_files_fail_on_read_with_the_file_name(voc_root):
    base = voc_root / "VOCdevkit" / "VOC2012"
    ds = build_dataset("voc", voc_root, "train")
    (base / "JPEGImages" / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(IlsegError, match=r"b\.jpg"):
        ds[1]
    write_mask_png(base / "SegmentationClassAug" / "c.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(IlsegError, match=r"c\.png is 9x8"):
        ds[2]
    write_mask_png(base / "SegmentationClassAug" / "a.png", block_mask([0, 21]))
    with pytest.raises(IlsegError, match=r"a\.png has label values 21"):
        ds[0]
    assert isinstance(ds, SegmentationDataset)


# -- ADE20k --------------------------------------------------------------------------
ADE_TRAIN = {"ADE_train_00000002": block_mask([0, 150]), "ADE_train_00000001": block_mask([1, 2])}
ADE_VAL = {"ADE_val_00000001": block_mask([0, 100])}


def test_ade_folder_listing_both_root_forms(tmp_path):
    base = make_ade_tree(tmp_path, ADE_TRAIN, ADE_VAL)
    for root in (tmp_path, base):
        ds = build_dataset("ade", root, "train")
        assert ds.num_classes == 151 and ds.name == "ade"
        assert ds.ids == ["ADE_train_00000001", "ADE_train_00000002"]  # sorted
    np.testing.assert_array_equal(ds[1][1].numpy(), ADE_TRAIN["ADE_train_00000002"])
    assert build_dataset("ade", tmp_path, "val").ids == ["ADE_val_00000001"]


def test_ade_list_file(tmp_path):
    make_ade_tree(tmp_path, ADE_TRAIN, ADE_VAL)
    (tmp_path / "list.txt").write_text(
        "ADE_train_00000002\nimages/training/ADE_train_00000001.jpg annotations/training/ADE_train_00000001.png\n"
    )
    ds = build_dataset("ade", tmp_path, "train", list_file=tmp_path / "list.txt")
    assert ds.ids == ["ADE_train_00000002", "ADE_train_00000001"]
    np.testing.assert_array_equal(ds[1][1].numpy(), ADE_TRAIN["ADE_train_00000001"])


def test_ade_errors(tmp_path):
    base = make_ade_tree(tmp_path, ADE_TRAIN, ADE_VAL)
    with pytest.raises(IlsegError, match="ADEChallengeData2016"):
        build_dataset("ade", tmp_path / "ADEChallengeData2016" / "images", "train")
    (base / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(IlsegError, match=r"ADE_train_00000001\.png"):
        build_dataset("ade", tmp_path, "train")
    (tmp_path / "bad_list.txt").write_text("a b c\n")
    with pytest.raises(IlsegError, match=r"bad_list\.txt, line 1"):
        build_dataset("ade", tmp_path, "val", list_file=tmp_path / "bad_list.txt")


def test_kept_decoded_items_equal_read_ones_and_are_shared(tmp_path):
    from ilseg.data import io as data_io

    root = make_voc_tree(tmp_path, {f"i{k}": block_mask([0, k + 1]) for k in range(3)}, nested=False)
    plain = build_dataset("voc", root, "train")
    kept = plain.keep_decoded()
    reads: list[str] = []
    real = data_io.read_image

    def counting(path, **kwargs):
        reads.append(Path(path).stem)
        return real(path, **kwargs)

    data_io.read_image = counting
    try:
        first = [kept[i] for i in range(3)]
        again = [kept.subset([2, 1, 0]).with_lut(None)[j] for j in range(3)]  # copies share the arrays
    finally:
        data_io.read_image = real
    assert reads == ["i0", "i1", "i2"]  # each file decoded once
    for i in range(3):
        x, y = plain[i]
        assert torch.equal(first[i][0], x) and torch.equal(first[i][1], y)
        assert torch.equal(again[2 - i][0], x) and torch.equal(again[2 - i][1], y)
    image, mask = kept.read_raw(0)
    assert not image.flags.writeable and not mask.flags.writeable
