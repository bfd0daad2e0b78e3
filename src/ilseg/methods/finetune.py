"""Fine-tuning (the lower bound) and joint training (the upper bound): cross-entropy alone.

Fine-tuning trains each step on its own classes from the previous step's
model, with no teacher; joint training learns all classes in one step from
all images.  Both are the reference points every incremental method sits
between (Michieli & Zanuttigh 2019, Table 1; Cermelli et al. 2020, Table 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor

from ilseg.methods.base import Method, MethodConfig, boundary_text, ce_text


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(MethodConfig):
    """Cross-entropy on the current step's labels; the common fields of :class:`MethodConfig` only."""


@dataclasses.dataclass(frozen=True)
class JointConfig(MethodConfig):
    """All classes in one step, from every training image; the common fields of :class:`MethodConfig` only."""

    def check(self) -> None:
        if self.freeze_encoder or self.freeze_bn or self.keep_old_labels:
            self.fail("joint training has a single step: freeze_encoder, freeze_bn and keep_old_labels do not apply")


class Finetune(Method):
    """``L = CE(y)`` at every step."""

    config_class: ClassVar[type[MethodConfig]] = FinetuneConfig

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        return self.cross_entropy_only(student["logits"], target)

    def describe(self) -> str:
        return f"{self.cfg.name}: L = {ce_text(self.cfg)} {boundary_text(self, distils=False)}"


class Joint(Finetune):
    """``L = CE(y)`` over all classes in one step."""

    config_class = JointConfig
    all_classes_at_once = True


PRESETS: dict[str, MethodConfig] = {
    "finetune": FinetuneConfig(name="finetune"),
    "joint": JointConfig(name="joint"),
}
