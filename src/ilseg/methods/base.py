"""Training methods: what changes at each step boundary, and the loss of one batch.

A method is described by a frozen :class:`MethodConfig` (data: it is loaded
from the run config and written back with the run) and run by a small
:class:`Method` object built from it.  ``METHOD_PRESETS`` names the published
settings; any field can be overridden (``method_config("ilt", {"kd_weight": 10})``).

The loss maths live in :mod:`ilseg.methods.losses`; docs/methods.md gives every
preset's formula and source.

Example::

    >>> method = build_method(method_config("ilt"))
    >>> method.needs_teacher
    True
    >>> describe_method(METHOD_PRESETS["finetune"])
    'finetune: L = CE(y) [labels: current step only]'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

from ilseg.errors import IlsegError
from ilseg.methods.losses import (
    CEReduction,
    KDMask,
    cross_entropy,
    feature_distillation,
    kd_ilt_output,
    kd_mib,
    kd_unbiased,
    unbiased_cross_entropy,
)
from ilseg.methods.plop import (
    PLOP_THRESHOLD_FLOOR,
    EntropyThresholds,
    local_pod_loss,
    plop_cross_entropy,
    pseudo_label,
)
from ilseg.models import IncrementalSegmenter, copy_for_teacher, freeze_bn, freeze_encoder
from ilseg.tasks import Task, train_lut

KDKind = Literal["none", "mib", "ilt_output", "unbiased"]
ClassifierInit = Literal["default", "background"]
PseudoLabels = Literal["none", "entropy"]
ThresholdMode = Literal["median", "plop_compat"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "ce_reduction": ("valid", "all"),
    "kd": ("none", "mib", "ilt_output", "unbiased"),
    "kd_mask": ("old_bgr", "all", "old"),
    "classifier_init": ("default", "background"),
    "pseudo_labels": ("none", "entropy"),
    "pseudo_threshold": ("median", "plop_compat"),
}
_BOOLS = ("unbiased_ce", "freeze_encoder", "freeze_bn", "keep_old_labels", "joint")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """What a method computes and freezes.  Every field is plain data.

    Attributes:
        name: the preset this config comes from (shown in reports).
        ce_reduction: ``"valid"`` divides the cross-entropy by the non-ignored
            pixels (PyTorch, cssegmentation); ``"all"`` by all pixels (MiB).
        unbiased_ce: from step 1 on, MiB's unbiased cross-entropy (background
            = background or any old class,
            :func:`~ilseg.methods.losses.unbiased_cross_entropy`).
        kd: output distillation: ``"none"``, ``"mib"`` (MiB's ILT ``L_KD``,
            :func:`~ilseg.methods.losses.kd_mib`), ``"ilt_output"`` (the ILT
            paper's ``L'_D``, :func:`~ilseg.methods.losses.kd_ilt_output`) or
            ``"unbiased"`` (MiB's own, :func:`~ilseg.methods.losses.kd_unbiased`).
        kd_weight: weight of the distillation term; with 0 the term is off.
        kd_alpha: teacher-logit scale of ``"mib"``.
        kd_temperature: temperature of ``"ilt_output"``.
        kd_mask: pixels ``"ilt_output"`` averages over: ``"old_bgr"``, ``"all"``, ``"old"``.
        fd_weight: weight of the feature distillation (MSE of layer4 features).
        pod_factor: PLOP's Local POD weight of the four ResNet stages and the
            head output (:func:`~ilseg.methods.plop.local_pod_loss`); 0 = off.
        pod_logits_factor: its weight of the logits map.
        pseudo_labels: ``"entropy"``: PLOP's pseudo-labels on background
            pixels, the CE scaled per image by the fraction kept and averaged
            over all pixels (:func:`~ilseg.methods.plop.pseudo_label`).
        pseudo_threshold: per-class entropy thresholds: ``"median"`` (the true
            median over the step's training set, all ranks together) or
            ``"plop_compat"`` (PLOP's own histogram walk, per rank).
        pseudo_floor: the smallest threshold (PLOP's ``--threshold``).
        freeze_encoder: from step 1 on, no gradient into the ResNet body (ILT's EF).
        freeze_bn: from step 1 on, BatchNorm statistics and affine parameters frozen.
        classifier_init: how a new step's classifier starts:
            ``"default"`` (PyTorch's init) or ``"background"`` (from the
            background channel, as MiB does); see :meth:`Method.start_step`.
        keep_old_labels: training targets keep old classes' labels (the ILT
            paper's own protocol) instead of turning them into background.
        joint: train all classes in one step (the upper bound).
    """

    name: str
    ce_reduction: CEReduction = "valid"
    unbiased_ce: bool = False
    kd: KDKind = "none"
    kd_weight: float = 0.0
    kd_alpha: float = 1.0
    kd_temperature: float = 1.0
    kd_mask: KDMask = "old_bgr"
    fd_weight: float = 0.0
    pod_factor: float = 0.0
    pod_logits_factor: float = 0.0
    pseudo_labels: PseudoLabels = "none"
    pseudo_threshold: ThresholdMode = "median"
    pseudo_floor: float = PLOP_THRESHOLD_FLOOR
    freeze_encoder: bool = False
    freeze_bn: bool = False
    classifier_init: ClassifierInit = "default"
    keep_old_labels: bool = False
    joint: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise IlsegError(f"method name must be a non-empty string, got {self.name!r}")
        where = f"method {self.name!r}"
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise IlsegError(f"{where}: {field} = {value!r} is not one of {', '.join(allowed)}")
        for field in _BOOLS:
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise IlsegError(f"{where}: {field} must be true or false, got {value!r}")
        for field in ("kd_weight", "fd_weight", "kd_alpha", "kd_temperature", "pod_factor", "pod_logits_factor",
                      "pseudo_floor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise IlsegError(f"{where}: {field} must be a finite number, got {value!r}")
            object.__setattr__(self, field, float(value))
        for field in ("kd_weight", "fd_weight", "pod_factor", "pod_logits_factor", "pseudo_floor"):
            if getattr(self, field) < 0:
                raise IlsegError(f"{where}: {field} must be >= 0, got {getattr(self, field)}")
        for field in ("kd_alpha", "kd_temperature"):
            if getattr(self, field) <= 0:
                raise IlsegError(f"{where}: {field} must be > 0, got {getattr(self, field)}")
        if self.kd == "none" and self.kd_weight > 0:
            raise IlsegError(
                f"{where}: kd_weight = {self.kd_weight} but kd = 'none'; choose kd 'mib', "
                "'ilt_output' or 'unbiased', or set kd_weight to 0"
            )
        if self.pseudo_labels != "none" and (self.ce_reduction != "all" or self.unbiased_ce):
            raise IlsegError(
                f"{where}: pseudo_labels = {self.pseudo_labels!r} scales each image's cross-entropy and averages it "
                "over all pixels (PLOP): set ce_reduction to 'all' and unbiased_ce to false"
            )
        if self.joint and (self.uses_kd or self.fd_weight > 0 or self.unbiased_ce or self.uses_pod
                           or self.pseudo_labels != "none"):
            raise IlsegError(
                f"{where}: joint training learns all classes in one step and has no teacher; "
                "set kd_weight, fd_weight and the POD factors to 0, unbiased_ce to false and pseudo_labels to none"
            )

    @property
    def uses_kd(self) -> bool:
        """Whether the output-distillation term is on (a kind and a positive weight)."""
        return self.kd != "none" and self.kd_weight > 0

    @property
    def uses_pod(self) -> bool:
        """Whether PLOP's Local POD is on (either factor positive)."""
        return self.pod_factor > 0 or self.pod_logits_factor > 0


METHOD_PRESETS: dict[str, MethodConfig] = {
    # Lower bound: cross-entropy alone at every step.
    "finetune": MethodConfig(name="finetune"),
    # Upper bound: all classes in one step.
    "joint": MethodConfig(name="joint", joint=True),
    # MiB / cssegmentation recipe (what cssegmentation's ILT page runs).
    # MiB itself divides the CE by all pixels: override ce_reduction="all" to match it.
    "ilt": MethodConfig(name="ilt", kd="mib", kd_weight=100.0, kd_alpha=1.0, fd_weight=100.0),
    # ILT paper variants, original protocol (old classes keep their labels).
    "ilt-kd-out": MethodConfig(name="ilt-kd-out", kd="ilt_output", kd_weight=1.0, kd_mask="old_bgr",
                               keep_old_labels=True),
    "ilt-kd-feat": MethodConfig(name="ilt-kd-feat", fd_weight=50.0, keep_old_labels=True),
    "ilt-ef": MethodConfig(name="ilt-ef", freeze_encoder=True, keep_old_labels=True),
    "ilt-ef-kd-out": MethodConfig(name="ilt-ef-kd-out", kd="ilt_output", kd_weight=1.0, freeze_encoder=True,
                                  keep_old_labels=True),
    "ilt-kd-out-feat": MethodConfig(name="ilt-kd-out-feat", kd="ilt_output", kd_weight=1.0, fd_weight=50.0,
                                    keep_old_labels=True),
    # MiB (Cermelli et al., CVPR 2020) as its code's `--method MiB` sets it: unbiased CE and unbiased KD
    # (weight 10, alpha 1), new classifiers from the background, CE divided by all pixels.
    "mib": MethodConfig(name="mib", ce_reduction="all", unbiased_ce=True, kd="unbiased", kd_weight=10.0,
                        kd_alpha=1.0, classifier_init="background"),
    # PLOP (Douillard et al., CVPR 2021) as its code's `--method PLOP` sets it for VOC: Local POD (0.01 on the
    # stages and head, 0.0005 on the logits), entropy pseudo-labels (true-median thresholds, floor 0.001),
    # new classifiers from the background, CE over all pixels.  ADE20k presets lower the POD factors.
    "plop": MethodConfig(name="plop", ce_reduction="all", pod_factor=0.01, pod_logits_factor=0.0005,
                         pseudo_labels="entropy", classifier_init="background"),
}


def method_config(name: str, overrides: Mapping[str, Any] | None = None) -> MethodConfig:
    """A preset by name, with some fields replaced.

    Raises:
        IlsegError: unknown preset or unknown field, or an invalid value.
    """
    if name not in METHOD_PRESETS:
        raise IlsegError(f"unknown method {name!r}; choose one of: {', '.join(METHOD_PRESETS)}")
    cfg = METHOD_PRESETS[name]
    if not overrides:
        return cfg
    fields = [f.name for f in dataclasses.fields(MethodConfig)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise IlsegError(f"unknown method field(s) {', '.join(map(repr, unknown))}; known: {', '.join(fields)}")
    return dataclasses.replace(cfg, **dict(overrides))


def _weight(w: float) -> str:
    return f"{w:g}"


def describe_method(cfg: MethodConfig) -> str:
    """One line: the preset's name, its loss at steps > 0 and its protocol.

    Example: ``ilt: L = CE(y) + 100*KD_mib(alpha=1) + 100*FD [labels: current step only]``.
    """
    ce = "UNCE(y)" if cfg.unbiased_ce else "CE(y)"
    terms = [ce if cfg.ce_reduction == "valid" else f"{ce[:-1]}, mean over all pixels)"]
    if cfg.kd == "mib" and cfg.uses_kd:
        terms.append(f"{_weight(cfg.kd_weight)}*KD_mib(alpha={_weight(cfg.kd_alpha)})")
    elif cfg.kd == "unbiased" and cfg.uses_kd:
        terms.append(f"{_weight(cfg.kd_weight)}*UNKD(alpha={_weight(cfg.kd_alpha)})")
    elif cfg.kd == "ilt_output" and cfg.uses_kd:
        terms.append(f"{_weight(cfg.kd_weight)}*KD_out(T={_weight(cfg.kd_temperature)}, pixels={cfg.kd_mask})")
    if cfg.fd_weight > 0:
        terms.append(f"{_weight(cfg.fd_weight)}*FD")
    if cfg.pseudo_labels == "entropy":
        terms[0] = f"CE(pseudo-labels: entropy < {cfg.pseudo_threshold} threshold, x kept fraction, mean over all pixels)"
    if cfg.uses_pod:
        terms.append(f"POD(stages+head {_weight(cfg.pod_factor)}, logits {_weight(cfg.pod_logits_factor)})")
    extras = []
    if cfg.freeze_encoder:
        extras.append("encoder frozen")
    if cfg.freeze_bn:
        extras.append("BN frozen")
    if cfg.classifier_init == "background":
        extras.append("new classifier from background")
    if cfg.joint:
        labels = "all classes at once"
    else:
        labels = "old labels kept" if cfg.keep_old_labels else "current step only"
    extra = f"; {', '.join(extras)} from step 1" if extras else ""
    distils = cfg.uses_kd or cfg.fd_weight > 0 or cfg.unbiased_ce or cfg.uses_pod or cfg.pseudo_labels != "none"
    step0 = "; step 0: CE only" if distils else ""
    return f"{cfg.name}: L = {' + '.join(terms)} [labels: {labels}{step0}{extra}]"


@dataclasses.dataclass
class StepSetup:
    """What a method hands the engine at the start of a step.

    Attributes:
        student: the model to train, with the step's classifier added and what
            the method freezes already frozen.
        teacher: a frozen copy of the previous step's model to distil from, or
            ``None`` (step 0, or a method that does not distil).
        target_lut: 256-entry ``uint8`` lookup table from dataset mask values
            to this step's training targets (channel ids, 255 ignored).
    """

    student: IncrementalSegmenter
    teacher: IncrementalSegmenter | None
    target_lut: np.ndarray


# Method fields that change what step 0 trains on or how; every other field acts from step 1 on.
_STEP0_FIELDS = ("ce_reduction", "joint")


class Method:
    """One continual-learning method: its step boundary and the loss of one batch.

    ``Method(cfg)`` holds nothing but its config.  At the start of every step
    the engine calls :meth:`start_step` and gets the student, the teacher and
    the training labels; during the step it calls the method on each batch.
    The engine asks the method every question of protocol (which task is
    trained, which labels, whether there is a teacher); it reads no
    ``cfg.method`` field itself.

    Example::

        >>> import torch
        >>> m = Method(METHOD_PRESETS["finetune"])
        >>> out = {"logits": torch.zeros(1, 3, 2, 2), "features": torch.zeros(1, 4, 1, 1)}
        >>> sorted(m(out, None, torch.zeros(1, 2, 2, dtype=torch.long), step=0))
        ['ce', 'loss']
    """

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.thresholds: Tensor | None = None  # PLOP's per-class thresholds of the current step (calibrate)
        self._new_channels = 0  # classes added by the step start_step prepared

    def __repr__(self) -> str:
        return f"Method({self.cfg!r})"

    @property
    def needs_teacher(self) -> bool:
        """Whether steps > 0 need the previous model's outputs (the one rule for it).

        The unbiased cross-entropy needs the teacher's channel count (the
        classes before this step); every method that uses it also distils.
        """
        cfg = self.cfg
        return cfg.uses_kd or cfg.fd_weight > 0 or cfg.unbiased_ce or cfg.uses_pod or cfg.pseudo_labels != "none"

    def calibrates(self, step: int) -> bool:
        """Whether step ``step`` needs :meth:`calibrate` (a pass of the teacher over its training set) first."""
        return step > 0 and self.cfg.pseudo_labels != "none"

    def calibrate(self, teacher_batches: Iterable[tuple[Tensor, Tensor]], step: int, *,
                  reduce: Callable[[Tensor], object] | None = None) -> Tensor:
        """PLOP's per-class entropy thresholds for step ``step``, from one pass over its training batches.

        Args:
            teacher_batches: ``(teacher logits at the labels' resolution, training
                targets)`` for every batch of the step's training set.
            reduce: sums a tensor over the processes in place (``all_reduce``);
                with it every rank gets the thresholds of the whole training
                set.  ``"plop_compat"`` leaves it unused: PLOP's thresholds
                come from each rank's own shard.

        Returns (and keeps, for the step's losses) the ``C_old`` thresholds.
        """
        if self._new_channels < 1:
            raise ValueError("calibrate needs the step's start_step first (it sets the number of new classes)")
        acc: EntropyThresholds | None = None
        for teacher_logits, target in teacher_batches:
            if acc is None:
                acc = EntropyThresholds(num_old_channels=teacher_logits.shape[1],
                                        num_classes_total=teacher_logits.shape[1] + self._new_channels,
                                        device=teacher_logits.device)
            acc.update(teacher_logits, target)
        if acc is None:
            raise IlsegError(f"step {step} has no training batch to compute the pseudo-label thresholds from")
        if reduce is not None and self.cfg.pseudo_threshold == "median":
            reduce(acc.state())
        self.thresholds = acc.thresholds(mode=self.cfg.pseudo_threshold, floor=self.cfg.pseudo_floor)
        return self.thresholds

    @property
    def label_protocol(self) -> str:
        """Which labels the training targets keep, in words (shown in results)."""
        if self.cfg.joint:
            return "all classes"
        return "old kept" if self.cfg.keep_old_labels else "current step"

    def training_task(self, task: Task) -> Task:
        """The task this method trains: ``task`` itself, or one step of all its classes (joint)."""
        if self.cfg.joint:
            return dataclasses.replace(task, name=f"{task.name}-joint", step_sizes=(len(task.order),))
        return task

    def identity(self, step: int) -> dict[str, Any]:
        """The fields of this method that shaped the weights of steps ``0..step``.

        Step 0 of every method here is plain cross-entropy, so only the CE
        reduction and joint training matter for it: a step-0 model can be
        shared by runs whose methods differ only from step 1 on.
        """
        values = dataclasses.asdict(self.cfg)
        del values["name"]
        if step == 0:
            return {k: values[k] for k in _STEP0_FIELDS}
        return values

    def start_step(self, model: IncrementalSegmenter, task: Task, step: int) -> StepSetup:
        """Turn the model at the end of step ``step - 1`` into step ``step``'s student.

        Args:
            model: at step 0 the freshly built model with step 0's classifier;
                later the previous step's final model (classifiers ``0..step-1``).
                It becomes the student (modified in place).
            task: the trained task (:meth:`training_task`).
            step: the step about to be trained.

        From step 1 on: the teacher is a frozen copy of ``model`` taken before
        anything changes, then the step's classifier is added (initialised as
        ``classifier_init`` says), then the encoder and/or BatchNorm are frozen.
        """
        teacher = None
        self.thresholds = None
        self._new_channels = task.step_sizes[step]
        if step > 0:
            model.pod_outputs = self.cfg.uses_pod  # before the copy: the teacher returns the maps too
            if self.needs_teacher:
                teacher = copy_for_teacher(model)
            model.add_step(task.step_sizes[step], init=self.cfg.classifier_init)
            if self.cfg.freeze_encoder:
                freeze_encoder(model)
            if self.cfg.freeze_bn:
                freeze_bn(model)
        lut = train_lut(task, step, keep_old=self.cfg.keep_old_labels)
        return StepSetup(student=model, teacher=teacher, target_lut=lut)

    def __call__(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None,
        target: Tensor,
        step: int,
    ) -> dict[str, Tensor]:
        """Named scalar losses of one batch; the total is under ``"loss"``.

        Args:
            student: the trained model's output: ``"logits"`` ``BxCxHxW``
                (already at the target's resolution) and ``"features"``.
            teacher: the previous model's output (``"logits"``
                ``BxC_oldxHxW``, ``"features"``), or ``None`` at step 0 and
                for methods that do not distil.
            target: ``BxHxW`` int64 training target (channel ids, 255 ignored).
            step: the incremental step (0 = the first).

        Returns:
            ``"ce"`` always; ``"kd"`` if output distillation is on and
            ``step > 0``; ``"fd"`` if ``fd_weight > 0`` and ``step > 0``; and
            ``"loss" = ce + kd_weight * kd + fd_weight * fd``.
        """
        cfg = self.cfg
        distilling = step > 0 and self.needs_teacher
        if not distilling:
            ce = cross_entropy(student["logits"], target, reduction=cfg.ce_reduction)
            return {"ce": ce, "loss": ce}
        if teacher is None:
            raise ValueError(
                f"method {cfg.name!r} distils from the previous model, but no teacher output was "
                f"given at step {step}"
            )
        losses = {"ce": self._classification(student["logits"], teacher["logits"], target, step),
                  **self._distillation(student, teacher, target)}
        weights = {"ce": 1.0, "kd": cfg.kd_weight, "fd": cfg.fd_weight, "pod": 1.0}  # POD's factors are inside
        losses["loss"] = sum((weights[k] * v for k, v in losses.items()), torch.zeros((), device=target.device))
        return losses

    def _classification(self, logits: Tensor, teacher_logits: Tensor, target: Tensor, step: int) -> Tensor:
        """The cross-entropy term of a step > 0: plain, MiB's unbiased, or on PLOP's pseudo-labels."""
        cfg = self.cfg
        if cfg.unbiased_ce:
            return unbiased_cross_entropy(logits, target, teacher_logits.shape[1], reduction=cfg.ce_reduction)
        if cfg.pseudo_labels != "none":
            if self.thresholds is None:
                raise ValueError(f"method {cfg.name!r} pseudo-labels with thresholds from calibrate(), which was "
                                 f"not called for step {step}")
            with torch.no_grad():
                labels, kept = pseudo_label(target, teacher_logits, self.thresholds.to(logits.device),
                                            num_old_channels=teacher_logits.shape[1],
                                            num_classes_total=logits.shape[1])
            return plop_cross_entropy(logits, labels, kept)
        return cross_entropy(logits, target, reduction=cfg.ce_reduction)

    def _distillation(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor],
                      target: Tensor) -> dict[str, Tensor]:
        """The unweighted distillation terms that are on: ``kd``, ``fd``, ``pod`` (already weighted)."""
        cfg = self.cfg
        logits, old_logits = student["logits"], teacher["logits"]
        terms: dict[str, Tensor] = {}
        if cfg.uses_kd:
            if cfg.kd == "mib":
                terms["kd"] = kd_mib(logits, old_logits, alpha=cfg.kd_alpha)
            elif cfg.kd == "unbiased":
                terms["kd"] = kd_unbiased(logits, old_logits, alpha=cfg.kd_alpha)
            else:
                terms["kd"] = kd_ilt_output(logits, old_logits, target, temperature=cfg.kd_temperature,
                                            mask=cfg.kd_mask)
        if cfg.fd_weight > 0:
            terms["fd"] = feature_distillation(student["features"], teacher["features"])
        if cfg.uses_pod:
            old = old_logits.shape[1]
            maps = cast(Sequence[Tensor], student["pod"]), cast(Sequence[Tensor], teacher["pod"])
            terms["pod"] = local_pod_loss(*maps, num_old_channels=old, num_classes_total=logits.shape[1],
                                          num_new=logits.shape[1] - old, factors=cfg.pod_factor,
                                          logits_factor=cfg.pod_logits_factor)
        return terms


def build_method(cfg: MethodConfig) -> Method:
    """The :class:`Method` that runs ``cfg``."""
    return Method(cfg)
