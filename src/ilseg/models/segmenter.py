"""The incremental DeepLab-v3 segmenter: ResNet body, ASPP head, one classifier per step.

:class:`IncrementalSegmenter` concatenates the per-step 1x1 classifiers in step
order, so output channel ``k`` is class ``task.order[k]``
(docs/architecture.md).  Growing it for a new step is one call,
:meth:`IncrementalSegmenter.add_step`.  The functions below are what the
methods apply at step boundaries:

* :func:`freeze_bn` - every BN in eval mode with frozen affine parameters
  (the original ILT protocol);
* :func:`freeze_encoder` - the ResNet body frozen (ILT's "EF" variant);
* :func:`unfreeze` - undo both;
* :func:`copy_for_teacher` - a frozen eval-mode copy to distil from.

Freezing survives ``model.train()``: the model remembers it and puts the frozen
BNs back in eval mode.  Frozen parameters get ``requires_grad=False``, so they
receive no gradient, SGD skips them (their ``.grad`` stays ``None``, so not even
weight decay moves them), and an optimiser built from
``p for p in model.parameters() if p.requires_grad`` leaves them out.  Freeze
before wrapping the model in DistributedDataParallel (DDP registers the
trainable parameters when it is built); SyncBatchNorm conversion keeps it.

Example::

    >>> model = build_segmenter(backbone="resnet18", classes_per_step=[16])
    >>> model.add_step(1, init="background")
    >>> out = model.eval()(torch.zeros(1, 3, 64, 64))
    >>> out["logits"].shape, out["features"].shape
    (torch.Size([1, 17, 64, 64]), torch.Size([1, 512, 4, 4]))
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ilseg.errors import IlsegError
from ilseg.models.aspp import (
    ASPP,
    DEFAULT_DILATIONS,
    V2_RATES,
    ASPPv2Classifier,
    NoHead,
)
from ilseg.models.backbone import (
    LEAKY_SLOPE,
    SUPPORTED_DEPTHS,
    SUPPORTED_OUTPUT_STRIDES,
    ResNet,
    StrideOn,
)
from ilseg.models.pretrained import load_pretrained

_BatchNorm = nn.modules.batchnorm._BatchNorm

BACKBONES: dict[str, int] = {f"resnet{depth}": depth for depth in SUPPORTED_DEPTHS}

HeadKind = Literal["aspp", "aspp_v2"]
Activation = Literal["leaky_relu", "relu"]
HEADS: tuple[HeadKind, ...] = ("aspp", "aspp_v2")
ACTIVATIONS: dict[Activation, float] = {"leaky_relu": LEAKY_SLOPE, "relu": 0.0}  # the body's negative slope
# The intermediate maps a method can ask the model for (IncrementalSegmenter.taps), in forward order.
TAPS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4", "head", "logits_lowres")

Classifier = nn.Conv2d | ASPPv2Classifier


class IncrementalSegmenter(nn.Module):
    """``body`` (ResNet) -> ``head`` (ASPP) -> ``classifiers`` (one 1x1 conv per step).

    Args:
        body: the backbone; must expose ``out_channels``.
        head: the ASPP; must expose ``out_channels``.
        classes_per_step: output channels of each step's classifier so far
            (background is channel 0 of step 0).
        classifier_rates: ``None``: each step's classifier is a 1x1 conv
            (DeepLab-v3).  A tuple of rates: each step's classifier is an
            :class:`~ilseg.models.aspp.ASPPv2Classifier` with those rates
            (DeepLab-v2, with a :class:`~ilseg.models.aspp.NoHead` head).

    ``forward(x)`` with ``x`` of shape ``Bx3xHxW`` returns a dict:

    * ``"logits"``: ``BxCxHxW`` with ``C = num_outputs``, bilinearly upsampled
      (``align_corners=False``) to the input size, or ``BxCxhxw`` at feature
      resolution with ``upsample=False``;
    * ``"features"``: ``Bx{body.out_channels}xhxw``, the body's output after its
      last activation (what ILT's feature distillation compares);
    * ``"taps"``, only while ``model.taps`` names maps (a method asks for them:
      :meth:`ilseg.methods.Method.taps`): ``{name: map}`` for each name of
      :data:`TAPS` it lists.  ``"layer1"`` .. ``"layer4"``: each ResNet stage's
      pre-activation output (the residual sum of its last block, before its
      activation); ``"head"``: the head output (after its last BN and
      activation); ``"logits_lowres"``: the concatenated classifier logits at
      head resolution (before upsampling).  For a 512x512 crop, ResNet-101 and
      output stride 16: ``256x128x128``, ``512x64x64``, ``1024x32x32``,
      ``2048x32x32``, ``256x32x32``, ``Cx32x32`` per image.  The stage maps
      need a :class:`~ilseg.models.backbone.ResNet` body.

    ``taps`` is a plain attribute (not a parameter or buffer, so not in the
    state dict), empty by default: then the forward pass computes and keeps
    exactly what it did before taps existed.  Set it once, before wrapping the
    model in DDP or ``torch.compile`` and before :func:`copy_for_teacher` (the
    copy inherits it), rather than per call::

        >>> model.taps = TAPS
        >>> [m.shape[1] for m in model(x)["taps"].values()]  # resnet18, 16 head channels, 5 classes
        [64, 128, 256, 512, 16, 5]
    """

    def __init__(self, body: nn.Module, head: nn.Module, classes_per_step: Sequence[int], *,
                 classifier_rates: Sequence[int] | None = None) -> None:
        super().__init__()
        _check_classes_per_step(classes_per_step)
        self.body = body
        self.head = head
        self.head_channels = int(getattr(head, "out_channels"))
        self.classifier_rates = None if classifier_rates is None else tuple(classifier_rates)
        self.classifiers = nn.ModuleList(self._new_classifier(int(n)) for n in classes_per_step)
        self.bn_frozen = False
        self.encoder_frozen = False
        self.is_teacher = False
        self.taps: tuple[str, ...] = ()

    @property
    def classes_per_step(self) -> tuple[int, ...]:
        """Output channels of each step's classifier, in step order."""
        return tuple(cls.out_channels for cls in self._classifier_convs())

    @property
    def num_outputs(self) -> int:
        """Total output channels (classes seen so far, background included)."""
        return sum(self.classes_per_step)

    def forward(self, x: torch.Tensor, upsample: bool = True) -> dict[str, Any]:
        if self.taps:
            return self._forward_with_taps(x, upsample)
        features = self.body(x)
        head_out = self.head(features)
        logits = torch.cat([cls(head_out) for cls in self.classifiers], dim=1)
        if upsample:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "features": features}

    def _forward_with_taps(self, x: torch.Tensor, upsample: bool) -> dict[str, Any]:
        """``forward`` plus ``"taps"``: the same outputs, and the maps ``self.taps`` names."""
        unknown = [name for name in self.taps if name not in TAPS]
        if unknown:
            raise IlsegError(f"the model has no map {unknown[0]!r} to tap; it has: {', '.join(TAPS)}")
        maps: dict[str, torch.Tensor] = {}
        if any(name.startswith("layer") for name in self.taps):
            if not isinstance(self.body, ResNet):
                raise IlsegError(f"the stage maps {', '.join(TAPS[:4])} need a ResNet body, "
                                 f"got {type(self.body).__name__}")
            features, stage_maps = self.body.forward_with_stages(x)
            maps |= dict(zip(TAPS[:4], stage_maps))
        else:
            features = self.body(x)
        head_out = self.head(features)
        small_logits = torch.cat([cls(head_out) for cls in self.classifiers], dim=1)
        maps |= {"head": head_out, "logits_lowres": small_logits}
        logits = small_logits
        if upsample:
            logits = F.interpolate(small_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": logits, "features": features, "taps": {name: maps[name] for name in self.taps}}

    def add_step(self, num_classes: int, *, init: Literal["default", "background"] = "default") -> None:
        """Append a classifier for ``num_classes`` new classes, on the model's device and dtype.

        ``init="default"``: PyTorch's default conv init (the MiB/cssegmentation
        ILT recipe), or an ASPP-v2 classifier's own init.  ``init="background"``: MiB's init - every new channel
        copies the background channel's weight (channel 0 of the first
        classifier) and gets bias ``b_bg - log(n_new + 1)``; the background
        bias itself becomes ``b_bg - log(n_new + 1)`` too, so the background
        probability is shared out among background and new classes.
        Old outputs are unchanged by ``"default"``; ``"background"`` changes
        only the background logit.  With ASPP-v2 classifiers every branch is
        copied from the background's, and the shift goes into the first
        branch's bias (the logit is the branches' sum).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise IlsegError(f"a new step needs a positive number of classes, got {num_classes!r}")
        if init not in ("default", "background"):
            raise IlsegError(f"classifier init must be 'default' or 'background', got {init!r}")
        first = self._classifier_convs()[0]
        reference = next(first.parameters())
        new = self._new_classifier(num_classes).to(device=reference.device, dtype=reference.dtype)
        if init == "background":
            _init_from_background(first, new, num_classes)
        if self.is_teacher:
            new.requires_grad_(False)
        new.train(self.training and not self.is_teacher)
        self.classifiers.append(new)

    def _classifier_convs(self) -> list[Classifier]:
        return [cls for cls in self.classifiers if isinstance(cls, (nn.Conv2d, ASPPv2Classifier))]

    def _new_classifier(self, num_classes: int) -> Classifier:
        """A 1x1 conv, or an ASPP-v2 classifier when the model has ``classifier_rates``."""
        if self.classifier_rates is None:
            return nn.Conv2d(self.head_channels, num_classes, kernel_size=1)
        return ASPPv2Classifier(self.head_channels, num_classes, self.classifier_rates)

    def train(self, mode: bool = True) -> IncrementalSegmenter:
        """Set train/eval mode, keeping frozen BNs (and a teacher) in eval mode."""
        super().train(mode and not self.is_teacher)
        if self.bn_frozen:
            _set_bn_eval(self)
        elif self.encoder_frozen:
            _set_bn_eval(self.body)
        return self


def _init_from_background(first: Classifier, new: Classifier, num_classes: int) -> None:
    """MiB's init of ``new`` from the background channel of ``first`` (see :meth:`IncrementalSegmenter.add_step`)."""
    firsts = list(first.branches) if isinstance(first, ASPPv2Classifier) else [first]
    news = list(new.branches) if isinstance(new, ASPPv2Classifier) else [new]
    with torch.no_grad():
        for index, (old, fresh) in enumerate(zip(firsts, news, strict=True)):
            assert isinstance(old, nn.Conv2d) and isinstance(fresh, nn.Conv2d)
            assert old.bias is not None and fresh.bias is not None  # every classifier has a bias
            fresh.weight.copy_(old.weight[0:1].expand_as(fresh.weight))
            bias = old.bias[0] - math.log(num_classes + 1) if index == 0 else old.bias[0]
            fresh.bias.fill_(bias.item())
            old.bias[0] = bias


def _check_classes_per_step(classes_per_step: Sequence[int]) -> None:
    if isinstance(classes_per_step, (str, bytes)) or len(classes_per_step) == 0:
        raise IlsegError(f"classes_per_step must be a non-empty list of counts, got {classes_per_step!r}")
    for n in classes_per_step:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise IlsegError(f"classes_per_step must hold positive integers, got {list(classes_per_step)!r}")


def _set_bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def freeze_bn(model: IncrementalSegmenter, *, affine: bool = True) -> None:
    """Freeze every BN of ``model`` (body and head): eval mode, and (``affine``) its scale and offset.

    Running statistics stop updating, and stay frozen across ``model.train()``.
    ``affine=False`` leaves the scale and offset trainable (what the ILT
    paper's TensorFlow code trains: its BN variables are in the optimiser's
    list although created ``trainable=False``, docs/fidelity.md).
    """
    model.bn_frozen = True
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            if affine:
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)


