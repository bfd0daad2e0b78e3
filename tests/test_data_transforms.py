"""Joint transforms: label values never interpolated, image and mask stay aligned."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from datatrees import label_image

from ilseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    train_transform,
)

LABELS = (0, 3, 7, 255)


def _random_blocks(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A mask of 8x8 blocks drawn from LABELS."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(LABELS, size=(h // 8, w // 8)).astype(np.uint8)
    return np.kron(blocks, np.ones((8, 8), np.uint8))


def _denormalise(image: torch.Tensor) -> np.ndarray:
    """``3xHxW`` normalised tensor -> ``HxWx3`` float in 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def _label_from_colour(image: np.ndarray) -> np.ndarray:
    """Invert ``label_image`` for LABELS by the nearest colour."""
    colours = label_image(np.array(LABELS, np.uint8)[None, :])[0].astype(np.float32)  # Lx3
    dist = ((image[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    return np.array(LABELS)[dist.argmin(-1)]


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one label (away from label and crop edges, where resampling blends)."""
    pad = np.pad(mask.astype(np.int64), 1, constant_values=-1)
    same = np.ones(mask.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= pad[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    return same


def test_train_transform_shapes_values_and_alignment():
    torch.manual_seed(0)
    transform = train_transform(32)
    for seed in range(12):
        mask = _random_blocks(seed)
        image = label_image(mask)
        x, y = transform(image, mask)
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (32, 32)
        assert set(torch.unique(y).tolist()) <= set(LABELS)  # nearest: no blended labels
        target = y.numpy()
        inside = _interior(target)
        assert inside.mean() > 0.3
        derived = _label_from_colour(_denormalise(x))
        # Centre-aligned nearest for masks: exact agreement (torchvision's NEAREST misses ~1%).
        np.testing.assert_array_equal(derived[inside], target[inside])
    # Transform outputs are plain tensors, ready for default_collate.
    assert type(x) is torch.Tensor and type(y) is torch.Tensor


def test_flip_moves_image_and_mask_together():
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :4] = 7
    image = label_image(mask)
    x, y = train_transform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(image, mask)
    assert (y[:, -4:] == 7).all() and (y[:, :-4] == 0).all()
    derived = _label_from_colour(_denormalise(x))
    assert (derived[:, -3:] == 7).all() and (derived[:, :-5] == 0).all()


def test_masks_are_sampled_at_pixel_centres():
    # Halving a 64-wide mask whose value is the column: output column i covers input
    # columns 2i and 2i+1, centre 2i+1 (torchvision's plain NEAREST would give 2i).
    mask = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    image = np.zeros((64, 64, 3), np.uint8)
    expected = np.tile(np.arange(1, 64, 2), (32, 1))
    _, y = eval_transform(32)(image, mask)
    np.testing.assert_array_equal(y.numpy(), expected)
    _, y = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)(image, mask)
    np.testing.assert_array_equal(y.numpy(), expected)


def test_scale_above_one_falls_back_to_the_whole_image():
    # No crop with 4x the image's area fits: torchvision (like MiB) takes the whole image.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = _random_blocks(3, 32, 32)
    x, y = train_transform(16, scale=(4.0, 4.0), hflip=0.0)(image, mask)
    x_ref, y_ref = eval_transform(16)(image, mask)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(y, y_ref)


def test_test_transform_sizes_and_normalisation():
    mask = _random_blocks(5, 40, 56)
    image = label_image(mask)
    x, y = eval_transform(32)(image, mask)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert set(torch.unique(y).tolist()) <= set(LABELS)
    inside = _interior(y.numpy())
    np.testing.assert_array_equal(_label_from_colour(_denormalise(x))[inside], y.numpy()[inside])
    x, y = eval_transform(32, crop=False)(image, mask)
    assert x.shape == (3, 32, 44) and y.shape == (32, 44)
    x, y = eval_transform(None)(image, mask)
    np.testing.assert_array_equal(y.numpy(), mask)
    np.testing.assert_allclose(_denormalise(x), image.astype(np.float32), atol=1e-3)


def test_transforms_pickle_and_reject_bad_inputs():
    t = pickle.loads(pickle.dumps(train_transform(8)))
    x, y = t(np.zeros((10, 12, 3), np.uint8), np.full((10, 12), 255, np.uint8))
    assert x.shape == (3, 8, 8) and (y == 255).all()
    with pytest.raises(ValueError):
        t(np.zeros((10, 12, 3), np.uint8), np.zeros((10, 11), np.uint8))
