"""REMINDER: PLOP plus a distillation of the old classes weighted by their similarity to the new ones.

REMINDER (Phan, Ta, Phung, Tran-Thanh, Bouzerdoum, "Class Similarity
Weighted Knowledge Distillation for Continual Semantic Segmentation", CVPR
2022; code: HieuPhan33/REMINDER) trains step ``t > 0`` with PLOP's loss
(:mod:`ilseg.methods.plop`: Local POD, entropy pseudo-labels, the CE scaled
per image and averaged over all pixels) plus its **class-similarity weighted
distillation** (CSW-KD, :func:`csw_distillation`):

* every class has a **prototype**, the mean of the head's output (the
  256-channel map before the classifiers, bilinearly upsampled to the labels)
  over its pixels.  An old class's prototype comes from the final model of the
  step that learnt it, over that step's training set: the mean, over the
  batches in which the class appears, of its per-batch mean
  (:func:`class_feature_sums`, :class:`PrototypeMeans`).  A new class's comes
  from the student on the current batch;
* a new class ``c`` "reminds" of each old class ``j`` by
  ``r_cj = softmax_j cos(p_c, P_j)`` over all old classes, background included;
  weights below ``delta / C_old`` are set to 0 (:func:`similarity_weights`);
* on every pixel labelled with a new class, the teacher's softmax at
  temperature ``T`` (3) times ``r`` is the target of a cross-entropy with the
  student's log-softmax over its old channels at ``T``, times ``T^2``.

Sources (REMINDER's repository): ``argparser.py`` 58-67 (``--method REMINDER``:
PLOP's options and ``csw_kd = 0.5``), ``utils/loss.py`` 265-278
(``pairwise_cosine_sim``) and 326-364 (``ClassSimilarityWeightedKD``, ``T = 3``),
``train.py`` 20-31 (``compute_prototype``), 122-123, 428-439 (the term),
487 (the total), 628-647 (``update_prototypes``), ``run.py`` 337-342 and
542-548 (old prototypes after each step).  docs/methods.md "REMINDER" has the
formulas and every difference.

**Where the old prototypes come from.**  The authors compute the prototypes of
step ``t-1``'s classes after that step, with its final model in eval mode, over
that step's training set.  ilseg's teacher at step ``t`` *is* that model in eval
mode, so the method asks for a pass of the teacher over the *previous* step's
training set, with the targets that step trained on, before step ``t`` trains
(:meth:`REMINDER.prepares_previous`, :meth:`REMINDER.prepare_previous`, the
same contract as :meth:`~ilseg.methods.base.Method.prepare`).  The prototypes
of all old classes are method state, saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ilseg.errors import IlsegError
from ilseg.methods.base import (
    NON_NEGATIVE,
    POSITIVE,
    MethodConfig,
    Reduce,
    StepSetup,
    TeacherBatch,
    weight_text,
    weighted_total,
)
from ilseg.methods.plop import PLOP, PLOPConfig
from ilseg.models import IncrementalSegmenter
from ilseg.tasks import IGNORE_INDEX, Task

CSW_TARGET_FLOOR = 1e-7  # added to every weighted teacher probability (utils/loss.py:361)
PROTOTYPE_TAP = "head"  # REMINDER's `pre_logits`: the head's output, the classifiers' input (segmentation_module.py:310)


# ---------------------------------------------------------------- prototypes


def upsampling_matrix(size_out: int, size_in: int, *, device: torch.device | str | None = None) -> Tensor:
    """``A`` with ``A[y, u]`` the weight of input ``u`` in output ``y`` of a 1-D linear upsampling
    (``align_corners=True``); a 2-D bilinear one is ``A_h x A_w^T`` per channel.

    Example::

        >>> upsampling_matrix(3, 2)
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000],
                [0.0000, 1.0000]])
    """
    eye = torch.eye(size_in, device=device).unsqueeze(0)  # size_in channels, each a unit impulse
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=True)[0].t()


def class_feature_sums(features: Tensor, labels: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per class: the sum of the features upsampled to the labels, over its pixels, and its pixel count.

    The features are upsampled bilinearly with ``align_corners=True`` as
    REMINDER's ``compute_prototype`` does (``train.py`` 20-31), but the
    upsampled map is never built: for a class mask ``M`` the sum is
    ``sum_{b,u,v} (A_h^T M_b A_w)[u, v] f_b[:, u, v]`` (:func:`upsampling_matrix`).

    Args:
        features: ``BxKxhxw`` (the head's output); detached and upcast to float32.
        labels: ``BxHxW`` channel ids or 255.
        classes: the channels to sum.

    Returns:
        ``(sums, counts)``: ``len(classes) x K`` and ``len(classes)`` float32;
        ``sums[i] / counts[i]`` is the authors' per-batch prototype of
        ``classes[i]`` when ``counts[i] > 0``.
    """
    f = features.detach().float()
    batch, channels, height, width = f.shape
    if labels.dim() != 3 or labels.shape[0] != batch:
        raise ValueError(f"labels must be {batch}xHxW for features {tuple(f.shape)}, got {tuple(labels.shape)}")
    rows = upsampling_matrix(labels.shape[1], height, device=f.device)  # H x h
    cols = upsampling_matrix(labels.shape[2], width, device=f.device)  # W x w
    sums = torch.zeros(len(classes), channels, device=f.device)
    counts = torch.zeros(len(classes), device=f.device)
    present = torch.bincount(labels.reshape(-1).long(), minlength=IGNORE_INDEX + 1).cpu()
    for index, c in enumerate(classes):
        if present[c] == 0:
            continue
        mask = (labels == c).float()  # B x H x W
        weights = rows.t() @ (mask @ cols)  # B x h x w: what each feature cell contributes to the class's sum
        sums[index] = torch.einsum("buv,bkuv->k", weights, f)
        counts[index] = float(present[c])
    return sums, counts


