"""EWF (Xiao, Zhang, Feng, Liu, van de Weijer, Cheng, "Endpoints Weight Fusion for Class Incremental Semantic
Segmentation", CVPR 2023), on top of MiB or PLOP.

EWF adds no loss of its own: a step ``t > 0`` trains with the losses of its
**base** method (``base: plop``, the authors' ``plop+ours`` scripts, or
``base: mib``, their ``mib+ours`` scripts: :class:`~ilseg.methods.plop.PLOP`,
:class:`~ilseg.methods.mib.MiB`, run here by composition), with two changes:

* the **old classifiers are frozen** during the step (``freeze_old_classifiers``,
  the code's ``--fix_pre_cls``): only body, head and the step's new classifier
  train; the background bias that MiB's initialisation lowered stays lowered;
* after the step trains, the **endpoints are fused** (``fusion``, the code's
  ``--weight_fusion``): every floating-point entry ``theta`` of the previous
  step's final model (body, head, BatchNorm affine parameters *and* running
  statistics, the old classifiers) is replaced by

      theta <- (1 - a) * theta_old + a * theta_new,   a = sqrt(N_new / (N_old + N_new))

  with ``N_old`` the channels before the step (background included) and
  ``N_new`` the step's classes (:func:`fusion_weight`, :func:`fuse_endpoints`).
  The new classifier has no old counterpart and keeps its trained weights.
  The fused model is the one evaluated, saved as ``step{t}.pth`` and the
  teacher and starting point of step ``t + 1``.

The fusion reads the previous model from a copy this method takes at
:meth:`EWF.start_step` (on the CPU, before the new classifier's background
initialisation changes the background bias): the engine folds the teacher's
BatchNorms into its convolutions, so the teacher handed to
:meth:`EWF.finish_step` no longer holds the previous model's entries.  The
copy is rebuilt by every ``start_step`` (a resumed step starts from the same
previous checkpoint), so it is not method state.

Sources (schuy1er/EWF_official, code at commit 93d0f40): ``run.py:511-545``
(the fusion, on rank 0, on the CPU, over every entry of the previous
checkpoint's ``model_state``; ``run.py:522`` the coefficient from
``train.py:144-150``), ``run.py:526-540`` (``--threshold_choice``, off in every
script: :attr:`EWFConfig.fuse_largest_changes`), ``train.py:333-342``
(``--fix_pre_cls``), ``train.py:586`` (the total loss: the base method's terms,
EWF's ``cls_contrast_loss`` is a constant 0), ``argparser.py:44-57`` (``--method
MiB`` / ``--method PLOP``), ``scripts/voc/{mib,plop}+ours_*.sh`` and
``scripts/ade/mib+ours_100-50.sh``.  The paper's text was not at hand: see
docs/methods.md "EWF".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from ilseg.errors import IlsegError
from ilseg.methods.base import (
    NON_NEGATIVE,
    POSITIVE,
    ClassifierInit,
    Method,
    MethodConfig,
    Reduce,
    StepSetup,
    TeacherBatch,
)
from ilseg.methods.losses import CEReduction
from ilseg.methods.mib import MiB, MiBConfig
from ilseg.methods.plop import PLOP_THRESHOLD_FLOOR, PLOP, PLOPConfig, ThresholdMode
from ilseg.models import IncrementalSegmenter
from ilseg.tasks import Task

Base = Literal["mib", "plop"]

# The fields each base method reads (their defaults are those of MiBConfig / PLOPConfig).
MIB_FIELDS: tuple[str, ...] = ("kd_weight", "kd_alpha")
PLOP_FIELDS: tuple[str, ...] = ("pod_factor", "pod_logits_factor", "pseudo_labels", "pseudo_threshold",
                                "pseudo_floor")
COMMON_FIELDS: tuple[str, ...] = ("ce_reduction", "classifier_init", "freeze_encoder", "freeze_bn",
                                  "keep_old_labels")


# ---------------------------------------------------------------- the fusion


def fusion_weight(num_old: int, num_new: int) -> float:
    """EWF's coefficient of the *new* model: ``a = sqrt(N_new / (N_old + N_new))`` (``run.py:522``).

    Args:
        num_old: the channels before the step, background included (the code's
            ``old_classes``, ``train.py:147``).
        num_new: the classes the step adds (``nb_new_classes``, ``train.py:150``).

    Example::

        >>> fusion_weight(7, 9)   # sqrt(9/16)
        0.75
    """
    if num_old < 1 or num_new < 1:
        raise ValueError(f"EWF fuses a step with old and new classes, got {num_old} old and {num_new} new")
    return math.sqrt(num_new / (num_new + num_old))


def fuse_endpoints(old: Mapping[str, Tensor], new: Mapping[str, Tensor], weight: float, *,
                   largest_changes: float = 0.0) -> dict[str, Tensor]:
    """The fused value of every floating-point entry of ``old``: ``(1 - weight) * old + weight * new``.

    Computed as the code computes it (``run.py:543``): in the entries' dtype
    (float32), each product rounded, then the sum; the two models' entries
    must have the same shapes.  Integer entries (BatchNorm's
    ``num_batches_tracked``) are left out: the caller keeps the new model's.

    Args:
        old: the previous model's state (names to tensors).
        new: the trained model's state; it may hold more entries (the new
            classifier), which are not returned.
        weight: ``a``, the new model's coefficient (:func:`fusion_weight`).
        largest_changes: 0: every entry is fused.  ``q`` in ``(0, 1]``: the
            code's ``--threshold_choice`` (``run.py:526-540``, ``q = 0.45``):
            with ``d = |old - new|`` over the elements of all fused entries
            together and ``d_k`` its ``k``-th largest value, ``k = floor(q n)``,
            elements with ``d < d_k`` keep the new value, the others are fused.

    Returns:
        ``{name: fused tensor}`` on ``new``'s devices.

    Example::

        >>> old, new = {"w": torch.tensor([4.0, 0.0])}, {"w": torch.tensor([8.0, 2.0])}
        >>> fuse_endpoints(old, new, 0.75)["w"]
        tensor([7.0000, 1.5000])
    """
    if not 0.0 <= largest_changes <= 1.0:
        raise ValueError(f"largest_changes must be in [0, 1], got {largest_changes}")
    pairs = {}
    for name, before in old.items():
        if not before.is_floating_point():
            continue
        if name not in new or new[name].shape != before.shape:
            found = tuple(new[name].shape) if name in new else "nothing"
            raise IlsegError(f"cannot fuse {name!r}: the previous model has {tuple(before.shape)}, "
                             f"the trained one {found}")
        after = new[name]
        pairs[name] = (before.to(device=after.device, dtype=after.dtype), after)
    fused = {name: before * (1.0 - weight) + after * weight for name, (before, after) in pairs.items()}
    if largest_changes == 0.0 or not pairs:
        return fused
    threshold = _kth_largest_change([(before - after).abs().flatten() for before, after in pairs.values()],
                                    largest_changes)
    return {name: torch.where((before - after).abs() < threshold.to(after.device), after, fused[name])
            for name, (before, after) in pairs.items()}


def _kth_largest_change(changes: list[Tensor], share: float) -> Tensor:
    """The ``floor(share * n)``-th largest of the ``n`` values in ``changes`` (the code's ``topk(...)[0][-1]``)."""
    device = changes[0].device
    everything = torch.cat([c.to(device) for c in changes])
    count = everything.numel()
    k = int(count * share)
    if k < 1:
        raise IlsegError(f"fuse_largest_changes = {share} selects no entry of {count}")
    return torch.kthvalue(everything, count - k + 1).values


# ---------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class EWFConfig(MethodConfig):
    """EWF's settings: the base method, its fields (MiB's and PLOP's, with their defaults), and EWF's own.

    Attributes:
        base: the method whose losses train each step: ``"plop"``
            (``--method PLOP``, the ``plop+ours`` scripts) or ``"mib"``
            (``--method MiB``, the ``mib+ours`` scripts).
        kd_weight, kd_alpha: MiB's (:class:`~ilseg.methods.mib.MiBConfig`);
            only with ``base: mib``.
        pod_factor, pod_logits_factor, pseudo_labels, pseudo_threshold,
            pseudo_floor: PLOP's (:class:`~ilseg.methods.plop.PLOPConfig`);
            only with ``base: plop``.
        fusion: after each step ``t > 0``, fuse the trained model with the
            previous one (``--weight_fusion``); off: the base method with
            frozen old classifiers.
        freeze_old_classifiers: from step 1 on, the classifiers of the earlier
            steps get no gradient (``--fix_pre_cls``).
        fuse_largest_changes: 0 (every script): every entry is fused; ``q`` in
            ``(0, 1]``: only the elements among the ``floor(q n)`` largest
            changes (``--threshold_choice``: 0.45) (:func:`fuse_endpoints`).
    """

    ce_reduction: CEReduction = "all"
    classifier_init: ClassifierInit = "background"
    base: Base = "plop"
    kd_weight: float = dataclasses.field(default=10.0, metadata=NON_NEGATIVE)
    kd_alpha: float = dataclasses.field(default=1.0, metadata=POSITIVE)
    pod_factor: float = dataclasses.field(default=0.01, metadata=NON_NEGATIVE)
    pod_logits_factor: float = dataclasses.field(default=0.0005, metadata=NON_NEGATIVE)
    pseudo_labels: Literal["none", "entropy"] = "entropy"
    pseudo_threshold: ThresholdMode = "median"
    pseudo_floor: float = dataclasses.field(default=PLOP_THRESHOLD_FLOOR, metadata=NON_NEGATIVE)
    fusion: bool = True
    freeze_old_classifiers: bool = True
    fuse_largest_changes: float = dataclasses.field(default=0.0, metadata=NON_NEGATIVE)

    def check(self) -> None:
        if self.fuse_largest_changes > 1:
            self.fail(f"fuse_largest_changes is a share of the entries, at most 1, got {self.fuse_largest_changes}")
        other, other_fields = ("plop", PLOP_FIELDS) if self.base == "mib" else ("mib", MIB_FIELDS)
        defaults = {field.name: field.default for field in dataclasses.fields(EWFConfig)}
        changed = [name for name in other_fields if getattr(self, name) != defaults[name]]
        if changed:
            self.fail(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} for base {other!r}, but base is "
                      f"{self.base!r}: set base: {other}, or leave {'it' if len(changed) == 1 else 'them'} out")
        self.base_config()  # the base's own rules (PLOP's pseudo-labels need ce_reduction: all)

    def base_config(self) -> MiBConfig | PLOPConfig:
        """The config of the base method: the common fields and the base's own, under this preset's name."""
        common = {name: getattr(self, name) for name in COMMON_FIELDS}
        if self.base == "mib":
            return MiBConfig(name=self.name, **common, **{name: getattr(self, name) for name in MIB_FIELDS})
        return PLOPConfig(name=self.name, **common, **{name: getattr(self, name) for name in PLOP_FIELDS})


