"""The bundled synthetic benchmark: coloured shapes on textured backgrounds.

:func:`generate_synth` writes a small dataset in the VOC layout, so the same
loader, filters and training code run on it as on PASCAL VOC::

    <out>/JPEGImages/synth_00000.jpg          RGB, JPEG quality 95, 4:4:4
    <out>/SegmentationClassAug/synth_00000.png palette PNG (VOC colours), 0..10 and 255
    <out>/ImageSets/Segmentation/train_aug.txt, val.txt
    <out>/ilseg_synth.json                     generation parameters + format version

Classes (:data:`ilseg.tasks.SYNTH_CLASSES`): background and ten shapes - disc,
square, triangle, ring, cross, bar, diamond, star, crescent, checker.  What
makes it a fair small benchmark:

* 1-4 objects per image, random position, size (diameter 0.3 to 0.56 of the
  image side, thin shapes up to 0.73), rotation and mild aspect change; later
  objects occlude earlier ones (never hiding more than a third of one, so
  every visible object spans at least 1/5 of the image), the mask shows what
  is visible, and a 1-pixel 255 "boundary" ring surrounds visible objects as
  in VOC;
* colour narrows the class down but does not identify it: each class has
  its own hue, and every object draws its hue within +-25 degrees of it
  (with random saturation, brightness, shading and noise), while the ten
  class hues lie 36 degrees apart, so about half of each class's objects
  have a colour a neighbouring class also draws; shape decides between them.
  The hues follow the partner cycle below, so classes that co-occur also
  look alike, across the step boundaries.  The background is textured
  (smooth noise, stripes, noise, clutter lines in object colours), so
  neither colour nor texture alone segments an image;
* classes co-occur with structure: the second object of an image is, with
  probability 0.6, a "partner" of the first along the cycle
  1-7-2-8-3-9-6-10-4-5-1, whose edges mostly straddle the step boundaries
  of the 6-2-2 and 6-1 tasks, so disjoint and overlapped filters differ;
* each class appears about equally often.

Every image is rendered from its own ``numpy.random.Generator`` seeded by
``(seed, index)``, so the output is byte-identical for a seed whether it is
generated serially or in parallel.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ilseg.data.io import write_mask_png
from ilseg.errors import IlsegError, WriteError
from ilseg.fileio import atomic_write_text, check_output_folder, failure_reason, write_problem
from ilseg.tasks import IGNORE_INDEX, SYNTH_CLASSES

FORMAT_NAME = "ilseg-synth"
FORMAT_VERSION = 5  # bump whenever rendering changes: old folders then no longer match
META_FILE = "ilseg_synth.json"
NUM_CLASSES = len(SYNTH_CLASSES)

# Co-occurrence: a cycle over the ten shapes; neighbours are "partners".
_PARTNER_CYCLE = (1, 7, 2, 8, 3, 9, 6, 10, 4, 5)
PARTNERS: dict[int, tuple[int, int]] = {
    c: (_PARTNER_CYCLE[i - 1], _PARTNER_CYCLE[(i + 1) % len(_PARTNER_CYCLE)])
    for i, c in enumerate(_PARTNER_CYCLE)
}
# Colour: class hues (fractions of the hue circle) 1/10 apart in the partner
# cycle's order; an object's hue lies within _HUE_JITTER of its class's, so
# each class's hue range (50 degrees) overlaps its neighbours' by 14 degrees.
CLASS_HUES: dict[int, float] = {c: i / len(_PARTNER_CYCLE) for i, c in enumerate(_PARTNER_CYCLE)}
_HUE_JITTER = 25 / 360
_SATURATION = (0.55, 0.85)
_VALUE = (0.65, 0.95)
_NUM_OBJECTS_P = (0.35, 0.35, 0.2, 0.1)  # P(1..4 objects)
_PARTNER_P = 0.6
_RADIUS = (0.15, 0.28)  # object "radius" as a fraction of the image side
# Thin shapes cover less of their disc: draw them larger so areas stay comparable.
_RADIUS_SCALE: dict[int, float] = {3: 1.25, 6: 1.3, 7: 1.3, 8: 1.3, 9: 1.2}
_MIN_VISIBLE = 0.65  # an occluded object keeps at least this fraction of its area
_PLACEMENT_TRIES = 8


# -- shapes in local coordinates ---------------------------------------------------
def shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape ``cls`` (1..10) at local coordinates ``(u, v)``.

    The shape is centred at 0 and fits the unit disc.  Returns a bool array
    of the shape of ``u``.
    """
    rho2 = u * u + v * v
    if cls == 1:  # disc
        return rho2 <= 1.0
    if cls == 2:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if cls == 3:  # equilateral triangle inscribed in the unit circle
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= -(u * np.cos(a) + v * np.sin(a)) <= 0.5
        return inside
    if cls == 4:  # ring
        return (rho2 <= 1.0) & (rho2 >= 0.52 ** 2)
    if cls == 5:  # cross (plus sign)
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.38) & (av <= 0.95)) | ((av <= 0.38) & (au <= 0.95))
    if cls == 6:  # bar
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.38)
    if cls == 7:  # diamond (rhombus, 0.6 aspect, so not a rotated square)
        return np.abs(u) / 0.6 + np.abs(v) <= 1.0
    if cls == 8:  # five-pointed star
        phi = np.arctan2(v, u)
        radius = 0.42 + 0.58 * ((np.cos(5 * phi) + 1) / 2) ** 3
        return rho2 <= radius * radius
    if cls == 9:  # crescent
        return (rho2 <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8 ** 2)
    if cls == 10:  # checker: a square filled with a 2-tone checkerboard (see _object_colours)
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    raise ValueError(f"synthetic shape classes are 1..10, got {cls}")


