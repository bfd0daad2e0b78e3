"""ILT (Michieli & Zanuttigh, "Incremental learning techniques for semantic segmentation", ICCV-W 2019).

From step 1 on, the student learns the new classes with cross-entropy while
distilling from the previous step's model (the teacher):

* **output distillation**, in one of two forms (``kd``):
  ``"ilt_mib_code"``, ILT's ``L_KD`` as MiB's code computes it (its ILT
  baseline, which cssegmentation's ILT page runs:
  :func:`~ilseg.methods.losses.kd_mib`), or ``"ilt_output"``, the paper's own
  ``L'_D`` (:func:`~ilseg.methods.losses.kd_ilt_output`);
* **feature distillation** ``L''_D`` / ``L_FD``: the mean squared distance of
  the encoder's features (:func:`~ilseg.methods.losses.feature_distillation`);
* the paper's **frozen encoder** (``freeze_encoder``, "EF") and its protocol in
  which old classes keep their labels (``keep_old_labels``).

``L = CE(y) + kd_weight * KD + fd_weight * FD``.  The presets are the
cssegmentation / MiB recipe (``ilt``) and the paper's variants (``ilt-kd-out``
... ``ilt-kd-out-feat``, Table 2 of the paper); docs/methods.md gives every
formula and source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from ilseg.methods.base import (
    NON_NEGATIVE,
    POSITIVE,
    Method,
    MethodConfig,
    boundary_text,
    ce_text,
    weight_text,
    weighted_total,
)
from ilseg.methods.losses import KDMask, feature_distillation, kd_ilt_output, kd_mib

KDKind = Literal["none", "ilt_mib_code", "ilt_output"]


@dataclasses.dataclass(frozen=True)
class ILTConfig(MethodConfig):
    """ILT's distillation terms (and the common fields of :class:`MethodConfig`).

    Attributes:
        kd: output distillation: ``"none"``, ``"ilt_mib_code"`` (ILT's ``L_KD``
            as MiB's code computes it: the student's log-softmax over the old
            channels only, divided by ``C_old``) or ``"ilt_output"`` (the
            paper's ``L'_D``).  ``"mib"``, its name before ilseg 0.2, is read
            as ``"ilt_mib_code"``.
        kd_weight: weight of the output distillation; with 0 the term is off.
        kd_alpha: teacher-logit scale of ``"ilt_mib_code"``.
        kd_temperature: temperature of ``"ilt_output"``.
        kd_mask: pixels ``"ilt_output"`` averages over: ``"old_bgr"`` (old
            classes and background; 255 excluded), ``"all"`` (every pixel,
            255 included) or ``"old"``.  ``"all"`` is a known difference
            from the paper's code, whose ``applied_to='all'`` keeps only the
            labelled pixels (``gt <= num_classes - 1``) and so drops 255
            (docs/fidelity.md); no preset uses it.
        fd_weight: weight of the feature distillation (MSE of the body's features).
    """

    kd: KDKind = "none"
    kd_weight: float = dataclasses.field(default=0.0, metadata=NON_NEGATIVE)
    kd_alpha: float = dataclasses.field(default=1.0, metadata=POSITIVE)
    kd_temperature: float = dataclasses.field(default=1.0, metadata=POSITIVE)
    kd_mask: KDMask = "old_bgr"
    fd_weight: float = dataclasses.field(default=0.0, metadata=NON_NEGATIVE)

    def check(self) -> None:
        if self.kd == "none" and self.kd_weight > 0:
            self.fail(f"kd_weight = {self.kd_weight} but kd = 'none'; choose kd 'ilt_mib_code' or 'ilt_output', "
                      "or set kd_weight to 0")

    @property
    def uses_kd(self) -> bool:
        """Whether the output-distillation term is on (a kind and a positive weight)."""
        return self.kd != "none" and self.kd_weight > 0


class ILT(Method):
    """``L = CE(y) + kd_weight * KD + fd_weight * FD`` from step 1 on; ``CE(y)`` at step 0."""

    config_class = ILTConfig
    cfg: ILTConfig

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.uses_kd or self.cfg.fd_weight > 0

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        logits = student["logits"]
        if teacher is None or not self.needs_teacher:
            return self.cross_entropy_only(logits, target)
        losses = {"ce": self.cross_entropy(logits, target)}
        if cfg.uses_kd:
            if cfg.kd == "ilt_mib_code":
                losses["kd"] = kd_mib(logits, teacher["logits"], alpha=cfg.kd_alpha)
            else:
                losses["kd"] = kd_ilt_output(logits, teacher["logits"], target, temperature=cfg.kd_temperature,
                                             mask=cfg.kd_mask)
        if cfg.fd_weight > 0:
            losses["fd"] = feature_distillation(student["features"], teacher["features"])
        return weighted_total(losses, {"kd": cfg.kd_weight, "fd": cfg.fd_weight})

    def describe(self) -> str:
        cfg = self.cfg
        terms = [ce_text(cfg)]
        if cfg.uses_kd and cfg.kd == "ilt_mib_code":
            terms.append(f"{weight_text(cfg.kd_weight)}*KD_ilt_mib_code(alpha={weight_text(cfg.kd_alpha)})")
        elif cfg.uses_kd:
            terms.append(f"{weight_text(cfg.kd_weight)}*KD_out(T={weight_text(cfg.kd_temperature)}, "
                         f"pixels={cfg.kd_mask})")
        if cfg.fd_weight > 0:
            terms.append(f"{weight_text(cfg.fd_weight)}*FD")
        return f"{cfg.name}: L = {' + '.join(terms)} {boundary_text(self, distils=self.needs_teacher)}"


PRESETS: dict[str, MethodConfig] = {
    # MiB / cssegmentation recipe (what cssegmentation's ILT page runs).
    # MiB itself divides the CE by all pixels: override ce_reduction="all" to match it.
    "ilt": ILTConfig(name="ilt", kd="ilt_mib_code", kd_weight=100.0, kd_alpha=1.0, fd_weight=100.0),
    # ILT paper variants, original protocol (old classes keep their labels).
    "ilt-kd-out": ILTConfig(name="ilt-kd-out", kd="ilt_output", kd_weight=1.0, kd_mask="old_bgr",
                            keep_old_labels=True),
    "ilt-kd-feat": ILTConfig(name="ilt-kd-feat", fd_weight=50.0, keep_old_labels=True),
    "ilt-ef": ILTConfig(name="ilt-ef", freeze_encoder=True, keep_old_labels=True),
    "ilt-ef-kd-out": ILTConfig(name="ilt-ef-kd-out", kd="ilt_output", kd_weight=1.0, freeze_encoder=True,
                               keep_old_labels=True),
    "ilt-kd-out-feat": ILTConfig(name="ilt-kd-out-feat", kd="ilt_output", kd_weight=1.0, fd_weight=50.0,
                                 keep_old_labels=True),
}
