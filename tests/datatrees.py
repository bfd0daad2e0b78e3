"""Helpers for the data tests: tiny VOC- and ADE20k-layout trees written to a temporary folder."""

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