# -- rendering -------------------------------------------------------------------------
def _bilinear_basis(size: int, grid: int) -> np.ndarray:
    """``size x grid`` matrix interpolating ``grid`` control values linearly over ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    basis = np.zeros((size, grid), dtype=np.float32)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = (pos - lo).astype(np.float32)
    basis[np.arange(size), lo] = 1.0 - frac
    basis[np.arange(size), lo + 1] = frac
    return basis


def _hue_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """RGB (float, 0..255) of an HSV colour; ``hue`` in turns, wrapped to [0, 1)."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A textured ``size x size x 3`` float background (before clipping)."""
    tint = _hue_rgb(rng.uniform(0, 1), 0.75, 0.85)
    grey = rng.uniform(60, 190)
    base = 0.2 * tint + 0.8 * grey
    grid = int(rng.integers(3, 7))
    basis = _bilinear_basis(size, grid)
    control = rng.normal(0.0, 28.0, size=(grid, grid, 3)).astype(np.float32)
    smooth = np.stack([basis @ control[:, :, c] @ basis.T for c in range(3)], axis=-1)
    img = base + smooth
    if rng.random() < 0.5:  # stripes
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.25) * size
        stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
        img += (rng.uniform(6, 18) * stripes)[..., None]
    for _ in range(int(rng.integers(0, 3))):  # clutter lines in object colours, labelled background
        p0 = rng.uniform(0, size, 2)
        p1 = rng.uniform(0, size, 2)
        d = p1 - p0
        t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
        dist2 = (xx - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2
        width = rng.uniform(0.6, 1.4) * size / 64
        colour = _hue_rgb(rng.uniform(0, 1), rng.uniform(*_SATURATION), rng.uniform(*_VALUE))
        img[dist2 <= width * width] = colour
    img += rng.normal(0.0, 8.0, size=img.shape).astype(np.float32)
    return img


def _object_colours(
    rng: np.random.Generator, cls: int, u: np.ndarray, v: np.ndarray, shading: np.ndarray,
) -> np.ndarray:
    """Colours (``...x3`` float) of the pixels of an object at local coordinates ``(u, v)``."""
    hue = CLASS_HUES[cls] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)
    colour = _hue_rgb(hue, rng.uniform(*_SATURATION), rng.uniform(*_VALUE)) + rng.normal(0.0, 8.0, size=3)
    pixels = np.broadcast_to(colour, (*u.shape, 3)) + shading[..., None]
    if cls == 10:
        cell = 0.82 / 2
        dark = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(bool)
        pixels = np.where(dark[..., None], pixels * 0.45, pixels)
    return pixels + rng.normal(0.0, 10.0, size=pixels.shape)


