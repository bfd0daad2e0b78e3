"""Segmentation datasets: PASCAL VOC(-aug), ADE20k and the synthetic benchmark.

A :class:`SegmentationDataset` is a list of (image, mask) file pairs plus what
turns them into training tensors: the dataset's number of classes (to check
mask values), an optional 256-entry lookup table applied to the raw mask
*before* the geometric transform (``target = lut[mask]``, see
:func:`ilseg.tasks.train_lut`), and a joint transform
(:mod:`ilseg.data.transforms`).  It keeps only paths, so it pickles cheaply
into DataLoader workers and never holds a file open.

Layouts (docs/protocol.md#datasets)::

    VOC / synth:  <root>[/VOCdevkit/VOC2012 | /VOC2012]/
                    JPEGImages/<id>.jpg
                    SegmentationClassAug/<id>.png   (preferred) or SegmentationClass/<id>.png
                    ImageSets/Segmentation/{train_aug.txt | train.txt, val.txt}
    ADE20k:       <root>[/ADEChallengeData2016]/
                    images/{training,validation}/<id>.jpg
                    annotations/{training,validation}/<id>.png

Example::

    >>> ds = build_dataset("synth", "data/synth", "train", lut=train_lut(task, 0))
    >>> image, target = ds[0]          # float32 3xHxW, int64 HxW
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ilseg.data import io
from ilseg.data.transforms import JointTransform, eval_transform
from ilseg.errors import IlsegError
from ilseg.tasks import class_names

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]

SPLITS = ("train", "val")

_VOC_LISTS: dict[str, tuple[str, ...]] = {"train": ("train_aug.txt", "train.txt"), "val": ("val.txt",)}
_VOC_MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
_ADE_FOLDERS = {"train": "training", "val": "validation"}
_SYNTH_FIX = "run `ilseg data synth --out DIR` to generate it and pass DIR as the root"
_VOC_LAYOUT = (
    "expected JPEGImages/, SegmentationClassAug/ (or SegmentationClass/) and ImageSets/Segmentation/ "
    "in ROOT, ROOT/VOC2012 or ROOT/VOCdevkit/VOC2012 (unpack VOCtrainval_11-May-2012.tar and SBD's "
    "benchmark.tgz, then run `ilseg data prepare voc --voc VOC2012_DIR --sbd SBD_DIR`; see docs/data.md)"
)
_ADE_LAYOUT = (
    "expected images/{training,validation}/*.jpg and annotations/{training,validation}/*.png "
    "in ROOT or ROOT/ADEChallengeData2016 (unpack ADEChallengeData2016.zip from the MIT Scene Parsing "
    "benchmark; see docs/data.md)"
)


class SegmentationDataset(Dataset):
    """Image/mask file pairs -> ``(image float32 3xHxW, target int64 HxW)``.

    Args:
        name: dataset name (``"voc"``, ``"ade"``, ``"synth"``); keys caches.
        images, masks: paths of the images and their masks, same length.
        num_classes: masks must hold ``0..num_classes-1`` or 255.
        ids: one id per item (file stems by default).
        lut: optional ``uint8`` array of 256 entries; ``target = lut[mask]``
            before the transform.
        transform: joint transform; by default the full image, normalised.
        root: the folder the dataset was found in (informational).
        list_file: the list file the items were read from, ``None`` for a
            folder listing (informational: commands say which list they used).

    Mask values are checked when an item is read; file existence is checked
    by the builders.
    """

    def __init__(
        self,
        *,
        name: str,
        images: Sequence[str | os.PathLike[str]],
        masks: Sequence[str | os.PathLike[str]],
        num_classes: int,
        ids: Sequence[str] | None = None,
        lut: np.ndarray | None = None,
        transform: Transform | None = None,
        root: str | os.PathLike[str] | None = None,
        list_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        self.name = name
        self.images: list[Path] = [Path(p) for p in images]
        self.masks: list[Path] = [Path(p) for p in masks]
        self.ids: list[str] = list(ids) if ids is not None else [p.stem for p in self.images]
        if len(self.ids) != len(self.images):
            raise ValueError(f"{len(self.ids)} ids for {len(self.images)} images")
        self.num_classes = int(num_classes)
        self.lut = _check_lut(lut)
        self.transform: Transform = transform if transform is not None else _DEFAULT_TRANSFORM
        self.root = Path(root) if root is not None else None
        self.list_file = Path(list_file) if list_file is not None else None
        self._decoded: dict[Path, tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(image, target)``: float32 ``3xHxW`` (ImageNet-normalised), int64 ``HxW``."""
        image, mask = self.read_raw(index)
        if self.lut is not None:
            mask = self.lut[mask]
        return self.transform(image, mask)

    def read_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The item's ``HxWx3`` uint8 image and ``HxW`` uint8 raw mask (no LUT, no transform)."""
        if self._decoded is not None and self.images[index] in self._decoded:
            return self._decoded[self.images[index]]
        image = io.read_image(self.images[index])
        pair = image, io.read_mask(self.masks[index], self.num_classes, image_size=image.shape[:2])
        if self._decoded is not None:
            for array in pair:
                array.flags.writeable = False  # shared by every later read: nothing may change it
            self._decoded[self.images[index]] = pair
        return pair

    def keep_decoded(self) -> SegmentationDataset:
        """A shallow copy that decodes each file once and keeps the arrays in memory.

        For a small set read many times by one process (the synthetic
        benchmark at ``data.workers: 0``): later epochs skip JPEG/PNG decoding.
        Copies made from it (:meth:`subset`, :meth:`with_lut`, ...) share the
        arrays.  The files are assumed not to change during the run.
        """
        other = copy.copy(self)
        other._decoded = {} if self._decoded is None else self._decoded
        return other

    def mask_path(self, index: int) -> Path:
        return self.masks[index]

    def image_path(self, index: int) -> Path:
        return self.images[index]

    def with_lut(self, lut: np.ndarray | None) -> SegmentationDataset:
        """A shallow copy applying ``lut`` (256 entries) to masks."""
        other = copy.copy(self)
        other.lut = _check_lut(lut)
        return other

    def with_transform(self, transform: Transform | None) -> SegmentationDataset:
        """A shallow copy using ``transform`` (``None``: full image, normalised)."""
        other = copy.copy(self)
        other.transform = transform if transform is not None else _DEFAULT_TRANSFORM
        return other

    def subset(self, indices: Sequence[int]) -> SegmentationDataset:
        """A dataset of the items at ``indices`` (in that order), ids kept."""
        n = len(self)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"indices {bad[:5]} out of range for a dataset of {n} items")
        other = copy.copy(self)
        other.images = [self.images[i] for i in idx]
        other.masks = [self.masks[i] for i in idx]
        other.ids = [self.ids[i] for i in idx]
        return other

    def __repr__(self) -> str:
        return (f"SegmentationDataset(name={self.name!r}, items={len(self)}, num_classes={self.num_classes}, "
                f"root={str(self.root) if self.root else None!r}, lut={'yes' if self.lut is not None else 'no'})")


class SeededItems(Dataset):
    """``dataset[i]`` read with torch's RNG seeded from ``(seed, epoch, i)``.

    The random augmentation of an item (torchvision's v2 transforms draw from
    torch's global RNG) then depends on the seed, the epoch and the item only,
    not on which process or DataLoader worker reads it or in which order: a run
    on several GPUs, with any number of workers, augments every image exactly
    as a single process does.  The caller's RNG state is restored after each
    item.  The epoch is either set with :meth:`set_epoch` (seen by DataLoader
    workers started after it) or sent with each index as an ``(epoch, index)``
    key, which is what lets the engine keep its workers alive between epochs
    (``persistent_workers=True``): a worker's copy of ``epoch`` may be stale,
    the key never is.

    Example::

        >>> items = SeededItems(train_set, seed=42)
        >>> items.set_epoch(3)
        >>> torch.equal(items[5][0], items[(3, 5)][0])
        True
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_seed(self, index: int, epoch: int | None = None) -> int:
        """A 64-bit seed mixed from ``(seed, epoch, index)`` (no two items share a stream)."""
        words = [self.seed & 0xFFFF_FFFF_FFFF_FFFF, self.epoch if epoch is None else epoch, int(index)]
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        rng = torch.default_generator  # the CPU generator only (torch.manual_seed costs ~100x more)
        saved = rng.get_state()
        rng.manual_seed(self.item_seed(index, epoch))
        try:
            return self.dataset[index]
        finally:
            rng.set_state(saved)


_DEFAULT_TRANSFORM: JointTransform = eval_transform(None)


def _check_lut(lut: np.ndarray | None) -> np.ndarray | None:
    if lut is None:
        return None
    arr = np.asarray(lut)
    if arr.shape != (256,):
        raise ValueError(f"a label lookup table needs 256 entries, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError("lookup table values must lie in 0..255")
        arr = arr.astype(np.uint8)
    return arr


# -- list files ------------------------------------------------------------------
def _read_list(path: Path) -> list[list[str]]:
    """Non-empty lines of a list file, split on whitespace; ``#`` starts a comment."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise IlsegError(f"list file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IlsegError(f"cannot read list file {path} ({exc})") from None
    rows = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append(line.split())
    return rows


