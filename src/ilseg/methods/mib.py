"""MiB (Cermelli et al., "Modeling the Background for Incremental Learning in Semantic Segmentation", CVPR 2020).

From step 1 on, MiB models the background shift: its **unbiased
cross-entropy** counts a background pixel as background *or any old class*
(:func:`~ilseg.methods.losses.unbiased_cross_entropy`), its **unbiased
distillation** compares the teacher's background with the student's
background *or any new class* (:func:`~ilseg.methods.losses.kd_unbiased`),
and each new classifier starts from the background's weights, sharing out its
probability (``classifier_init: background``).  The preset is its code's
``--method MiB`` (fcdl94/MiB ``argparser.py``): KD weight 10, alpha 1, CE over
all pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ilseg.methods.base import (
    NON_NEGATIVE,
    POSITIVE,
    ClassifierInit,
    Method,
    MethodConfig,
    boundary_text,
    ce_text,
    weight_text,
    weighted_total,
)
from ilseg.methods.losses import CEReduction, kd_unbiased, unbiased_cross_entropy


@dataclasses.dataclass(frozen=True)
class MiBConfig(MethodConfig):
    """MiB's settings (and the common fields of :class:`MethodConfig`, with MiB's defaults).

    Attributes:
        kd_weight: weight of the unbiased distillation; with 0 the term is off.
        kd_alpha: scale of the teacher's logits in it.
    """

    ce_reduction: CEReduction = "all"
    classifier_init: ClassifierInit = "background"
    kd_weight: float = dataclasses.field(default=10.0, metadata=NON_NEGATIVE)
    kd_alpha: float = dataclasses.field(default=1.0, metadata=POSITIVE)


class MiB(Method):
    """``L = UNCE(y) + kd_weight * UNKD`` from step 1 on; ``CE(y)`` at step 0."""

    config_class = MiBConfig
    cfg: MiBConfig

    @property
    def needs_teacher(self) -> bool:
        return True  # the unbiased CE needs the teacher's channel count even without the distillation

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        logits = student["logits"]
        if teacher is None:
            return self.cross_entropy_only(logits, target)
        old_logits = teacher["logits"]
        losses = {"ce": unbiased_cross_entropy(logits, target, old_logits.shape[1], reduction=cfg.ce_reduction)}
        if cfg.kd_weight > 0:
            losses["kd"] = kd_unbiased(logits, old_logits, alpha=cfg.kd_alpha)
        return weighted_total(losses, {"kd": cfg.kd_weight})

    def describe(self) -> str:
        cfg = self.cfg
        terms = [ce_text(cfg, unbiased=True)]
        if cfg.kd_weight > 0:
            terms.append(f"{weight_text(cfg.kd_weight)}*UNKD(alpha={weight_text(cfg.kd_alpha)})")
        return f"{cfg.name}: L = {' + '.join(terms)} {boundary_text(self, distils=True)}"


PRESETS: dict[str, MethodConfig] = {
    # MiB as its code's `--method MiB` sets it: unbiased CE and unbiased KD (weight 10, alpha 1),
    # new classifiers from the background, CE divided by all pixels.
    "mib": MiBConfig(name="mib"),
}