def _choose_classes(rng: np.random.Generator) -> list[int]:
    """Classes of an image's objects (bottom to top), with partner co-occurrence."""
    n = int(rng.choice(len(_NUM_OBJECTS_P), p=_NUM_OBJECTS_P)) + 1
    classes = [int(rng.integers(1, NUM_CLASSES))]
    if n >= 2:
        if rng.random() < _PARTNER_P:
            classes.append(int(rng.choice(PARTNERS[classes[0]])))
        else:
            classes.append(int(rng.integers(1, NUM_CLASSES)))
    classes += [int(c) for c in rng.integers(1, NUM_CLASSES, size=n - len(classes))]
    rng.shuffle(classes)
    return classes


def render_image(seed: int, index: int, size: int = 64, *, boundary: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Render synthetic image ``index`` of the dataset with ``seed``.

    Returns:
        ``(image, mask)``: ``size x size x 3`` ``uint8`` RGB and ``size x size``
        ``uint8`` labels in 0..10, with 255 on the 1-pixel boundary rings.
    """
    rng = np.random.default_rng([seed, 1, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = _background(rng, size, yy, xx)
    label = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int32)  # which object is visible at each pixel
    areas: list[int] = []
    for cls in _choose_classes(rng):
        for _ in range(_PLACEMENT_TRIES):
            radius = rng.uniform(*_RADIUS) * size * _RADIUS_SCALE.get(cls, 1.0)
            margin = 0.7 * radius
            cx, cy = rng.uniform(margin, size - margin, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            aspect = rng.uniform(0.85, 1.15)
            dx, dy = xx - cx, yy - cy
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius * aspect)
            v = (-dx * np.sin(angle) + dy * np.cos(angle)) * aspect / radius
            inside = shape_mask(cls, u, v)
            if not inside.any():
                continue
            covered = np.bincount(owner[inside] + 1, minlength=len(areas) + 1)[1:]
            visible = np.bincount(owner.ravel() + 1, minlength=len(areas) + 1)[1:] - covered
            if all(visible[j] >= _MIN_VISIBLE * areas[j] for j in range(len(areas))):
                break
        else:
            continue  # no placement leaves the objects below visible enough: skip this object
        light = rng.normal(0.0, 1.0, size=2)
        shading = (u * light[0] + v * light[1]) * rng.uniform(0, 14)
        image[inside] = _object_colours(rng, cls, u[inside], v[inside], shading[inside])
        label[inside] = cls
        owner[inside] = len(areas)
        areas.append(int(inside.sum()))
    if boundary:
        ring = np.zeros((size, size), dtype=bool)
        ring[:, :-1] |= owner[:, 1:] > owner[:, :-1]
        ring[:, 1:] |= owner[:, :-1] > owner[:, 1:]
        ring[:-1, :] |= owner[1:, :] > owner[:-1, :]
        ring[1:, :] |= owner[:-1, :] > owner[1:, :]
        label[ring] = IGNORE_INDEX
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


# -- writing the dataset ------------------------------------------------------------------
def image_id(index: int) -> str:
    return f"synth_{index:05d}"


def _write_items(out: str, seed: int, size: int, boundary: bool, indices: Sequence[int]) -> list[list[int]]:
    """Render and write images ``indices``; returns the label values present in each mask."""
    root = Path(out)
    present = []
    for i in indices:
        image, mask = render_image(seed, i, size, boundary=boundary)
        image_path = root / "JPEGImages" / f"{image_id(i)}.jpg"
        _write_file(image_path, lambda: Image.fromarray(image).save(image_path, format="JPEG", quality=95,
                                                                    subsampling=0))
        mask_path = root / "SegmentationClassAug" / f"{image_id(i)}.png"
        _write_file(mask_path, lambda: write_mask_png(mask_path, mask))
        present.append([int(c) for c in np.flatnonzero(np.bincount(mask.ravel(), minlength=256))])
    return present


def _write_file(path: Path, write: Callable[[], object]) -> None:
    """``write()``, which writes ``path``; a failure (full disk, ...) is one line naming the file, and the
    part written is removed (the folder is not a dataset until ``ilseg_synth.json`` is written last)."""
    try:
        write()
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise WriteError(f"{write_problem(path, exc)}; free space or choose another --out, then run the command "
                         "again", failure_reason(exc)) from None


def _val_indices(seed: int, num_images: int, val_fraction: float) -> set[int]:
    num_val = int(round(num_images * val_fraction))
    perm = np.random.default_rng([seed, 2]).permutation(num_images)
    return {int(i) for i in perm[:num_val]}


def _params(seed: int, num_images: int, size: int, val_fraction: float, boundary: bool) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "seed": seed, "num_images": num_images,
            "size": size, "val_fraction": val_fraction, "boundary": boundary}


def _prepare_folder(out: Path) -> None:
    """Create ``out`` or clear a previous synthetic dataset in it; refuse other non-empty folders."""
    layout = {"JPEGImages", "SegmentationClassAug", "ImageSets", META_FILE}
    check_output_folder(out, option="--out", what="a synthetic dataset", ours=lambda entry: entry.name in layout)
    if out.exists():
        (out / META_FILE).unlink(missing_ok=True)  # the folder matches nothing until we finish
        for sub in ("JPEGImages", "SegmentationClassAug"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def generate_synth(
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_images: int = 1500,
    size: int = 64,
    val_fraction: float = 0.2,
    boundary: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the synthetic benchmark in the VOC layout under ``out``; returns ``out``.

    Args:
        out: output folder; created if needed.  A previous synthetic dataset
            there is replaced; any other non-empty folder is refused.
        seed: the same seed gives byte-identical files.
        num_images: images in total; ``val_fraction`` of them go to ``val.txt``,
            the rest to ``train_aug.txt``.
        size: image side in pixels (square images).
        boundary: draw the 1-pixel 255 ring around visible objects.
        workers: processes to render with; ``None`` picks one per CPU (up to
            8) for large datasets, ``0`` or ``1`` renders in this process.

    ``ilseg_synth.json`` is written last: :func:`synth_matches` tells whether
    a folder holds a complete dataset with given parameters.
    """
    if seed < 0:
        raise IlsegError(f"the synthetic dataset's seed must be >= 0, got {seed}")
    if num_images < 2:
        raise IlsegError(f"the synthetic dataset needs at least 2 images, got {num_images}")
    if size < 16:
        raise IlsegError(f"synthetic images must be at least 16 pixels wide, got {size}")
    if not 0.0 < val_fraction < 1.0:
        raise IlsegError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    out = Path(out).expanduser()
    _prepare_folder(out)
    if workers is None:
        workers = 0 if num_images < 400 else min(os.cpu_count() or 1, 8)
    indices = list(range(num_images))
    if workers > 1:
        chunk = max(1, -(-num_images // (workers * 4)))
        chunks = [indices[i:i + chunk] for i in range(0, num_images, chunk)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_write_items, [str(out)] * len(chunks), [seed] * len(chunks),
                               [size] * len(chunks), [boundary] * len(chunks), chunks)
            present = [p for part in results for p in part]
    else:
        present = _write_items(str(out), seed, size, boundary, indices)

    val = _val_indices(seed, num_images, val_fraction)
    lists = out / "ImageSets" / "Segmentation"
    atomic_write_text(lists / "train_aug.txt", "".join(f"{image_id(i)}\n" for i in indices if i not in val))
    atomic_write_text(lists / "val.txt", "".join(f"{image_id(i)}\n" for i in indices if i in val))
    class_images = {name: sum(1 for p in present if c in p) for c, name in enumerate(SYNTH_CLASSES)}
    meta = {**_params(seed, num_images, size, val_fraction, boundary),
            "classes": list(SYNTH_CLASSES), "train_images": num_images - len(val), "val_images": len(val),
            "images_per_class": class_images}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def synth_matches(
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_images: int = 1500,
    size: int = 64,
    val_fraction: float = 0.2,
    boundary: bool = True,
) -> bool:
    """Whether ``out`` holds a complete synthetic dataset generated with these parameters."""
    root = Path(out).expanduser()
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    expected = _params(seed, num_images, size, val_fraction, boundary)
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        return False
    lists = root / "ImageSets" / "Segmentation"
    return (lists / "train_aug.txt").is_file() and (lists / "val.txt").is_file()