def _pairs_from_list(
    rows: list[list[str]], list_path: Path, base: Path, image_for: Callable[[str], Path],
    mask_for: Callable[[str], Path],
) -> tuple[list[Path], list[Path], list[str]]:
    """Turn list rows (``id`` or ``image mask`` pairs relative to ``base``) into paths."""
    images, masks, ids = [], [], []
    for n, row in enumerate(rows, 1):
        if len(row) == 1:
            item = Path(row[0]).stem if "/" in row[0] or row[0].endswith(".jpg") else row[0]
            images.append(image_for(item))
            masks.append(mask_for(item))
            ids.append(item)
        elif len(row) == 2:
            images.append(base / row[0].lstrip("/"))
            masks.append(base / row[1].lstrip("/"))
            ids.append(Path(row[0]).stem)
        else:
            raise IlsegError(
                f"list file {list_path}, line {n}: expected an image id or an 'image mask' pair, got {' '.join(row)!r}"
            )
    return images, masks, ids


def _check_exist(images: list[Path], masks: list[Path], source: str, fix: str) -> None:
    """Raise one IlsegError naming the missing files (a cheap stat per file)."""
    missing = [p for pair in zip(images, masks) for p in pair if not p.is_file()]
    folders = [p for p in missing if p.is_dir()]
    if folders:
        more = f" (and {len(folders) - 1} more)" if len(folders) > 1 else ""
        raise IlsegError(f"{source} names {folders[0]}{more}, which is a folder, not a file: an image or mask file "
                         f"belongs there; put the file in its place, or {fix}")
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise IlsegError(f"{source} names files that do not exist: {shown}{more}; {fix}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise IlsegError(f"unknown split {split!r}; use 'train' or 'val'")


def _check_root(root: Path, fix: str) -> None:
    if not root.exists():
        raise IlsegError(f"dataset root {root} does not exist; {fix}")
    if not root.is_dir():
        raise IlsegError(f"dataset root {root} is not a folder; {fix}")


# -- VOC layout (VOC-aug and the synthetic dataset) --------------------------------
def find_voc_root(root: str | os.PathLike[str], *, fix: str = _VOC_LAYOUT) -> Path:
    """The folder holding ``JPEGImages/``: ``root``, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    root = Path(root).expanduser()
    _check_root(root, fix)
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for cand in candidates:
        if (cand / "JPEGImages").is_dir():
            return cand
    searched = ", ".join(str(c) for c in candidates)
    raise IlsegError(f"no JPEGImages/ folder found in {searched}; {fix}")


@dataclasses.dataclass(frozen=True)
class SplitFiles:
    """Where a split's items come from, resolved from the tree without opening any file.

    Attributes:
        base: the folder the paths are relative to (``VOC2012`` or ``ADEChallengeData2016``).
        list_file: the list file read; ``None`` when ADE20k's images folder was listed.
        source: ``"list file PATH"`` or ``"folder PATH"``, for messages.
        images, masks, ids: one entry per item; the files may not exist.
        mask_dirs: the mask folders searched, in order of preference.
    """

    base: Path
    list_file: Path | None
    source: str
    images: list[Path]
    masks: list[Path]
    ids: list[str]
    mask_dirs: tuple[Path, ...]


def voc_split_files(
    name: str, root: str | os.PathLike[str], split: str, *, list_file: str | os.PathLike[str] | None = None,
) -> SplitFiles:
    """The items of a VOC-layout split: list file (``train_aug.txt``, else ``train.txt``), images, masks.

    Each mask is taken from ``SegmentationClassAug/`` when there, else from
    ``SegmentationClass/``; a mask in neither is named in the first folder.

    Raises:
        IlsegError: no ``JPEGImages/``, no list file, no mask folder, a malformed list line.
    """
    _check_split(split)
    fix = _SYNTH_FIX if name == "synth" else _VOC_LAYOUT
    base = find_voc_root(root, fix=fix)
    if list_file is not None:
        list_path = Path(list_file).expanduser()
        if not list_path.is_file():
            raise IlsegError(f"list file {list_path} does not exist; give an existing list of image ids")
    else:
        list_dir = base / "ImageSets" / "Segmentation"
        options = [list_dir / f for f in _VOC_LISTS[split]]
        found = [p for p in options if p.is_file()]
        if not found:
            names = " or ".join(str(p) for p in options)
            raise IlsegError(f"no {split} list: {names} does not exist; {fix}")
        list_path = found[0]
    mask_dirs = tuple(base / d for d in _VOC_MASK_DIRS if (base / d).is_dir())
    if not mask_dirs:
        raise IlsegError(f"no mask folder SegmentationClassAug/ or SegmentationClass/ in {base}; {fix}")

    def mask_for(item: str) -> Path:
        for d in mask_dirs:
            path = d / f"{item}.png"
            if path.is_file():
                return path
        return mask_dirs[0] / f"{item}.png"  # missing: reported by the caller

    rows = _read_list(list_path)
    images, masks, ids = _pairs_from_list(rows, list_path, base, lambda i: base / "JPEGImages" / f"{i}.jpg", mask_for)
    return SplitFiles(base=base, list_file=list_path, source=f"list file {list_path}", images=images, masks=masks,
                      ids=ids, mask_dirs=mask_dirs)


def voc_layout(
    name: str,
    root: str | os.PathLike[str],
    split: str,
    *,
    list_file: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
    lut: np.ndarray | None = None,
) -> SegmentationDataset:
    """A dataset in the VOC layout (``name`` is ``"voc"`` or ``"synth"``; see the module docstring).

    List lines may be ids (``2007_000032``) or MiB-style pairs
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``,
    relative to the VOC2012 folder).  Each mask is taken from
    ``SegmentationClassAug/`` when there, else from ``SegmentationClass/``.
    """
    fix = _SYNTH_FIX if name == "synth" else _VOC_LAYOUT
    files = voc_split_files(name, root, split, list_file=list_file)
    if not files.images:
        raise IlsegError(f"list file {files.list_file} is empty; {fix}")
    _check_exist(files.images, files.masks, files.source, fix)
    return SegmentationDataset(name=name, images=files.images, masks=files.masks, ids=files.ids,
                               num_classes=len(class_names(name)), lut=lut, transform=transform, root=files.base,
                               list_file=files.list_file)


# -- ADE20k ------------------------------------------------------------------------
def find_ade_root(root: str | os.PathLike[str]) -> Path:
    """The ``ADEChallengeData2016`` folder: ``root`` itself or ``root/ADEChallengeData2016``."""
    root = Path(root).expanduser()
    _check_root(root, _ADE_LAYOUT)
    candidates = [root, root / "ADEChallengeData2016"]
    for cand in candidates:
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    searched = ", ".join(str(c) for c in candidates)
    raise IlsegError(f"no images/ and annotations/ folders found in {searched}; {_ADE_LAYOUT}")


def ade_split_files(
    root: str | os.PathLike[str], split: str, *, list_file: str | os.PathLike[str] | None = None,
) -> SplitFiles:
    """The items of an ADE20k split: every ``*.jpg`` of ``images/<folder>/`` (sorted), or a list file's.

    Raises:
        IlsegError: no ``ADEChallengeData2016`` tree, a missing split folder, a malformed list line.
    """
    _check_split(split)
    base = find_ade_root(root)
    folder = _ADE_FOLDERS[split]
    image_dir, mask_dir = base / "images" / folder, base / "annotations" / folder
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise IlsegError(f"ADE20k folder {d} does not exist; {_ADE_LAYOUT}")
    list_path: Path | None = None
    if list_file is not None:
        list_path = Path(list_file).expanduser()
        rows = _read_list(list_path)
        images, masks, ids = _pairs_from_list(
            rows, list_path, base, lambda i: image_dir / f"{i}.jpg", lambda i: mask_dir / f"{i}.png"
        )
        source = f"list file {list_path}"
    else:
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        masks = [mask_dir / f"{p.stem}.png" for p in images]
        ids = [p.stem for p in images]
        source = f"folder {image_dir}"
    return SplitFiles(base=base, list_file=list_path, source=source, images=images, masks=masks, ids=ids,
                      mask_dirs=(mask_dir,))


def ade20k(
    root: str | os.PathLike[str],
    split: str,
    *,
    list_file: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
    lut: np.ndarray | None = None,
) -> SegmentationDataset:
    """ADE20k SceneParsing (151 classes, 0 = "other").

    Without ``list_file`` the items are every ``*.jpg`` of
    ``images/<training|validation>/`` sorted by name.  A list file holds ids
    (``ADE_train_00000001``) or ``image mask`` pairs relative to the
    ``ADEChallengeData2016`` folder.
    """
    files = ade_split_files(root, split, list_file=list_file)
    if not files.images:
        raise IlsegError(f"{files.source} lists no images; {_ADE_LAYOUT}")
    _check_exist(files.images, files.masks, files.source, "re-download ADEChallengeData2016 or fix the list")
    return SegmentationDataset(name="ade", images=files.images, masks=files.masks, ids=files.ids,
                               num_classes=len(class_names("ade")), lut=lut, transform=transform, root=files.base,
                               list_file=files.list_file)


def split_files(
    dataset: str, root: str | os.PathLike[str], split: str, *, list_file: str | os.PathLike[str] | None = None,
) -> SplitFiles:
    """:func:`voc_split_files` or :func:`ade_split_files` for ``dataset``: what :func:`build_dataset` would read."""
    class_names(dataset)  # unknown dataset -> IlsegError
    if dataset == "ade":
        return ade_split_files(root, split, list_file=list_file)
    return voc_split_files(dataset, root, split, list_file=list_file)


def build_dataset(
    dataset: str,
    root: str | os.PathLike[str],
    split: str,
    *,
    transform: Transform | None = None,
    lut: np.ndarray | None = None,
    list_file: str | os.PathLike[str] | None = None,
) -> SegmentationDataset:
    """Build the ``split`` (``"train"``/``"val"``) of ``dataset`` (``"voc"``, ``"ade"``, ``"synth"``).

    Checks the layout and that every listed file exists; mask values are
    checked when items are read.  Raises :class:`IlsegError` with the path and
    the fix on any problem.
    """
    class_names(dataset)  # unknown dataset -> IlsegError
    if dataset == "ade":
        return ade20k(root, split, list_file=list_file, transform=transform, lut=lut)
    return voc_layout(dataset, root, split, list_file=list_file, transform=transform, lut=lut)
