"""Models: ResNet body, ASPP head, the incremental segmenter, weight loading.

Entry points (docs/architecture.md): :func:`build_segmenter`,
:meth:`IncrementalSegmenter.add_step`, :func:`freeze_bn`,
:func:`freeze_encoder`, :func:`copy_for_teacher`, :func:`load_iabn_checkpoint`,
:func:`convert_sync_batchnorm`.
"""

from ilseg.models.aspp import ASPP, DEFAULT_DILATIONS, eval_pool
from ilseg.models.backbone import ResNet
from ilseg.models.fusion import fold_batchnorm
from ilseg.models.pretrained import (
    imagenet_cache_path,
    load_iabn_checkpoint,
    load_imagenet_weights,
    load_pretrained,
)
from ilseg.models.segmenter import (
    BACKBONES,
    TAPS,
    IncrementalSegmenter,
    build_segmenter,
    copy_for_teacher,
    freeze_bn,
    freeze_encoder,
    unfreeze,
)
from ilseg.models.sync_bn import CPUSyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "ASPP",
    "BACKBONES",
    "CPUSyncBatchNorm",
    "DEFAULT_DILATIONS",
    "TAPS",
    "IncrementalSegmenter",
    "ResNet",
    "build_segmenter",
    "convert_sync_batchnorm",
    "copy_for_teacher",
    "eval_pool",
    "fold_batchnorm",
    "freeze_bn",
    "freeze_encoder",
    "imagenet_cache_path",
    "load_iabn_checkpoint",
    "load_imagenet_weights",
    "load_pretrained",
    "unfreeze",
]
