"""Image and mask I/O: formats, round trips and every user-fixable error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ilseg.data.io import dataset_colours, overlay, palette, read_image, read_mask, write_mask_png
from ilseg.errors import IlsegError
from ilseg.tasks import SYNTH_CLASSES


def test_palette_is_the_voc_colormap():
    p = palette()
    assert len(p) == 768
    colour = lambda c: tuple(p[3 * c:3 * c + 3])  # noqa: E731
    assert colour(0) == (0, 0, 0)
    assert colour(1) == (128, 0, 0)
    assert colour(2) == (0, 128, 0)
    assert colour(15) == (192, 128, 128)
    assert colour(20) == (0, 64, 128)
    assert colour(255) == (224, 224, 192)


def test_no_synthetic_class_is_drawn_like_the_background_and_voc_keeps_its_palette():
    """The synthetic "star" (class 8) would be VOC's (64, 0, 0) on a black background."""
    voc = np.array(palette(), dtype=np.uint8).reshape(256, 3)
    assert (dataset_colours("voc") == voc).all() and (dataset_colours("ade") == voc).all()
    synth = dataset_colours("synth").astype(int)
    background = synth[0]
    for cls in range(1, len(SYNTH_CLASSES)):
        assert np.linalg.norm(synth[cls] - background) >= 120, (SYNTH_CLASSES[cls], synth[cls])
        others = [c for c in [*range(len(SYNTH_CLASSES)), 255] if c != cls]
        assert min(np.abs(synth[cls] - synth[o]).sum() for o in others) >= 64, SYNTH_CLASSES[cls]
    assert np.linalg.norm(voc[8].astype(int)) < 120  # why: VOC's cat colour, kept for VOC
    mask = np.full((2, 2), 8, dtype=np.uint8)
    assert (overlay(np.zeros((2, 2, 3), np.uint8), mask, alpha=1.0, colours=dataset_colours("synth")) ==
            [255, 160, 0]).all()


def test_write_and_read_palette_mask(tmp_path):
    mask = np.array([[0, 1, 2], [20, 255, 7]], dtype=np.uint8)
    write_mask_png(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and img.format == "PNG"
        assert img.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    out = read_mask(tmp_path / "m.png", 21)
    assert out.dtype == np.uint8 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, mask)


def test_read_grayscale_mask(tmp_path):
    mask = np.array([[0, 150], [255, 3]], dtype=np.uint8)
    Image.fromarray(mask).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "g.png", 151), mask)


def test_read_image_converts_to_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    write_mask_png(tmp_path / "pal.png", np.full((3, 4), 1, np.uint8))
    g = read_image(tmp_path / "gray.png")
    assert g.shape == (3, 4, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[..., 1], gray)
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 0, 0]
    assert read_image(tmp_path / "pal.png")[0, 0].tolist() == [128, 0, 0]


def test_rgb_mask_is_rejected(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(IlsegError, match=r"colour\.png.*index PNG"):
        read_mask(tmp_path / "colour.png", 21)


def test_label_values_out_of_range(tmp_path):
    write_mask_png(tmp_path / "bad.png", np.array([[0, 21, 254, 255]], np.uint8))
    with pytest.raises(IlsegError, match=r"bad\.png.*21, 254"):
        read_mask(tmp_path / "bad.png", 21)
    assert read_mask(tmp_path / "bad.png", 255).max() == 255  # 0..254 valid with 255 classes


def test_mask_size_must_match_image(tmp_path):
    write_mask_png(tmp_path / "m.png", np.zeros((4, 6), np.uint8))
    assert read_mask(tmp_path / "m.png", 21, image_size=(4, 6)).shape == (4, 6)
    with pytest.raises(IlsegError, match=r"m\.png is 6x4"):
        read_mask(tmp_path / "m.png", 21, image_size=(6, 4))


def test_missing_files(tmp_path):
    with pytest.raises(IlsegError, match=r"nope\.jpg does not exist.*re-download"):
        read_image(tmp_path / "nope.jpg")
    with pytest.raises(IlsegError, match=r"nope\.png does not exist"):
        read_mask(tmp_path / "nope.png", 21)


def test_corrupt_files(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(IlsegError, match=r"junk\.jpg.*corrupt"):
        read_image(tmp_path / "junk.jpg")
    # A truncated JPEG opens (header fine) but fails to decode.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(IlsegError, match=r"cut\.jpg.*corrupt"):
        read_image(tmp_path / "cut.jpg")
    write_mask_png(tmp_path / "full.png", rng.integers(0, 21, (64, 64), dtype=np.uint8))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(IlsegError, match=r"cut\.png.*corrupt"):
        read_mask(tmp_path / "cut.png", 21)


def test_overlay_blends_labels_and_keeps_background():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [2, 0]], np.uint8)
    out = overlay(image, mask, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [114, 50, 50]  # (100 + (128, 0, 0)) / 2
    assert out[1, 0].tolist() == [50, 114, 50]
    with pytest.raises(ValueError):
        overlay(image, mask[:1], alpha=0.5)