class PrototypeMeans:
    """The prototypes of some classes over a pass of a model: the mean, over the batches in which a class
    appears, of its per-batch mean feature (REMINDER's ``update_prototypes``, ``train.py`` 628-647).

    A class that never appears keeps a zero prototype, as in the authors' code.

    Distributed runs: :meth:`add` takes ``reduce`` (an in-place sum over
    the processes) and sums each batch's per-class sums and counts over the
    processes first, so each *global* batch gives one mean, as one process
    would.  Every process must then call :meth:`add` once per batch.
    """

    def __init__(self, classes: Sequence[int], channels: int, *, device: torch.device | str | None = None) -> None:
        self.classes = list(classes)
        self.mean_sums = torch.zeros(len(self.classes), channels, dtype=torch.float64, device=device)
        self.batches = torch.zeros(len(self.classes), dtype=torch.int64, device=device)

    def add(self, features: Tensor, labels: Tensor, *, reduce: Reduce | None = None) -> None:
        sums, counts = class_feature_sums(features, labels, self.classes)
        if reduce is not None:
            reduce(sums)
            reduce(counts)
        seen = counts > 0
        self.mean_sums[seen] += (sums[seen] / counts[seen, None]).double().to(self.mean_sums.device)
        self.batches += seen.to(self.batches.device)

    def prototypes(self) -> Tensor:
        """``len(classes) x K`` float32: each class's mean of its batch means (0 for an unseen class)."""
        return (self.mean_sums / self.batches.clamp(min=1)[:, None]).float()


# ---------------------------------------------------------------- similarity and distillation


def cosine_similarities(x: Tensor, y: Tensor) -> Tensor:
    """``S[i, j] = cos(x_i, y_j)``; 0 where either row is all zeros (REMINDER's ``pairwise_cosine_sim``
    gives NaN there and sets it to 0, ``utils/loss.py`` 265-278).  ``NxK`` and ``MxK`` -> ``NxM``."""
    x, y = x.float(), y.float()
    x_norm, y_norm = x.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)
    similarity = (x / x_norm.clamp(min=1e-30)) @ (y / y_norm.clamp(min=1e-30)).t()
    return similarity.masked_fill((x_norm == 0) | (y_norm == 0).t(), 0.0)


def similarity_weights(new_prototypes: Tensor, old_prototypes: Tensor, *, delta: float) -> Tensor:
    """How much each new class reminds of each old class (``utils/loss.py`` 355-357)::

        r_cj = softmax_j cos(p_c, P_j),  then r_cj = 0 where r_cj < delta / C_old

    Args:
        new_prototypes: ``N x K``, one row per new class.
        old_prototypes: ``C_old x K``, one row per old channel (background first).
        delta: ``--delta_csw``; 0 keeps every weight (all are positive), 1
            keeps the old classes more similar than average (above ``1/C_old``).

    Returns:
        ``N x C_old`` float32, each row summing to at most 1.

    Example::

        >>> similarity_weights(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), delta=0.0)
        tensor([[0.7311, 0.2689]])
    """
    weights = torch.softmax(cosine_similarities(new_prototypes, old_prototypes), dim=1)
    return weights.masked_fill(weights < delta / old_prototypes.shape[0], 0.0)


