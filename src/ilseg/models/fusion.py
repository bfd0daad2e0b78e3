"""Folding eval-mode BatchNorm into the convolution before it, for the frozen teacher.

The teacher of a distilling method runs forward only, in eval mode, with
frozen weights: each ``BN(conv(x))`` is then one affine map per channel after a
convolution, which a single convolution with rescaled weights and a bias
computes (``torch.nn.utils.fusion.fuse_conv_bn_eval``).  That removes one pass
over every activation map of the body, which is a large part of a forward
pass on memory-bound hardware.  The outputs equal the unfolded model's up to
float rounding (tested), so the teacher's targets do not change.

Pairs folded: every ``convN`` / ``bnN`` of the ResNet stem and blocks, each
block's ``downsample`` (conv, BN), and the ASPP pooling branch's conv and BN.
The ASPP's other BNs follow a concatenation or a sum and are left as they are.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_FOLDED_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("0", "1"),
                 ("global_pooling_conv", "global_pooling_bn"))


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BN of ``model`` into its convolution, in place; return how many.

    Only for a model that stays in eval mode and is not trained (a teacher):
    the BN's running statistics and affine parameters become the conv's
    weights and bias, and the BN an ``nn.Identity``.

    Raises:
        ValueError: a BN to fold is in training mode.
    """
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _FOLDED_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not isinstance(conv, nn.Conv2d) or type(bn) is not nn.BatchNorm2d:
                continue
            if bn.training:
                raise ValueError("fold_batchnorm needs eval-mode BatchNorm (a frozen teacher)")
            fused = fuse_conv_bn_eval(conv, bn)
            fused.requires_grad_(False)
            setattr(module, conv_name, fused)
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded
