"""Helpers for the data tests: tiny VOC- and ADE20k-layout trees written to a temporary folder, and
the VOC 2012 and SBD trees as their archives unpack (for ``ilseg data prepare``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ilseg.data.io import write_mask_png


def label_image(mask: np.ndarray) -> np.ndarray:
    """An ``HxWx3`` uint8 image whose colour encodes the label: (10*l mod 256, 255 - 10*l mod 256, 77)."""
    m = mask.astype(np.int64)
    return np.stack([(10 * m) % 256, (255 - 10 * m) % 256, np.full_like(m, 77)], axis=-1).astype(np.uint8)


def block_mask(values: Sequence[int], size: int = 8) -> np.ndarray:
    """A ``size x size`` mask split into vertical bands, one per value."""
    mask = np.zeros((size, size), dtype=np.uint8)
    bands = np.array_split(np.arange(size), max(1, len(values)))
    for value, cols in zip(values, bands):
        mask[:, cols] = value
    return mask


def write_pair(image_path: Path, mask_path: Path, mask: np.ndarray, *, gray: bool = False) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label_image(mask)).save(image_path, quality=95)
    if gray:
        Image.fromarray(mask).save(mask_path)  # mode "L"
    else:
        write_mask_png(mask_path, mask)


def make_voc_tree(
    root: Path,
    masks: Mapping[str, np.ndarray],
    *,
    nested: bool = True,
    mask_dir: str = "SegmentationClassAug",
    train_list: str = "train_aug.txt",
    val_ids: Sequence[str] = (),
    mib_lines: bool = False,
    gray: bool = False,
) -> Path:
    """Write a VOC-layout tree; returns the folder holding JPEGImages/.

    ``masks`` maps ids to masks; ids not in ``val_ids`` go to the train list.
    """
    base = root / "VOCdevkit" / "VOC2012" if nested else root
    for item, mask in masks.items():
        write_pair(base / "JPEGImages" / f"{item}.jpg", base / mask_dir / f"{item}.png", mask, gray=gray)
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)

    def line(item: str) -> str:
        return f"/JPEGImages/{item}.jpg /{mask_dir}/{item}.png" if mib_lines else item

    train = [i for i in masks if i not in val_ids]
    (lists / train_list).write_text("".join(f"{line(i)}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{line(i)}\n" for i in val_ids))
    return base


def make_ade_tree(root: Path, train: Mapping[str, np.ndarray], val: Mapping[str, np.ndarray]) -> Path:
    """Write an ``ADEChallengeData2016`` tree under ``root``; returns that folder."""
    base = root / "ADEChallengeData2016"
    for folder, items in (("training", train), ("validation", val)):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for item, mask in items.items():
            write_pair(base / "images" / folder / f"{item}.jpg",
                       base / "annotations" / folder / f"{item}.png", mask, gray=True)
    return base


def bordered(mask: np.ndarray) -> np.ndarray:
    """``mask`` with a one-pixel 255 frame, as VOC's own SegmentationClass masks have around objects."""
    out = mask.copy()
    out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = 255
    return out


def make_voc_download(
    root: Path, train: Mapping[str, np.ndarray], val: Mapping[str, np.ndarray], extra_images: Sequence[str] = (),
    *, size: int = 8,
) -> Path:
    """A ``VOCdevkit/VOC2012`` tree as VOCtrainval_11-May-2012.tar unpacks (no SegmentationClassAug, no train_aug).

    ``train`` / ``val``: VOC's own masks (``SegmentationClass/``, listed in
    ``train.txt`` / ``val.txt``); ``extra_images``: ids with a JPEG only (the
    images SBD annotates and VOC does not).  Returns the ``VOC2012`` folder.
    """
    base = root / "VOCdevkit" / "VOC2012"
    for item, mask in {**train, **val}.items():
        write_pair(base / "JPEGImages" / f"{item}.jpg", base / "SegmentationClass" / f"{item}.png", mask)
    for item in extra_images:
        (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_image(np.zeros((size, size), np.uint8))).save(base / "JPEGImages" / f"{item}.jpg")
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return base


def write_sbd_mat(path: Path, mask: np.ndarray) -> None:
    """An SBD class annotation: a struct ``GTcls`` whose ``Segmentation`` field is the ``uint8`` mask."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.array(sorted(set(np.unique(mask).tolist()) - {0}), dtype=np.uint8)
    savemat(path, {"GTcls": {"Segmentation": mask.astype(np.uint8), "CategoriesPresent": present}})


def make_sbd(root: Path, train: Mapping[str, np.ndarray], val: Mapping[str, np.ndarray]) -> Path:
    """``benchmark_RELEASE/dataset`` as SBD's benchmark.tgz unpacks: ``cls/<id>.mat``, ``train.txt``, ``val.txt``.

    Returns the ``dataset`` folder.
    """
    dataset = root / "benchmark_RELEASE" / "dataset"
    for item, mask in {**train, **val}.items():
        write_sbd_mat(dataset / "cls" / f"{item}.mat", mask)
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return dataset
