"""Reading and writing images and label masks, with the checks users need.

Images are returned as ``HxWx3`` ``uint8`` RGB arrays, masks as ``HxW``
``uint8`` arrays of dataset class ids (255 = ignore).  Masks must be 8-bit
*index* PNGs: palette (``"P"``) images, whose palette indices are the labels,
or grayscale (``"L"``) images.  Colour (RGB) masks are rejected rather than
guessed at.

Every problem a user can fix (missing, unreadable or corrupt file, RGB mask,
wrong size, label out of range) raises :class:`~ilseg.errors.IlsegError`
naming the file and saying what to do.

Example::

    >>> mask = np.zeros((4, 5), np.uint8); mask[1:3, 1:4] = 7
    >>> write_mask_png(tmp / "m.png", mask)
    >>> read_mask(tmp / "m.png", num_classes=21).max()
    7
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from ilseg.errors import IlsegError
from ilseg.tasks import IGNORE_INDEX

_MASK_MODES = ("P", "L")


def _voc_palette() -> tuple[int, ...]:
    """Build the VOC colour map: bit ``3k + j`` of class ``c`` sets bit ``7 - k`` of channel ``j``."""
    colours: list[int] = []
    for c in range(256):
        rgb = [0, 0, 0]
        value = c
        for k in range(8):
            for j in range(3):
                rgb[j] |= ((value >> j) & 1) << (7 - k)
            value >>= 3
        colours.extend(rgb)
    return tuple(colours)


_VOC_PALETTE = _voc_palette()
_VOC_PALETTE_ARRAY = np.asarray(_VOC_PALETTE, dtype=np.uint8).reshape(256, 3)


# Colours that replace VOC's for one dataset, where a class would otherwise be drawn almost as dark as the
# background: the synthetic set's "star" (class 8) would get VOC's (64, 0, 0), its cat, on black.  VOC's own
# palette stays VOC's (ADE20k is drawn in it too); the mask files keep VOC's palette whatever the dataset.
_DATASET_COLOURS: dict[str, dict[int, tuple[int, int, int]]] = {"synth": {8: (255, 160, 0)}}


def dataset_colours(dataset: str) -> np.ndarray:
    """The ``256x3`` ``uint8`` colours that masks of ``dataset`` are drawn in (panels, overlays).

    VOC's colour map, with the changes of :data:`_DATASET_COLOURS`:

    >>> dataset_colours("voc")[8].tolist(), dataset_colours("synth")[8].tolist()
    ([64, 0, 0], [255, 160, 0])
    """
    colours = _VOC_PALETTE_ARRAY.copy()
    for value, rgb in _DATASET_COLOURS.get(dataset, {}).items():
        colours[value] = rgb
    return colours


def palette() -> list[int]:
    """The standard 256-entry PASCAL VOC colour map as a flat ``[r, g, b, r, g, b, ...]`` list (768 ints).

    Class 0 is black, 1 (aeroplane) is (128, 0, 0), 255 (ignore) is (224, 224, 192).
    """
    return list(_VOC_PALETTE)


def _open(path: Path, what: str, fix: str) -> Image.Image:
    """Open ``path`` lazily with PIL, turning every failure into an IlsegError."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise IlsegError(f"{what} {path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise IlsegError(f"{what} {path} is a folder, not a file; {fix}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise IlsegError(f"cannot read {what} {path} ({exc}); the file is corrupt or not an image: {fix}") from None


def _load(img: Image.Image, path: Path, what: str, fix: str) -> None:
    """Decode the pixels now, so that truncated or corrupt data fails here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise IlsegError(f"cannot decode {what} {path} ({exc}); the file is corrupt: {fix}") from None


_IMAGE_FIX = "re-download the dataset (or regenerate it with `ilseg data synth --out DIR`)"
_MASK_FIX = "re-download the dataset's annotations (or regenerate it with `ilseg data synth --out DIR`)"


# For a user's own photo (``ilseg predict``) rather than a dataset file.
PHOTO_FIX = "give a JPEG or PNG image file (check the path, or open the file in an image viewer)"


def read_image(path: str | os.PathLike[str], *, fix: str = _IMAGE_FIX) -> np.ndarray:
    """Read an image file as an ``HxWx3`` ``uint8`` RGB array.

    Palette, grayscale, RGBA, CMYK ... images are converted to RGB.  ``fix``
    is the advice given when the file cannot be read (by default: a dataset
    file, so re-download the dataset; :data:`PHOTO_FIX` for a user's photo).

    Raises:
        IlsegError: the file is missing, unreadable or corrupt.
    """
    path = Path(path)
    with _open(path, "image", fix) as img:
        _load(img, path, "image", fix)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.array(img, dtype=np.uint8)


def image_size(path: str | os.PathLike[str], what: str = "image", *, fix: str | None = None) -> tuple[int, int]:
    """``(height, width)`` from the file's header, without decoding its pixels."""
    path = Path(path)
    with _open(path, what, fix or (_IMAGE_FIX if what == "image" else _MASK_FIX)) as img:
        return img.size[1], img.size[0]


def read_mask_and_counts(
    path: str | os.PathLike[str],
    num_classes: int,
    *,
    image_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_mask` that also returns the 256-bin histogram of the mask's values.

    Returns:
        ``(mask, counts)``: the ``HxW`` ``uint8`` mask and an ``int64`` array of
        256 pixel counts, ``counts[v]`` = number of pixels of value ``v``.
    """
    path = Path(path)
    with _open(path, "mask", _MASK_FIX) as img:
        if img.mode not in _MASK_MODES:
            raise IlsegError(
                f"mask {path} is a {img.mode!r} image; masks must be 8-bit index PNGs (palette 'P' "
                "or grayscale 'L') whose pixel values are class ids, not colours: convert it, e.g. "
                "with the VOC palette, or use the SegmentationClassAug masks"
            )
        if image_size is not None:
            height, width = img.size[1], img.size[0]
            if (height, width) != tuple(image_size):
                raise IlsegError(
                    f"mask {path} is {width}x{height} (WxH) but its image is "
                    f"{image_size[1]}x{image_size[0]}; the mask does not belong to the image: "
                    "check the dataset's lists or re-download it"
                )
        _load(img, path, "mask", _MASK_FIX)
        # For "P" images np.array gives the palette indices, which are the labels.
        mask = np.array(img, dtype=np.uint8)
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [v for v in range(num_classes, IGNORE_INDEX) if counts[v]]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise IlsegError(
            f"mask {path} has label values {shown} outside 0..{num_classes - 1} and {IGNORE_INDEX} "
            "(ignore); the annotations do not match the dataset: re-download or fix them"
        )
    return mask, counts


def read_mask(
    path: str | os.PathLike[str],
    num_classes: int,
    *,
    image_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a label mask as an ``HxW`` ``uint8`` array of class ids (255 = ignore).

    Args:
        path: an 8-bit palette (``"P"``) or grayscale (``"L"``) PNG.
        num_classes: the dataset's number of classes; values must lie in
            ``0..num_classes-1`` or be 255.
        image_size: the ``(height, width)`` of the matching image, checked
            when given.

    Raises:
        IlsegError: missing/corrupt file, colour mask, wrong size, bad values.
    """
    return read_mask_and_counts(path, num_classes, image_size=image_size)[0]


def write_mask_png(path: str | os.PathLike[str] | BinaryIO, mask: np.ndarray) -> None:
    """Write an ``HxW`` ``uint8`` label mask as a palette PNG with the VOC colours (to a path or a binary file).

    The palette indices are the labels, so :func:`read_mask` gives ``mask``
    back exactly.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("mask values must lie in 0..255")
        mask = mask.astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(mask))  # mode "L"
    img.putpalette(palette())  # turns it into a "P" image with the same indices
    img.save(path if hasattr(path, "write") else Path(path), format="PNG")


def colorize(mask: np.ndarray, colours: np.ndarray | None = None) -> np.ndarray:
    """An ``HxW`` label mask as an ``HxWx3`` ``uint8`` image in ``colours`` (``256x3``; default: VOC's,
    :func:`dataset_colours` gives a dataset's)."""
    table = _VOC_PALETTE_ARRAY if colours is None else colours
    return table[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, colours: np.ndarray | None = None) -> np.ndarray:
    """Blend a label mask (VOC colours) over an image, e.g. to show predictions.

    Background (0) pixels keep the image's colour; every other label,
    including 255, is blended with weight ``alpha``.

    Args:
        image: ``HxWx3`` ``uint8`` RGB.
        mask: ``HxW`` integer labels in 0..255.
        alpha: opacity of the label colours, in [0, 1].
        colours: ``256x3`` label colours (default: VOC's; :func:`dataset_colours`).

    Returns:
        ``HxWx3`` ``uint8`` image.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(f"need an HxWx3 image and an HxW mask, got {image.shape} and {mask.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    drawn = colorize(mask, colours).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * drawn
    out = np.where((mask != 0)[..., None], blended, image.astype(np.float32))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