def csw_distillation(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, weights: Tensor, *,
                     temperature: float) -> Tensor:
    """REMINDER's CSW-KD (``ClassSimilarityWeightedKD.forward``, ``utils/loss.py`` 335-364)::

        L = T^2 / |M| * sum_{i in M} sum_{j < C_old} -(q_ij r_{y_i j} + 1e-7) log p_ij
        q_i = softmax(z°_i / T),  p_i = softmax(z_i[0:C_old] / T)

    over the pixels ``M`` labelled with a new class (``C_old <= y_i < 255``):
    the student's softmax is over its old channels only.  The target is
    neither renormalised nor differentiated (only ``p`` carries a gradient).
    With no such pixel the term is 0 (the authors' is 0/0 = NaN, a batch their
    mixed-precision scaler then skips).

    Args:
        student_logits: ``BxN_allxHxW``.
        teacher_logits: ``BxC_oldxHxW``; detached.
        target: ``BxHxW`` channel ids or 255.
        weights: ``(N_all - C_old) x C_old``: row ``c - C_old`` for new class
            ``c`` (:func:`similarity_weights`); detached.
        temperature: ``T``.

    Returns:
        A float32 scalar.
    """
    old = teacher_logits.shape[1]
    new = student_logits.shape[1] - old
    if weights.shape != (new, old):
        raise ValueError(f"need {new}x{old} similarity weights (new x old classes), got {tuple(weights.shape)}")
    pixels = (target >= old) & (target != IGNORE_INDEX)
    count = int(pixels.sum())
    if count == 0:
        return torch.zeros((), device=student_logits.device)
    log_p = torch.log_softmax(student_logits[:, :old].float() / temperature, dim=1)
    q = torch.softmax(teacher_logits.detach().float() / temperature, dim=1)
    rows = torch.cat([weights.detach().float(), torch.zeros(1, old, device=weights.device)])  # last: not in M
    per_pixel = rows[torch.where(pixels, target.long() - old, new)].permute(0, 3, 1, 2)  # B x C_old x H x W
    soft_target = (q * per_pixel + CSW_TARGET_FLOOR) * pixels.unsqueeze(1)
    return -(temperature**2) * (soft_target * log_p).sum() / count


# ---------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class REMINDERConfig(PLOPConfig):
    """REMINDER's settings: PLOP's (:class:`~ilseg.methods.plop.PLOPConfig`, its defaults) and CSW-KD's.

    Attributes:
        csw_weight: weight of CSW-KD (``--csw_kd``); 0 = off (then PLOP).
        csw_temperature: its temperature ``T`` (``ClassSimilarityWeightedKD``'s
            default, which no script changes).
        csw_delta: old classes whose weight is below ``csw_delta / C_old`` are
            left out (``--delta_csw``: 0 with ``--method REMINDER``, 1 in the
            ADE20k scripts).
    """

    csw_weight: float = dataclasses.field(default=0.5, metadata=NON_NEGATIVE)
    csw_temperature: float = dataclasses.field(default=3.0, metadata=POSITIVE)
    csw_delta: float = dataclasses.field(default=0.0, metadata=NON_NEGATIVE)


