"""MiB's DeepLab-v3 ASPP head (docs/protocol.md#aspp-head).

Two branches are added, then normalised::

    x --+-- 1x1 conv        --+
        +-- 3x3 conv, d1    --+-- concat -> BN + act -> 1x1 conv (4*hidden -> out) --+
        +-- 3x3 conv, d2    --+                                                      |
        +-- 3x3 conv, d3    --+                                                      +-- add -> BN + act
        +-- pool -> 1x1 conv (in -> hidden) -> BN + act -> 1x1 conv (hidden -> out) --+

All convs are bias-free.  The pooling branch averages the *input* features:

* training mode: a global average (one value per channel and image), broadcast
  back to the input's size;
* eval mode: ``avg_pool2d`` with kernel ``min(32, H) x min(32, W)`` and stride 1,
  then replicate padding (left/top ``(k-1)//2``, right/bottom the rest) so the
  result has the input's size again.  At 512x512 crops and output stride 16 the
  feature map is 32x32 and this equals the global average; on larger test
  images it is a local 32x32 average.

Caveat: in training mode the pooling branch's BN sees one value per channel per
image, so a per-GPU batch of 1 cannot train it (PyTorch's BatchNorm refuses).
A training-mode forward with batch size 1 therefore raises :class:`IlsegError`
unless that BN is frozen (eval mode) or synchronised across several processes:
use a batch of at least 2 per GPU, or SyncBatchNorm.

Init: convs Xavier-normal with the LeakyReLU(0.01) gain, BN weight 1, bias 0.

Example::

    >>> head = ASPP(2048, 256, dilations=(6, 12, 18))
    >>> head.eval()(torch.zeros(1, 2048, 4, 4)).shape
    torch.Size([1, 256, 4, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ilseg.errors import IlsegError
from ilseg.models.sync_bn import SYNC_BATCHNORM_TYPES

NormLayer = Callable[[int], nn.Module]

LEAKY_SLOPE = 0.01
POOLING_SIZE = 32

# output stride -> ASPP dilations.  OS16 and OS8 are MiB's values (its code
# uses 12/24/32 at OS8, not the DeepLab paper's 12/24/36); OS32 halves OS16.
DEFAULT_DILATIONS: dict[int, tuple[int, int, int]] = {
    32: (3, 6, 9),
    16: (6, 12, 18),
    8: (12, 24, 32),
}


def _local_average(x: torch.Tensor, pooling_size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """``avg_pool2d`` of kernel ``min(pooling_size, H) x min(pooling_size, W)``, stride 1.

    Returns the pooled map and the replicate padding ``(left, right, top,
    bottom)`` that brings it back to the input's size.
    """
    kh = min(pooling_size, x.shape[-2])
    kw = min(pooling_size, x.shape[-1])
    pooled = F.avg_pool2d(x, (kh, kw), stride=1)
    left, top = (kw - 1) // 2, (kh - 1) // 2
    return pooled, (left, kw - 1 - left, top, kh - 1 - top)


def eval_pool(x: torch.Tensor, pooling_size: int = POOLING_SIZE) -> torch.Tensor:
    """Eval-mode pooling of the ASPP: local average, padded back to the input size.

    ``BxCxHxW -> BxCxHxW``: ``avg_pool2d`` with kernel
    ``(min(pooling_size, H), min(pooling_size, W))``, stride 1, then replicate
    padding of ``(k-1)//2`` on the left/top and ``k-1-(k-1)//2`` on the
    right/bottom.
    """
    pooled, padding = _local_average(x, pooling_size)
    if pooled.shape[-2:] == (1, 1):
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])
    return F.pad(pooled, padding, mode="replicate")


def _needs_batch_statistics_guard(bn: nn.Module) -> bool:
    """True if ``bn`` is a training-mode BN that will see only this process's batch."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.training:
        return False
    if isinstance(bn, SYNC_BATCHNORM_TYPES) and torch.distributed.is_available():
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            return False
    return True


