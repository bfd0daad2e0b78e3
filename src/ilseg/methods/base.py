"""The method contract: what a continual-learning method tells the engine, and the engine's defaults.

A method is one file under ``methods/``: a frozen config dataclass (a
subclass of :class:`MethodConfig`, plain data loaded from the run config and
written back with the run), a :class:`Method` subclass that runs it, and its
named presets, registered by name in :mod:`ilseg.methods` (or from anywhere
with :func:`ilseg.methods.register_method`).  The engine talks to a method
only through this contract:

=============================  ================================================================
``training_task(task)``        the task it trains (joint: one step of all classes)
``start_step(model, task, t)`` the step's student, teacher and training labels (:class:`StepSetup`)
``adapt_model(model)``         changes to the architecture of every model of its runs (extra branches)
``taps(t)``                    named intermediate maps it needs from the models (:data:`TAPS`)
``prepares(t)``, ``prepare``   a pass of the teacher over the step's training set before training;
                               the engine prints the line ``prepare`` returns
``prepares_previous(t)``,      the same over the previous step's training set (its images and the
``prepare_previous``           targets that step trained on), before ``prepare``
``__call__``                   the named losses of one batch, the total under ``"loss"``
``finish_step``                after the step trained, before it is evaluated and saved
``state_dict`` / ``load_...``  state kept across steps, saved in every checkpoint, restored on resume
``identity(t)``                its settings that shaped the weights of steps ``0..t``
``describe()``                 one line for ``ilseg methods``: override it, the default says CE only
=============================  ================================================================

Every hook but :meth:`Method.loss` has a default that does nothing, so a
method states only what makes it that method.  The default step boundary
copies a teacher when the method distils (:attr:`Method.needs_teacher`),
adds the step's classifier (``classifier_init``), freezes what the config
says, and maps the masks to the step's classes.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ilseg.errors import IlsegError
from ilseg.methods.losses import CEReduction, cross_entropy
from ilseg.models import IncrementalSegmenter, copy_for_teacher, freeze_bn, freeze_encoder
from ilseg.tasks import Task, train_lut

ClassifierInit = Literal["default", "background"]

# Field metadata: numeric bounds checked by MethodConfig.__post_init__ for every method.
NON_NEGATIVE = {"min": 0.0}
POSITIVE = {"above": 0.0}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The settings every method has; a method's own config subclasses it and adds its fields.

    Every field is plain data (str, bool, int, float or a ``Literal`` of
    strings): it is validated here from the type hints (and the ``min`` /
    ``above`` bounds in a field's metadata), so a subclass declares fields
    and writes checks only for rules between fields (:meth:`check`).

    Attributes:
        name: the preset this config comes from (shown in reports and logs).
        ce_reduction: ``"valid"`` divides the cross-entropy by the non-ignored
            pixels (PyTorch, cssegmentation); ``"all"`` by all pixels (MiB, PLOP).
        classifier_init: how a new step's classifier starts: ``"default"``
            (PyTorch's init) or ``"background"`` (from the background channel,
            as MiB does: :meth:`~ilseg.models.IncrementalSegmenter.add_step`).
        freeze_encoder: from step 1 on, no gradient into the ResNet body (the ILT paper's EF).
        freeze_bn: from step 1 on, BatchNorm statistics and affine parameters frozen.
        keep_old_labels: training targets keep old classes' labels (the ILT
            paper's own protocol) instead of turning them into background.
    """

    name: str
    ce_reduction: CEReduction = "valid"
    classifier_init: ClassifierInit = "default"
    freeze_encoder: bool = False
    freeze_bn: bool = False
    keep_old_labels: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise IlsegError(f"method name must be a non-empty string, got {self.name!r}")
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            if field.name != "name":
                object.__setattr__(self, field.name, self._checked(field, hints[field.name]))
        self.check()

    def _checked(self, field: dataclasses.Field, hint: Any) -> Any:
        where = f"method {self.name!r}: {field.name}"
        value = getattr(self, field.name)
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise IlsegError(f"{where} = {value!r} is not one of {', '.join(map(str, allowed))}")
            return value
        if hint is bool:
            if not isinstance(value, bool):
                raise IlsegError(f"{where} must be true or false, got {value!r}")
            return value
        if hint in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise IlsegError(f"{where} must be a finite number, got {value!r}")
            value = hint(value)
            if "min" in field.metadata and value < field.metadata["min"]:
                raise IlsegError(f"{where} must be >= {field.metadata['min']:g}, got {value}")
            if "above" in field.metadata and value <= field.metadata["above"]:
                raise IlsegError(f"{where} must be > {field.metadata['above']:g}, got {value}")
            return value
        return value

    def check(self) -> None:
        """Rules between fields; raise :class:`IlsegError` naming them.  Nothing by default."""

    def fail(self, message: str) -> typing.NoReturn:
        """Raise the one-line error of an invalid combination of this config's fields."""
        raise IlsegError(f"method {self.name!r}: {message}")


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


