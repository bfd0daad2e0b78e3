"""Joint image/mask transforms built on ``torchvision.transforms.v2``.

A transform takes a numpy ``HxWx3`` ``uint8`` RGB image and an ``HxW``
``uint8`` mask (already remapped by a lookup table, see
:func:`ilseg.tasks.train_lut`) and returns ``(image, target)``: a ``float32``
tensor ``3xH'xW'`` normalised with the ImageNet mean/std and an ``int64``
tensor ``H'xW'``.  The same geometry is applied to both.  The mask is wrapped
as a :class:`torchvision.tv_tensors.Mask` and always resized with
centre-aligned nearest-neighbour interpolation (``NEAREST_EXACT``, like PIL's
nearest): labels are never blended and stay aligned with the image.

Recipes (docs/protocol.md#training-recipe, docs/protocol.md#evaluation):

* :func:`train_transform` - ``RandomResizedCrop`` (area scale (0.5, 2.0),
  aspect (3/4, 4/3)), horizontal flip, normalisation.
* :func:`eval_transform` - resize the shorter side, centre crop (MiB's
  default), or the full image.

About ``scale > 1``: torchvision's ``RandomResizedCrop`` draws up to 10
(area, aspect) pairs and keeps the first whose box fits in the image; when
none fits (likely once the area may exceed the image's) it falls back to a
centre crop of the whole image, clamped to the aspect range.  MiB ships a copy
of exactly this transform, so ``scale=(0.5, 2.0)`` behaves as in the
reference implementations: large scales mean "more often the whole image".

Example::

    >>> t = train_transform(32)
    >>> x, y = t(np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50), np.uint8))
    >>> x.shape, x.dtype, y.shape, y.dtype
    (torch.Size([3, 32, 32]), torch.float32, torch.Size([32, 32]), torch.int64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The ILT paper's code (LTTM/IL-SemSegm, DeepLab-v2 in TensorFlow): RGB values 0..255 minus these, no division.
# They are Caffe's ImageNet means in B, G, R order, subtracted from R, G, B as that code does (docs/fidelity.md).
CAFFE_MEAN_AS_ILT: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)
Normalization = Literal["imagenet", "caffe"]
# (scale to [0, 1] first, mean, std) of each normalisation
NORMALIZATIONS: dict[str, tuple[bool, tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (True, IMAGENET_MEAN, IMAGENET_STD),
    "caffe": (False, CAFFE_MEAN_AS_ILT, (1.0, 1.0, 1.0)),
}


def denormalize(image: torch.Tensor, normalize: str = "imagenet") -> torch.Tensor:
    """A ``3xHxW`` tensor of :class:`JointTransform` back to RGB in [0, 1] (for drawing it)."""
    scaled, mean, std = NORMALIZATIONS[normalize]
    rgb = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (rgb if scaled else rgb / 255.0).clamp(0, 1)


class JointTransform:
    """A picklable ``(numpy image, numpy mask) -> (float tensor, int64 tensor)`` transform.

    Wraps a ``v2`` pipeline (geometry first); appends the dtype conversion
    and ImageNet normalisation.  Picklable, so DataLoader workers can use it.
    """

    def __init__(self, geometry: Sequence[v2.Transform], normalize: Normalization = "imagenet") -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalize!r}; use one of {', '.join(NORMALIZATIONS)}")
        self.geometry = list(geometry)
        self.normalize = normalize
        scaled, mean, std = NORMALIZATIONS[normalize]
        self.pipeline = v2.Compose([
            *self.geometry,
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                       scale=scaled),
            v2.Normalize(mean=list(mean), std=list(std)),
        ])

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``HxWx3`` uint8 image, ``HxW`` uint8 mask. Returns ``3xH'xW'`` float32, ``H'xW'`` int64."""
        if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
            raise ValueError(f"need an HxWx3 image and an HxW mask, got {image.shape} and {mask.shape}")
        image, mask = np.require(image, requirements=["C", "W"]), np.require(mask, requirements=["C", "W"])
        img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        msk = tv_tensors.Mask(torch.from_numpy(mask))
        out_img, out_mask = self.pipeline(img, msk)
        return out_img.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.geometry)
        return f"JointTransform([{inner}] + ToDtype + Normalize({self.normalize}))"


class RandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` that resizes masks with centre-aligned nearest neighbour.

    torchvision resizes masks with ``NEAREST``, which samples source pixel
    ``floor(i * in / out)`` and so shifts labels up to one source pixel
    towards the top-left of the image; ``NEAREST_EXACT`` samples
    ``floor((i + 0.5) * in / out)``, aligned with the bilinear image (and with
    PIL's nearest, which MiB uses).
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            cropped = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
            return _resize_mask_exact(cropped, list(self.size))
        return super().transform(inpt, params)


class Resize(v2.Resize):
    """``v2.Resize`` that resizes masks with centre-aligned nearest neighbour (see :class:`RandomResizedCrop`)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return _resize_mask_exact(inpt, self.size, max_size=self.max_size)
        return super().transform(inpt, params)


def _resize_mask_exact(mask: tv_tensors.Mask, size: list[int], max_size: int | None = None) -> tv_tensors.Mask:
    """``mask`` resized with ``NEAREST_EXACT``, through torchvision's kernel for images.

    torchvision's kernel for masks resizes with ``NEAREST`` whatever interpolation it is given
    (``F.resize``, ``F.resized_crop``) before torchvision 0.28, which honours ``NEAREST_EXACT``;
    the image kernel honours it in every version ilseg supports, so labels land on the same
    pixels whichever torchvision is installed (tests/test_data_transforms.py).
    """
    plain = mask.as_subclass(torch.Tensor)
    flat = plain.ndim < 3
    resized = F.resize_image(plain.unsqueeze(0) if flat else plain, size,
                             interpolation=InterpolationMode.NEAREST_EXACT, max_size=max_size, antialias=False)
    return tv_tensors.wrap(resized.squeeze(0) if flat else resized, like=mask)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    else:
        pair = (int(size[0]), int(size[1]))
    if min(pair) <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    return pair


def train_transform(
    crop_size: int | Sequence[int],
    *,
    scale: tuple[float, float] = (0.5, 2.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    normalize: Normalization = "imagenet",
) -> JointTransform:
    """Training augmentation: random resized crop to ``crop_size``, flip, normalise.

    Args:
        crop_size: output side (or ``(height, width)``).
        scale: range of the crop's area relative to the image (values above
            1 make torchvision fall back to the whole image, see the module
            docstring).
        ratio: range of the crop's aspect ratio (width / height).
        hflip: probability of a horizontal flip.
        normalize: ``"imagenet"`` (mean / std of [0, 1] RGB) or ``"caffe"``
            (0..255 minus :data:`CAFFE_MEAN_AS_ILT`, the ILT paper's code).

    The image is resized bilinearly with antialiasing, the mask with nearest
    neighbour.  No colour jitter (docs/protocol.md#training-recipe).
    """
    geometry: list[v2.Transform] = [
        RandomResizedCrop(_size_pair(crop_size), scale=scale, ratio=ratio, antialias=True),
    ]
    if hflip > 0:
        geometry.append(v2.RandomHorizontalFlip(p=hflip))
    return JointTransform(geometry, normalize)


class RandomScale(v2.Transform):
    """Resize image and mask by one random factor drawn uniformly from ``[low, high)`` (aspect kept)."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return _resize_mask_exact(inpt, params["size"])
        return F.resize(inpt, params["size"], interpolation=InterpolationMode.BILINEAR, antialias=True)


class PadBottomRight(v2.Transform):
    """Pad image and mask on the bottom and right up to ``size`` where smaller (the ILT paper's code)."""

    def __init__(self, size: tuple[int, int], image_fill: Sequence[int], mask_fill: int = 255) -> None:
        super().__init__()
        self.size, self.image_fill, self.mask_fill = size, list(image_fill), mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        if isinstance(inpt, tv_tensors.Mask):
            return F.pad(inpt, params["padding"], fill=self.mask_fill)
        channels = [F.pad(inpt[c:c + 1], params["padding"], fill=value) for c, value in enumerate(self.image_fill)]
        return tv_tensors.wrap(torch.cat(channels), like=inpt)


def ilt_paper_train_transform(crop_size: int, *, normalize: Normalization = "imagenet",
                              scale: tuple[float, float] = (0.5, 1.5)) -> JointTransform:
    """The ILT paper's augmentation (its TensorFlow code, after DeepLab-v2's reader): the image rescaled by a
    random factor in ``[0.5, 1.5)``, flipped with probability 0.5, padded on the bottom and right to
    ``crop_size`` where smaller (the image with its mean colour, so 0 after normalisation; the mask with 255),
    then a random ``crop_size`` crop.
    """
    scaled, mean, _ = NORMALIZATIONS[normalize]
    fill_rgb = [round(m * 255) if scaled else round(m) for m in mean]
    geometry: list[v2.Transform] = [
        RandomScale(*scale),
        v2.RandomHorizontalFlip(p=0.5),
        PadBottomRight(_size_pair(crop_size), fill_rgb),
        v2.RandomCrop(_size_pair(crop_size)),
    ]
    return JointTransform(geometry, normalize)


def eval_transform(size: int | None, *, crop: bool = True, normalize: Normalization = "imagenet") -> JointTransform:
    """Evaluation transform: resize the shorter side to ``size``, then centre-crop ``size x size``.

    Args:
        size: target shorter side; ``None`` keeps the full image unchanged.
        crop: centre-crop to a square (MiB's ``--crop_val``); ``False`` keeps
            the resized image whole.
        normalize: as in :func:`train_transform`.

    After resizing the shorter side to ``size`` the square crop always fits,
    so no padding (which would have to be 255 in the mask) ever happens.
    """
    geometry: list[v2.Transform] = []
    if size is not None:
        if size <= 0:
            raise ValueError(f"test size must be positive, got {size}")
        geometry.append(Resize(size, antialias=True))
        if crop:
            geometry.append(v2.CenterCrop(size))
    return JointTransform(geometry, normalize)