class ASPP(nn.Module):
    """DeepLab-v3 head as in MiB: ``BxCinxhxw -> Bxoutxhxw``.

    Args:
        in_channels: channels of the body's output (2048 or 512).
        out_channels: head width (256 in the papers).
        hidden_channels: width of each branch; defaults to ``out_channels``.
        dilations: the three 3x3 branches' dilations; ``(6, 12, 18)`` suits
            output stride 16, see :data:`DEFAULT_DILATIONS`.
        pooling_size: eval-mode pooling window (32 in MiB).
        norm_layer: builds the BNs (keep plain ``nn.BatchNorm2d``).
        negative_slope: the LeakyReLU slope after each BN.

    Module names follow MiB's (``map_convs``, ``map_bn``, ``red_conv``,
    ``global_pooling_conv``, ``global_pooling_bn``, ``pool_red_conv``,
    ``red_bn``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        *,
        hidden_channels: int | None = None,
        dilations: Sequence[int] = (6, 12, 18),
        pooling_size: int = POOLING_SIZE,
        norm_layer: NormLayer = nn.BatchNorm2d,
        negative_slope: float = LEAKY_SLOPE,
    ) -> None:
        super().__init__()
        dilations = tuple(int(d) for d in dilations)
        if len(dilations) != 3 or min(dilations) < 1:
            raise IlsegError(f"ASPP needs three positive dilations, got {dilations!r}")
        if pooling_size < 1:
            raise IlsegError(f"ASPP pooling size must be positive, got {pooling_size!r}")
        hidden = out_channels if hidden_channels is None else hidden_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dilations = dilations
        self.pooling_size = pooling_size

        branches: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 1, bias=False)]
        for d in dilations:
            branches.append(nn.Conv2d(in_channels, hidden, 3, padding=d, dilation=d, bias=False))
        self.map_convs = nn.ModuleList(branches)
        self.map_bn = norm_layer(4 * hidden)
        self.red_conv = nn.Conv2d(4 * hidden, out_channels, 1, bias=False)

        self.global_pooling_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.global_pooling_bn = norm_layer(hidden)
        self.pool_red_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)

        self.red_bn = norm_layer(out_channels)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self._init_weights(negative_slope)

    def _init_weights(self, negative_slope: float) -> None:
        gain = nn.init.calculate_gain("leaky_relu", negative_slope)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling branch's average of ``x``: ``BxCx1x1`` or ``BxCxHxW``.

        Training mode: the global average.  Eval mode: :func:`eval_pool`,
        kept at ``1x1`` when the window covers the whole map (the convs and BN
        that follow act per pixel, so broadcasting later gives the same result).
        """
        if self.training:
            return x.mean(dim=(2, 3), keepdim=True)
        pooled, padding = _local_average(x, self.pooling_size)
        if pooled.shape[-2:] == (1, 1):
            return pooled
        return F.pad(pooled, padding, mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.training and _needs_batch_statistics_guard(self.global_pooling_bn):
            raise IlsegError(
                "the ASPP pooling branch cannot be trained with a batch of 1 image per GPU: its "
                "BatchNorm sees one value per channel; use a batch of at least 2 per GPU, "
                "SyncBatchNorm across GPUs, or frozen BN"
            )
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.act(self.map_bn(out)))

        pool = self.act(self.global_pooling_bn(self.global_pooling_conv(self.pool(x))))
        pool = self.pool_red_conv(pool)
        out = out + pool  # broadcasts a Bxoutx1x1 pool over the map
        return self.act(self.red_bn(out))


# DeepLab-v2's ASPP rates (Chen et al. 2017, "ASPP-L"), as the ILT paper's code uses them on the layer4
# output at output stride 8 (LTTM/IL-SemSegm, codes/LD1/network.py, ``build_decoder``: ``[6, 12, 18, 24]``).
V2_RATES: tuple[int, int, int, int] = (6, 12, 18, 24)


class ASPPv2Classifier(nn.Module):
    """DeepLab-v2's ASPP as a classifier: four dilated 3x3 convs with biases, their logits summed.

    ``BxCinxhxw -> Bx{num_classes}xhxw``::

        x --+-- 3x3 conv, rate 6,  bias --+
            +-- 3x3 conv, rate 12, bias --+-- sum -> logits
            +-- 3x3 conv, rate 18, bias --+
            +-- 3x3 conv, rate 24, bias --+

    No BN, no activation: each branch maps the body's features straight to
    class logits (``_ASPP`` in the ILT paper's ``network.py``: one biased
    ``atrous_conv2d`` per rate, ``tf.add_n`` of the four).  Every branch is
    linear, so one step's classifier for ``n`` classes concatenated with the
    next step's is the same function as one ASPP-v2 with more outputs: the
    incremental segmenter grows it one classifier per step.

    Init: weights Xavier-uniform (TensorFlow's default for ``tf.get_variable``,
    which the paper's code uses), biases 0.

    Example::

        >>> cls = ASPPv2Classifier(2048, 21)
        >>> cls(torch.zeros(1, 2048, 41, 41)).shape
        torch.Size([1, 21, 41, 41])
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = V2_RATES) -> None:
        super().__init__()
        if not rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise IlsegError(f"ASPP-v2 rates must be positive integers, got {list(rates)!r}")
        self.rates = tuple(rates)
        self.out_channels = num_classes
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in self.rates
        )
        for conv in self.branches:
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class NoHead(nn.Module):
    """The DeepLab-v2 "head": none.  The body's features go straight to the ASPP-v2 classifiers.

    ``out_channels`` is the body's, so the segmenter builds its classifiers on them.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