# ``(teacher outputs, training targets)`` of one batch of a step's training set; the teacher's
# ``"logits"`` are at the targets' resolution.
TeacherBatch = tuple[Mapping[str, Any], Tensor]
Reduce = Callable[[Tensor], object]


class Method(abc.ABC):
    """One continual-learning method: its step boundary and the loss of one batch.

    Subclasses set :attr:`config_class` and implement :meth:`loss`; every
    other hook has a default (see the module's table).  ``Method(cfg)`` holds
    its config and whatever state the method keeps across steps.

    Example::

        >>> from ilseg.methods import build_method, method_config
        >>> method = build_method(method_config("finetune"))
        >>> out = {"logits": torch.zeros(1, 3, 2, 2), "features": torch.zeros(1, 4, 1, 1)}
        >>> sorted(method(out, None, torch.zeros(1, 2, 2, dtype=torch.long), step=0))
        ['ce', 'loss']
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Whether the method learns all classes in one step (joint training, the upper bound).
    all_classes_at_once: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig) -> None:
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} runs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg!r})"

    # -- what the engine asks before a step ----------------------------------------------------
    @property
    def needs_teacher(self) -> bool:
        """Whether steps > 0 distil from the previous step's model (the one rule for it)."""
        return False

    @property
    def label_protocol(self) -> str:
        """Which labels the training targets keep, in words (shown in results)."""
        if self.all_classes_at_once:
            return "all classes"
        return "old kept" if self.cfg.keep_old_labels else "current step"

    def training_task(self, task: Task) -> Task:
        """The task this method trains: ``task`` itself, or one step of all its classes (joint)."""
        if self.all_classes_at_once:
            return dataclasses.replace(task, name=f"{task.name}-joint", step_sizes=(len(task.order),))
        return task

    def identity(self, step: int) -> dict[str, Any]:
        """The settings of this method that shaped the weights of steps ``0..step``.

        Step 0 of a method is plain cross-entropy unless it says otherwise, so
        only the CE reduction and whether all classes train at once matter for
        it: runs whose methods differ only from step 1 on share a step-0 model.
        From step 1 on: the method's kind and every field of its config.
        """
        if step == 0:
            return {"ce_reduction": self.cfg.ce_reduction, "joint": self.all_classes_at_once}
        values = dataclasses.asdict(self.cfg)
        del values["name"]
        return {"kind": method_kind(type(self)), **values}

    def adapt_model(self, model: IncrementalSegmenter) -> None:
        """Change the architecture of a model of this method's runs, in place.  Nothing by default.

        Called on every model a run builds (:func:`ilseg.runs.folder.model_from_config`), right after
        it is built (ImageNet weights already in the body) and before any checkpoint is loaded into
        it: the step-0 model, the previous step's model rebuilt from its checkpoint, and the models
        ``ilseg evaluate``, ``predict`` and ``import`` build.  A method that adds modules (RCIL's
        parallel branches) therefore finds them in every checkpoint of its runs.  It runs on a
        fresh method object built from the run's config: keep no state here.  Changes that depend
        on the step (freezing a branch, merging branches) belong in :meth:`start_step` and
        :meth:`finish_step`.
        """

    def taps(self, step: int) -> tuple[str, ...]:
        """Intermediate maps (names from :data:`ilseg.models.TAPS`) the student and teacher return at ``step``.

        They come back under ``outputs["taps"][name]``.  None by default.
        """
        return ()

    # -- the step boundary ---------------------------------------------------------------------
    def start_step(self, model: IncrementalSegmenter, task: Task, step: int) -> StepSetup:
        """Turn the model at the end of step ``step - 1`` into step ``step``'s student.

        Args:
            model: at step 0 the freshly built model with step 0's classifier;
                later the previous step's final model (classifiers ``0..step-1``).
                It becomes the student (modified in place).
            task: the trained task (:meth:`training_task`).
            step: the step about to be trained.

        From step 1 on: the model is asked for :meth:`taps`, the teacher is a
        frozen copy of it taken before anything changes (when
        :attr:`needs_teacher`), then the step's classifier is added
        (initialised as ``classifier_init`` says), then the encoder and/or
        BatchNorm are frozen as the config says.
        """
        teacher = None
        model.taps = self.taps(step)
        if step > 0:
            if self.needs_teacher:
                teacher = copy_for_teacher(model)
            model.add_step(task.step_sizes[step], init=self.cfg.classifier_init)
            if self.cfg.freeze_encoder:
                freeze_encoder(model)
            if self.cfg.freeze_bn:
                freeze_bn(model)
        lut = train_lut(task, step, keep_old=self.cfg.keep_old_labels)
        return StepSetup(student=model, teacher=teacher, target_lut=lut)

    def prepares(self, step: int) -> bool:
        """Whether step ``step`` needs :meth:`prepare` (a pass of the teacher over its training set) first."""
        return False

    def prepare(self, batches: Iterable[TeacherBatch], step: int, *, reduce: Reduce | None = None) -> str:
        """Compute what the step needs from the teacher's outputs on its whole training set.

        Args:
            batches: ``(teacher outputs, training targets)`` of every batch of
                this process's share of the step's training set, the teacher's
                ``"logits"`` at the targets' resolution.
            reduce: sums a tensor over the processes in place (``all_reduce``);
                ``None`` in a single process.

        Returns a line for the log (what was computed).
        """
        raise NotImplementedError(f"{type(self).__name__} prepares no step")

    def prepares_previous(self, step: int) -> bool:
        """Whether step ``step`` (> 0) needs :meth:`prepare_previous` first.  ``False`` by default."""
        return False

    def prepare_previous(self, batches: Iterable[TeacherBatch], step: int, *, reduce: Reduce | None = None) -> str:
        """As :meth:`prepare`, over step ``step - 1``'s training set: its images (epoch 0's augmentation) and
        the targets that step trained on, through the teacher (the model that finished that step).

        Runs before :meth:`prepare`, also on resume (answer ``False`` from :meth:`prepares_previous` when
        the method state already holds what it computes).  ``reduce`` may be called any number of times,
        the same number on every process.  Returns a line for the log.
        """
        raise NotImplementedError(f"{type(self).__name__} prepares no step from the previous one")

    def finish_step(self, student: IncrementalSegmenter, teacher: IncrementalSegmenter | None,
                    step: int) -> None:
        """Change the student after step ``step`` trained, before it is evaluated and saved.  Nothing by default.

        ``student`` is the plain model (no DDP wrapper), on the training device.
        """

    # -- state kept across steps ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the method keeps across steps: tensors and plain data only (checkpoints load with
        ``weights_only=True``).  Saved in ``last.pth`` and ``step{t}.pth``; empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (``{}`` from a checkpoint written before the method kept state)."""
        if state:
            raise IlsegError(f"method {self.cfg.name!r} keeps no state, but the checkpoint holds method state "
                             f"{sorted(state)}: it was written by another method")

    # -- the loss --------------------------------------------------------------------------------
    def __call__(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
                 step: int) -> dict[str, Tensor]:
        """Named scalar losses of one batch; the total is under ``"loss"``.

        Args:
            student: the trained model's output: ``"logits"`` ``BxCxHxW``
                (already at the target's resolution), ``"features"``, and
                ``"taps"`` when :meth:`taps` asks for maps.
            teacher: the previous model's output (``"logits"`` ``BxC_oldxHxW``
                ...), or ``None`` at step 0 and for methods without a teacher.
            target: ``BxHxW`` int64 training target (channel ids, 255 ignored).
            step: the incremental step (0 = the first).
        """
        if step > 0 and self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.cfg.name!r} distils from the previous model, but no teacher output "
                             f"was given at step {step}")
        return self.loss(student, teacher if step > 0 else None, target, step)

    @abc.abstractmethod
    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        """The losses of one batch (see :meth:`__call__`); ``teacher`` is ``None`` at step 0."""

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """The plain cross-entropy with the config's reduction (what every step 0 trains with)."""
        return cross_entropy(logits, target, reduction=self.cfg.ce_reduction)

    def cross_entropy_only(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """``{"ce", "loss"}`` of :meth:`cross_entropy` alone: step 0 of every built-in method."""
        ce = self.cross_entropy(logits, target)
        return {"ce": ce, "loss": ce}

    def describe(self) -> str:
        """One line: the preset's name, its loss at steps > 0 and its protocol."""
        return f"{self.cfg.name}: L = {ce_text(self.cfg)} {boundary_text(self, distils=self.needs_teacher)}"


def weighted_total(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """``losses`` plus ``"loss"``: the sum of each term times its weight (1 for a term not in ``weights``)."""
    terms = list(losses.items())
    total = terms[0][1] * weights.get(terms[0][0], 1.0)
    for key, value in terms[1:]:
        total = total + weights.get(key, 1.0) * value
    return {**losses, "loss": total}


def method_kind(cls: type[Method]) -> str:
    """The name a method class is registered under (``"ilt"``, ``"plop"`` ...)."""
    from ilseg.methods import METHODS

    for kind, registered in METHODS.items():
        if registered is cls:
            return kind
    raise IlsegError(f"method class {cls.__name__} is not registered; call ilseg.methods.register_method first")


def weight_text(w: float) -> str:
    return f"{w:g}"


def ce_text(cfg: MethodConfig, unbiased: bool = False) -> str:
    """``CE(y)`` / ``UNCE(y)``, with the reduction when it is over all pixels."""
    name = "UNCE(y)" if unbiased else "CE(y)"
    return name if cfg.ce_reduction == "valid" else f"{name[:-1]}, mean over all pixels)"


def boundary_text(method: Method, distils: bool, notes: Sequence[str] = ()) -> str:
    """The ``[labels: ...]`` part of :meth:`Method.describe`: labels, step 0, what is frozen or initialised,
    then the method's own ``notes`` (what else it does at a step boundary)."""
    cfg = method.cfg
    extras = [text for on, text in ((cfg.freeze_encoder, "encoder frozen"), (cfg.freeze_bn, "BN frozen"),
                                    (cfg.classifier_init == "background", "new classifier from background")) if on]
    extra = f"; {', '.join(extras)} from step 1" if extras else ""
    step0 = "; step 0: CE only" if distils else ""
    if method.all_classes_at_once:
        labels = "all classes at once"
    else:
        labels = "old labels kept" if cfg.keep_old_labels else "current step only"
    return f"[labels: {labels}{step0}{extra}{''.join(f'; {note}' for note in notes)}]"


def total_like(target: Tensor) -> Tensor:
    return torch.zeros((), device=target.device)