class EWF(Method):
    """The base method's losses at every step; from step 1 on, old classifiers frozen and, after the step,
    the trained model fused with the previous one (:func:`fuse_endpoints`)."""

    config_class = EWFConfig
    cfg: EWFConfig

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        base = self.cfg.base_config()
        self.base: MiB | PLOP = MiB(base) if isinstance(base, MiBConfig) else PLOP(base)
        self._previous: dict[str, Tensor] | None = None  # the previous step's final model (CPU), from start_step
        self._old_channels = 0  # its output channels

    @property
    def needs_teacher(self) -> bool:
        return self.base.needs_teacher

    def taps(self, step: int) -> tuple[str, ...]:
        return self.base.taps(step)

    # -- the step boundary ---------------------------------------------------------------------
    def start_step(self, model: IncrementalSegmenter, task: Task, step: int) -> StepSetup:
        """The base method's step boundary; from step 1 on, a CPU copy of the previous model first (what the
        fusion reads), and the old classifiers frozen after."""
        self._previous, self._old_channels = None, 0
        if step > 0 and self.cfg.fusion:
            self._previous = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
            self._old_channels = model.num_outputs
        setup = self.base.start_step(model, task, step)
        if step > 0 and self.cfg.freeze_old_classifiers:
            for classifier in list(setup.student.classifiers)[:-1]:
                classifier.requires_grad_(False)
        return setup

    def prepares(self, step: int) -> bool:
        return self.base.prepares(step)

    def prepare(self, batches: Iterable[TeacherBatch], step: int, *, reduce: Reduce | None = None) -> str:
        return self.base.prepare(batches, step, reduce=reduce)

    def finish_step(self, student: IncrementalSegmenter, teacher: IncrementalSegmenter | None,
                    step: int) -> None:
        """Fuse ``student`` with the previous step's model in place (``teacher`` is not read: its BatchNorms are
        folded); nothing at step 0 or with ``fusion: false``."""
        if step == 0 or not self.cfg.fusion:
            return
        if self._previous is None:
            raise ValueError(f"method {self.cfg.name!r} fuses step {step} with the model start_step copied, "
                             "but start_step was not called for it")
        num_new = student.num_outputs - self._old_channels
        weight = fusion_weight(self._old_channels, num_new)
        state = student.state_dict()
        fused = fuse_endpoints(self._previous, state, weight, largest_changes=self.cfg.fuse_largest_changes)
        with torch.no_grad():
            for name, value in fused.items():
                state[name].copy_(value)
        self._previous = None

    # -- state and losses ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base.load_state_dict(state)

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        return self.base.loss(student, teacher, target, step)

    def describe(self) -> str:
        cfg = self.cfg
        extras = []
        if cfg.freeze_old_classifiers:
            extras.append("old classifiers frozen from step 1")
        if cfg.fusion:
            which = "" if cfg.fuse_largest_changes == 0 else f" (the {cfg.fuse_largest_changes:g} largest changes only)"
            extras.append(f"after each step theta = (1-a) theta_old + a theta_new{which} over body, head, "
                          "BN statistics and old classifiers, a = sqrt(N_new / N_all)")
        suffix = f"; EWF on {cfg.base}: {'; '.join(extras)}" if extras else f"; EWF on {cfg.base}, nothing added"
        return self.base.describe() + suffix


PRESETS: dict[str, MethodConfig] = {
    # EWF as the plop+ours scripts run it (`--method PLOP --weight_fusion --fix_pre_cls`): PLOP's VOC factors.
    "ewf": EWFConfig(name="ewf"),
    # EWF as the mib+ours scripts run it (`--method MiB`, or on ADE20k `--method FT --loss_kd 10 --unce --unkd
    # --init_balanced`, the same options; `--weight_fusion --fix_pre_cls`).
    "ewf-mib": EWFConfig(name="ewf-mib", base="mib"),
}
