"""The ResNet body of DeepLab-v3, with torchvision's parameter names.

:class:`ResNet` builds ResNet-18/34/50/101 so that a torchvision ImageNet state
dict (minus ``fc.*``) loads into it with ``strict=True``: the same module names
(``conv1``, ``bn1``, ``layer1`` .. ``layer4``, blocks with ``conv1/bn1/conv2/bn2
[/conv3/bn3]`` and ``downsample.0/.1``).  It differs from torchvision where MiB
and cssegmentation differ (docs/protocol.md#deeplab-v3-on-resnet-101):

* every activation is LeakyReLU(0.01) instead of ReLU (MiB runs InPlace-ABN with
  a leaky ReLU; a plain BN followed by the activation computes the same
  function).  As in any ResNet, the last BN of a block and the shortcut's BN
  have no activation of their own: the activation follows the residual add;
* output stride 16 keeps layer4 at stride 1 and dilates *every* 3x3 conv in it
  by 2, the first block's included; output stride 8 also keeps layer3 at
  stride 1 with dilation 2 and uses dilation 4 in layer4.  (torchvision's
  ``replace_stride_with_dilation`` leaves the first block of a dilated stage at
  the previous dilation, and its BasicBlock refuses dilation.)  Output stride
  32 is the plain network, handy for quick runs;
* no average pool and no ``fc``: the output is the layer4 feature map.

The stride sits on the 3x3 conv (ResNet v1.5), as in torchvision and MiB, by
default.  ``stride_on="1x1"`` puts it on each stage's first 1x1 conv instead,
as in the original Caffe ResNet that DeepLab-v2 (and the ILT paper's code) was
trained from; the weights of one layout do not suit the other (ResNet-50/101
only: the basic blocks of ResNet-18/34 have no 1x1 conv).

PLOP distils the *pre-activation* output of each stage (the residual sum of
its last block, before the final activation): :meth:`ResNet.forward_with_stages`
returns those four maps next to the usual output.  Every block computes that
sum in :meth:`BasicBlock.residual_sum` / :meth:`Bottleneck.residual_sum`;
``forward`` applies the in-place activation to it as before, and
``forward_with_preactivation`` applies an out-of-place one so the sum survives.

Example::

    >>> body = ResNet(depth=50, output_stride=16)
    >>> body(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 2048, 4, 4])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ilseg.errors import IlsegError

StrideOn = Literal["3x3", "1x1"]
STRIDE_ON: tuple[StrideOn, ...] = ("3x3", "1x1")

NormLayer = Callable[[int], nn.Module]

LEAKY_SLOPE = 0.01

# depth -> (block kind, blocks per stage)
_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

# output stride -> (stride, dilation) of layer1..layer4
_STAGE_GEOMETRY: dict[int, tuple[tuple[int, int], ...]] = {
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
}

SUPPORTED_DEPTHS: tuple[int, ...] = tuple(_DEPTHS)
SUPPORTED_OUTPUT_STRIDES: tuple[int, ...] = tuple(sorted(_STAGE_GEOMETRY))


def _conv3x3(in_ch: int, out_ch: int, stride: int, dilation: int) -> nn.Conv2d:
    """A bias-free 3x3 conv whose padding keeps the size (up to the stride)."""
    return nn.Conv2d(
        in_ch, out_ch, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); both carry ``dilation``, the first the stride.

    ``x -> conv1 -> bn1 -> act -> conv2 -> bn2 (+ shortcut) -> act``.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        negative_slope: float = LEAKY_SLOPE,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.downsample = downsample

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``bn2(conv2(...)) + shortcut``: the block's output before its last activation."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual_sum(x))

    def forward_with_preactivation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``: the output equals ``forward(x)``; the sum is kept."""
        return _out_of_place_act(self.act, self.residual_sum(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 with 4x expansion (ResNet-50/101).

    ``stride_on="1x1"`` moves the stride to the first 1x1 conv (Caffe ResNet).

    ``x -> conv1 -> bn1 -> act -> conv2 -> bn2 -> act -> conv3 -> bn3
    (+ shortcut) -> act``.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        negative_slope: float = LEAKY_SLOPE,
        stride_on: StrideOn = "3x3",
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, stride=stride_1x1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride_3x3, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.downsample = downsample

    def residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``bn3(conv3(...)) + shortcut``: the block's output before its last activation."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual_sum(x))

    def forward_with_preactivation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``: the output equals ``forward(x)``; the sum is kept."""
        return _out_of_place_act(self.act, self.residual_sum(x))


def _out_of_place_act(act: nn.LeakyReLU, preactivation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(preactivation), preactivation)`` without overwriting ``preactivation``.

    The blocks' ``act`` is in place; the same LeakyReLU applied out of place
    gives the same values in a new tensor.
    """
    return F.leaky_relu(preactivation, act.negative_slope), preactivation


class ResNet(nn.Module):
    """ResNet body: ``Bx3xHxW`` image -> ``Bx{out_channels}x(H/os)x(W/os)`` features.

    Args:
        depth: 18, 34, 50 or 101.
        output_stride: 8, 16 (DeepLab-v3 default) or 32 (no dilation).
        norm_layer: builds a norm module from a channel count; keep it a plain
            ``nn.BatchNorm2d`` (the default) so that
            ``nn.SyncBatchNorm.convert_sync_batchnorm`` and :func:`freeze_bn`
            find every BN.
        negative_slope: slope of every LeakyReLU (0.01 as in MiB; 0.0 gives a
            ReLU network that computes exactly what torchvision's does).
        width: channels of the stem and of layer1's 3x3 convs (64 in every
            published ResNet; each later stage doubles it).  A smaller width
            gives a thinner network for CPU runs; pretrained weights need 64.

    Attributes:
        out_channels: channels of the output (2048 for 50/101, 512 for 18/34).
        depth, output_stride: as given.

    The output is layer4's output after its last activation (for 64x64 input
    and output stride 16: ``Bx2048x4x4``).  Sizes not divisible by the stride
    round up, as for any strided conv.
    """

    def __init__(
        self,
        depth: int = 101,
        *,
        output_stride: int = 16,
        norm_layer: NormLayer = nn.BatchNorm2d,
        negative_slope: float = LEAKY_SLOPE,
        width: int = 64,
        stride_on: StrideOn = "3x3",
    ) -> None:
        super().__init__()
        if stride_on not in STRIDE_ON:
            raise IlsegError(f"stride_on must be one of {STRIDE_ON}, got {stride_on!r}")
        if width < 1:
            raise IlsegError(f"ResNet width must be a positive integer, got {width!r}")
        if depth not in _DEPTHS:
            raise IlsegError(f"ResNet depth {depth!r} is not supported; use one of {SUPPORTED_DEPTHS}")
        if output_stride not in _STAGE_GEOMETRY:
            raise IlsegError(
                f"output stride {output_stride!r} is not supported; use one of {SUPPORTED_OUTPUT_STRIDES}"
            )
        self.depth = depth
        self.output_stride = output_stride
        kind, blocks_per_stage = _DEPTHS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        if kind == "basic" and stride_on != "3x3":
            raise IlsegError(f"stride_on={stride_on!r} needs a bottleneck ResNet (50 or 101): "
                             f"ResNet-{depth}'s blocks have no 1x1 conv")
        self.stride_on = stride_on

        self.width = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = width
        stages = []
        for index, (num_blocks, (stride, dilation)) in enumerate(
            zip(blocks_per_stage, _STAGE_GEOMETRY[output_stride], strict=True)
        ):
            planes = width * 2**index
            stage, in_channels = self._make_stage(
                block, in_channels, planes, num_blocks, stride, dilation, norm_layer, negative_slope, stride_on
            )
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_channels
        self._init_weights()

    @staticmethod
    def _make_stage(
        block: type[BasicBlock] | type[Bottleneck],
        in_channels: int,
        planes: int,
        num_blocks: int,
        stride: int,
        dilation: int,
        norm_layer: NormLayer,
        negative_slope: float,
        stride_on: StrideOn = "3x3",
    ) -> tuple[nn.Sequential, int]:
        """One stage; the first block takes the stride, every block the dilation."""
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_channels),
            )
        first: nn.Module
        if block is Bottleneck:
            first = Bottleneck(in_channels, planes, stride=stride, dilation=dilation, downsample=downsample,
                               norm_layer=norm_layer, negative_slope=negative_slope, stride_on=stride_on)
        else:
            first = block(in_channels, planes, stride=stride, dilation=dilation, downsample=downsample,
                          norm_layer=norm_layer, negative_slope=negative_slope)
        blocks: list[nn.Module] = [first]
        for _ in range(1, num_blocks):
            blocks.append(
                block(
                    out_channels,
                    planes,
                    dilation=dilation,
                    norm_layer=norm_layer,
                    negative_slope=negative_slope,
                )
            )
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self) -> None:
        """torchvision's init: Kaiming-normal (fan_out) convs, BN weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_with_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(forward(x), [pre-activation of layer1 .. layer4])``, in one pass.

        Each stage's map is the residual sum of its last block before the final
        LeakyReLU (what PLOP distils); for 64x64 input, ResNet-50 and output
        stride 16 the shapes are ``Bx256x16x16``, ``Bx512x8x8``,
        ``Bx1024x4x4`` and ``Bx2048x4x4``.  The first output equals
        ``forward(x)``.  The last block of each stage is run through
        ``forward_with_preactivation``, not ``__call__``: forward hooks on those
        four blocks do not fire.
        """
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        preactivations = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            *blocks, last = stage
            for block in blocks:
                x = block(x)
            if not isinstance(last, (BasicBlock, Bottleneck)):
                raise IlsegError(f"a ResNet stage must end with a residual block, got {type(last).__name__}")
            x, preactivation = last.forward_with_preactivation(x)
            preactivations.append(preactivation)
        return x, preactivations
