"""The synthetic benchmark: determinism, VOC-layout format, and the properties it promises."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ilseg.data.datasets import build_dataset
from ilseg.data.io import read_image, read_mask
from ilseg.data.splits import split_report
from ilseg.data.synth import (
    CLASS_HUES,
    PARTNERS,
    generate_synth,
    render_image,
    synth_matches,
)
from ilseg.errors import IlsegError
from ilseg.tasks import get_task

SIZE = 48


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A 240-image synthetic dataset shared by the read-only tests."""
    out = tmp_path_factory.mktemp("synth")
    return generate_synth(out, seed=3, num_images=240, size=SIZE, workers=0)


def test_same_seed_same_bytes_serial_or_parallel(tmp_path):
    a = generate_synth(tmp_path / "a", seed=1, num_images=24, size=32, workers=0)
    b = generate_synth(tmp_path / "b", seed=1, num_images=24, size=32, workers=2)
    c = generate_synth(tmp_path / "c", seed=2, num_images=24, size=32, workers=0)
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    differing = [k for k in files_a if k.endswith((".jpg", ".png")) and files_a[k] != files_c[k]]
    assert len(differing) == 48


def test_format_is_voc_layout(synth):
    ids_train = (synth / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    ids_val = (synth / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(ids_train) == 192 and len(ids_val) == 48
    assert not set(ids_train) & set(ids_val)
    with Image.open(synth / "JPEGImages" / f"{ids_train[0]}.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (SIZE, SIZE)
    with Image.open(synth / "SegmentationClassAug" / f"{ids_train[0]}.png") as img:
        assert img.format == "PNG" and img.mode == "P"
    meta = json.loads((synth / "ilseg_synth.json").read_text())
    assert meta["seed"] == 3 and meta["num_images"] == 240 and meta["version"] >= 1
    ds = build_dataset("synth", synth, "train")
    assert len(ds) == 192 and ds.num_classes == 11
    image, target = ds[0]
    assert image.shape == (3, SIZE, SIZE)


def test_masks_values_objects_and_background(synth):
    ds = build_dataset("synth", synth, "train")
    objects_per_image, sizes, extents = [], [], []
    seen = set()
    for i in range(len(ds)):
        mask = read_mask(ds.masks[i], 11)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(11)) | {255}
        assert 255 in values  # the boundary ring
        fg = values - {0, 255}
        seen |= fg
        objects_per_image.append(len(fg))
        for c in fg:
            ys, xs = np.nonzero(mask == c)
            sizes.append(len(ys))
            extents.append(max(np.ptp(ys), np.ptp(xs)) + 1)
        if i < 20:  # the background is textured, not one flat colour
            image = read_image(ds.images[i]).astype(np.float32)
            assert image[mask == 0].std(axis=0).min() > 5
    assert seen == set(range(1, 11))
    assert max(objects_per_image) >= 3 and np.mean(objects_per_image) > 1.5
    # No tiny objects: even occluded, cut by the ring or the border, every visible
    # shape spans >= 1/5 of the image side and covers >= 1.5% of it.
    assert min(extents) >= SIZE / 5
    assert min(sizes) >= 0.015 * SIZE * SIZE


def test_classes_are_balanced(synth):
    meta = json.loads((synth / "ilseg_synth.json").read_text())
    counts = [meta["images_per_class"][name] for name in meta["classes"][1:]]
    assert min(counts) > 0.6 * max(counts)


def _object_hues(images: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean hue (degrees) and class of every visible object in the first ``images`` of seed 0."""
    hues, labels = [], []
    for i in range(images):
        image, mask = render_image(0, i, 48)
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            r, g, b = image[mask == c].astype(np.float64).mean(axis=0) / 255
            hues.append(360 * colorsys.rgb_to_hsv(r, g, b)[0])
            labels.append(c)
    return np.array(hues), np.array(labels)


def _hue_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((a - b + 180) % 360 - 180)


def test_colour_narrows_the_class_to_one_or_two_but_shape_decides():
    hues, labels = _object_hues(150)
    centres = np.array([360 * CLASS_HUES[c] for c in range(1, 11)])
    gaps = _hue_gap(hues[:, None], centres[None])  # objects x classes
    # Each object's colour lies in its own class's range (25 degrees each side,
    # a few more for the pixel noise averaged into the mean)...
    own = gaps[np.arange(len(labels)), labels - 1]
    assert (own <= 28).mean() > 0.97
    # ...which for many objects is also a neighbouring class's range, so the
    # nearest class hue is often wrong: colour alone does not identify the class.
    candidates = (gaps <= 25).sum(axis=1)
    assert candidates.max() == 2 and 0.35 < (candidates == 2).mean() < 0.75
    nearest = 1 + gaps.argmin(axis=1)
    assert 0.55 < (nearest == labels).mean() < 0.85


def test_class_hues_neighbour_classes_of_other_steps_and_partners():
    # 36 degrees apart; going round the hue circle, a step-0 class of 6-2-2 is
    # next to another step-0 class only twice, and hue neighbours are partners.
    order = sorted(CLASS_HUES, key=CLASS_HUES.get)
    assert np.allclose(np.diff([CLASS_HUES[c] for c in order]), 0.1)
    pairs = [(order[i], order[(i + 1) % 10]) for i in range(10)]
    assert sum(a <= 6 and b <= 6 for a, b in pairs) == 2
    assert all(b in PARTNERS[a] for a, b in pairs)


def test_disjoint_and_overlap_differ(synth, tmp_path):
    ds = build_dataset("synth", synth, "train")
    for name in ("6-2-2", "6-1"):
        task = get_task("synth", name)
        counts = {}
        for mode in ("disjoint", "overlap"):
            report = split_report(ds, task, mode, cache_dir=tmp_path, progress=False)
            counts[mode] = [s["count"] for s in report["steps"]]
        disjoint, overlap = counts["disjoint"], counts["overlap"]
        assert all(d <= o for d, o in zip(disjoint, overlap))
        assert disjoint[-1] == overlap[-1]  # nothing is in the future at the last step
        assert overlap[0] > 1.5 * disjoint[0] and disjoint[0] > 0.2 * len(ds)
        assert overlap[1] > disjoint[1]  # partners straddle the later boundaries too


def test_synth_matches_and_regeneration(tmp_path):
    out = generate_synth(tmp_path / "s", seed=0, num_images=10, size=32)
    assert synth_matches(out, seed=0, num_images=10, size=32)
    assert not synth_matches(out, seed=1, num_images=10, size=32)
    assert not synth_matches(out, seed=0, num_images=11, size=32)
    assert not synth_matches(out, seed=0, num_images=10, size=64)
    assert not synth_matches(tmp_path / "missing")
    generate_synth(out, seed=1, num_images=6, size=32)  # replaces the previous dataset
    assert synth_matches(out, seed=1, num_images=6, size=32)
    assert len(list((out / "JPEGImages").iterdir())) == 6
    (out / "ilseg_synth.json").unlink()
    assert not synth_matches(out, seed=1, num_images=6, size=32)


def test_refuses_foreign_folder_and_bad_parameters(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(IlsegError, match="not empty"):
        generate_synth(tmp_path, num_images=4, size=32)
    assert (tmp_path / "precious.txt").exists()
    with pytest.raises(IlsegError, match="seed"):
        generate_synth(tmp_path / "x", seed=-1)
    with pytest.raises(IlsegError, match="val_fraction"):
        generate_synth(tmp_path / "x", val_fraction=1.0)