class REMINDER(PLOP):
    """``L = CE(pseudo-labels) + POD + csw_weight * CSW-KD`` from step 1 on; ``CE(y)`` at step 0.

    Before each step ``t > 0`` it adds the prototypes of step ``t-1``'s
    classes from a pass of the teacher over step ``t-1``'s training set
    (:meth:`prepare_previous`), and PLOP's thresholds from a pass over step
    ``t``'s (:meth:`prepare`).
    """

    config_class = REMINDERConfig
    cfg: REMINDERConfig

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.prototypes: Tensor | None = None  # C x K: channels 0..C-1 so far (method state)
        self._previous_classes: tuple[int, int] = (0, 0)  # channels step t-1 added, set by start_step

    def taps(self, step: int) -> tuple[str, ...]:
        taps = super().taps(step)
        if step > 0 and self.cfg.csw_weight > 0 and PROTOTYPE_TAP not in taps:
            taps = (*taps, PROTOTYPE_TAP)
        return taps

    def start_step(self, model: IncrementalSegmenter, task: Task, step: int) -> StepSetup:
        if step > 0:
            old = sum(task.step_sizes[:step])
            self._previous_classes = (old - task.step_sizes[step - 1], old)
        return super().start_step(model, task, step)

    # -- the old classes' prototypes -------------------------------------------------------------
    def prepares_previous(self, step: int) -> bool:
        """Whether step ``step`` needs a pass of the teacher over step ``step - 1``'s training set first:
        CSW-KD is on and the prototypes of that step's classes are not in the state yet (a resumed step
        has them)."""
        known = 0 if self.prototypes is None else self.prototypes.shape[0]
        return step > 0 and self.cfg.csw_weight > 0 and known < self._previous_classes[1]

    def prepare_previous(self, batches: Iterable[TeacherBatch], step: int, *, reduce: Reduce | None = None) -> str:
        """Add the prototypes of step ``step - 1``'s classes to the state.

        Args:
            batches: the teacher's outputs (with the ``"head"`` tap) and the
                targets step ``step - 1`` trained on, over that step's training
                set (this process's share of each global batch).
            reduce: sums a tensor over the processes in place; it is called
                twice per batch, so that each global batch gives one mean.

        Returns a line for the log.
        """
        first, stop = self._previous_classes
        if stop == 0:
            raise ValueError("prepare_previous needs the step's start_step first (it sets the previous classes)")
        known = 0 if self.prototypes is None else self.prototypes.shape[0]
        if known != first:
            raise IlsegError(f"method {self.cfg.name!r}: step {step} needs the prototypes of channels 0..{first - 1} "
                             f"before those of step {step - 1}, but the method state holds {known}")
        means: PrototypeMeans | None = None
        images = 0
        for teacher_out, target in batches:
            features = teacher_out["taps"][PROTOTYPE_TAP]
            if means is None:
                means = PrototypeMeans(range(first, stop), features.shape[1], device=features.device)
            means.add(features, target, reduce=reduce)
            images += target.shape[0]
        if means is None:
            raise IlsegError(f"step {step - 1} has no training batch to compute its classes' prototypes from")
        new = means.prototypes().cpu()
        self.prototypes = new if self.prototypes is None else torch.cat([self.prototypes, new])
        unseen = [c for c, n in zip(means.classes, means.batches.tolist()) if n == 0]
        note = f"; never seen, zero prototypes: {unseen}" if unseen else ""
        return f"prototypes of channels {first}..{stop - 1} from {images} training images of step {step - 1}{note}"

    def state_dict(self) -> dict[str, Any]:
        return {} if self.prototypes is None else {"prototypes": self.prototypes.detach().cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - {"prototypes"}
        if unknown:
            raise IlsegError(f"method {self.cfg.name!r} keeps prototypes only, but the checkpoint holds method "
                             f"state {sorted(unknown)}: it was written by another method")
        prototypes = state.get("prototypes")
        self.prototypes = None if prototypes is None else torch.as_tensor(prototypes).float().cpu()

    # -- the loss ------------------------------------------------------------------------------------
    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        losses = super().loss(student, teacher, target, step)
        if teacher is None or self.cfg.csw_weight == 0:
            return losses
        losses = {k: v for k, v in losses.items() if k != "loss"}
        losses["csw"] = self._csw(student, teacher["logits"], target, step)
        return weighted_total(losses, {"csw": self.cfg.csw_weight})

    def _csw(self, student: Mapping[str, Any], teacher_logits: Tensor, target: Tensor, step: int) -> Tensor:
        logits = student["logits"]
        old = teacher_logits.shape[1]
        if self.prototypes is None or self.prototypes.shape[0] != old:
            known = 0 if self.prototypes is None else self.prototypes.shape[0]
            raise IlsegError(
                f"method {self.cfg.name!r} needs the prototypes of the {old} old channels at step {step}, but holds "
                f"{known}: the pass of the teacher over step {step - 1}'s training set (prepare_previous) did not run")
        new_classes = range(old, logits.shape[1])
        sums, counts = class_feature_sums(student["taps"][PROTOTYPE_TAP], target, new_classes)
        batch_prototypes = sums / counts.clamp(min=1)[:, None]  # a class absent from the batch weighs no pixel
        weights = similarity_weights(batch_prototypes, self.prototypes.to(logits.device), delta=self.cfg.csw_delta)
        return csw_distillation(logits, teacher_logits, target, weights, temperature=self.cfg.csw_temperature)

    def describe(self) -> str:
        plop = super().describe()  # "name: L = terms [labels: ...]"
        cfg = self.cfg
        if cfg.csw_weight == 0:
            return plop
        terms, labels, rest = plop.partition(" [labels:")
        csw = (f"{weight_text(cfg.csw_weight)}*CSW-KD(T={weight_text(cfg.csw_temperature)}, "
               f"delta={weight_text(cfg.csw_delta)}, old-class prototypes)")
        return f"{terms} + {csw}{labels}{rest}"

PRESETS: dict[str, MethodConfig] = {
    # REMINDER as its code's `--method REMINDER` sets it (argparser.py 58-67): PLOP's VOC options (POD 0.01 /
    # 0.0005, entropy pseudo-labels, floor 0.001, background init) and CSW-KD 0.5, T 3, delta 0.
    "reminder": REMINDERConfig(name="reminder"),
    # Its ADE20k scripts (scripts/ade/reminder_100-50.sh, _100-10.sh): POD 0.001 / 0.00001 and delta 1.
    "reminder-ade": REMINDERConfig(name="reminder-ade", pod_factor=0.001, pod_logits_factor=0.00001, csw_delta=1.0),
}