def freeze_encoder(model: IncrementalSegmenter) -> None:
    """Freeze the ResNet body (ILT's EF): no gradient into it, its BNs in eval mode.

    Head and classifiers stay trainable.  Survives ``model.train()``.
    """
    model.encoder_frozen = True
    model.body.requires_grad_(False)
    _set_bn_eval(model.body)


def unfreeze(model: IncrementalSegmenter) -> None:
    """Undo :func:`freeze_bn` and :func:`freeze_encoder`: everything trainable again.

    The BNs return to the model's current mode.
    """
    model.bn_frozen = False
    model.encoder_frozen = False
    model.requires_grad_(True)
    model.train(model.training)


def copy_for_teacher(model: IncrementalSegmenter) -> IncrementalSegmenter:
    """A deep copy to distil from: eval mode (kept by ``train()``), ``requires_grad=False``.

    The copy shares no storage with ``model``; later training leaves it alone.
    """
    teacher = copy.deepcopy(model)
    teacher.is_teacher = True
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def build_segmenter(
    *,
    backbone: str = "resnet101",
    output_stride: int = 16,
    head_channels: int = 256,
    classes_per_step: Sequence[int],
    pretrained: str | None = None,
    aspp_dilations: Sequence[int] | None = None,
    backbone_width: int = 64,
    head: HeadKind = "aspp",
    frozen_bn: bool = False,
    frozen_bn_affine: bool = True,
    stride_on: StrideOn = "3x3",
    activation: Activation = "leaky_relu",
) -> IncrementalSegmenter:
    """DeepLab-v3 (MiB's variant), or DeepLab-v2, with one classifier per step so far.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``.
        output_stride: 16 (default), 8, or 32 (no dilation, for speed).
        head_channels: ASPP width (256 in the papers).
        classes_per_step: classifier sizes, e.g. ``[16, 1]`` after the first
            increment of VOC 15-1.
        pretrained: body weights: ``None`` (random init), ``"imagenet"``
            (torchvision's ImageNet weights from the torch hub cache,
            downloaded if absent), or a path to a local checkpoint in
            torchvision's or InPlace-ABN's format (see
            :mod:`ilseg.models.pretrained`).  Head and classifiers always start
            from their own init.
        aspp_dilations: overrides the dilations chosen by the output stride
            (``(6, 12, 18)`` at 16, ``(12, 24, 32)`` at 8 as in MiB).
        backbone_width: the ResNet's base width (64 as published; smaller
            for thin CPU models, which cannot load pretrained weights).
        head: ``"aspp"`` (DeepLab-v3: the ASPP head, 1x1 classifiers) or
            ``"aspp_v2"`` (DeepLab-v2: no head, each step's classifier an
            ASPP-v2 of rates 6/12/18/24 on the body's output;
            ``head_channels`` and ``aspp_dilations`` then do not apply).
        frozen_bn: every BN frozen from the start (:func:`freeze_bn`), as
            DeepLab-v2 and the ILT paper's code train.
        frozen_bn_affine: with ``frozen_bn``, the BNs' scale and offset are
            frozen too; ``False`` trains them (the ILT paper's code).
        stride_on: which conv of a stage's first bottleneck strides:
            ``"3x3"`` (torchvision, ResNet v1.5) or ``"1x1"`` (Caffe ResNet).
        activation: the body's ``"leaky_relu"`` (0.01, MiB) or ``"relu"``.

    Raises:
        IlsegError: unknown backbone, stride or sizes; missing or incompatible
            weights.
    """
    _check_build_args(backbone, output_stride, head_channels, classes_per_step, pretrained, backbone_width, head,
                      activation)
    body = ResNet(BACKBONES[backbone], output_stride=output_stride, width=backbone_width, stride_on=stride_on,
                  negative_slope=ACTIVATIONS[activation])
    if pretrained is not None:
        load_pretrained(body, pretrained)
    if head == "aspp_v2":
        model = IncrementalSegmenter(body, NoHead(body.out_channels), classes_per_step, classifier_rates=V2_RATES)
    else:
        dilations = DEFAULT_DILATIONS[output_stride] if aspp_dilations is None else tuple(aspp_dilations)
        aspp = ASPP(body.out_channels, head_channels, dilations=dilations)
        model = IncrementalSegmenter(body, aspp, classes_per_step)
    if frozen_bn:
        freeze_bn(model, affine=frozen_bn_affine)
    return model


def _check_build_args(backbone: str, output_stride: int, head_channels: int, classes_per_step: Sequence[int],
                      pretrained: str | None, backbone_width: int, head: str, activation: str) -> None:
    """Refuse, with the value named, what :func:`build_segmenter` cannot build."""
    if backbone not in BACKBONES:
        raise IlsegError(f"unknown backbone {backbone!r}; use one of {sorted(BACKBONES)}")
    if output_stride not in SUPPORTED_OUTPUT_STRIDES:
        raise IlsegError(
            f"output stride {output_stride!r} is not supported; use one of {SUPPORTED_OUTPUT_STRIDES}"
        )
    if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 1:
        raise IlsegError(f"head_channels must be a positive integer, got {head_channels!r}")
    _check_classes_per_step(classes_per_step)
    if pretrained is not None and backbone_width != 64:
        raise IlsegError(f"pretrained weights need model.width 64, got {backbone_width}; train without them: --set model.pretrained=null")
    if head not in HEADS:
        raise IlsegError(f"unknown head {head!r}; use one of {HEADS}")
    if activation not in ACTIVATIONS:
        raise IlsegError(f"unknown activation {activation!r}; use one of {tuple(ACTIVATIONS)}")
