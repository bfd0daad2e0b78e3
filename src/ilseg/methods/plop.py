"""The loss terms and pseudo-labels of PLOP, as pure functions of tensors.

PLOP (Douillard et al., "PLOP: Learning without Forgetting for Continual
Semantic Segmentation", CVPR 2021) trains step ``t > 0`` with

* **Local POD** (:func:`local_pod_loss`): a distance between multi-scale
  row/column means of six maps of the student and of the previous model (the
  teacher): the pre-activation output of the four ResNet stages, the head
  output and the logits at head resolution.  The method asks the model for
  them as taps (:data:`POD_TAPS`, :class:`~ilseg.models.IncrementalSegmenter`).
* **Entropy pseudo-labels** (:func:`pseudo_label`): background pixels take the
  teacher's prediction where the teacher is confident enough (its normalised
  entropy below a per-class threshold, :class:`EntropyThresholds`) and are
  ignored elsewhere; each image's cross-entropy is scaled by the fraction of
  its background pixels that were kept (:func:`plop_cross_entropy`).

The total loss is ``plop_cross_entropy(...) + local_pod_loss(...)``
(:class:`PLOP`, the method, at the end of this file).  Formulas and the
reference's quirks: docs/methods.md "PLOP"; source: PLOP's
``train.py`` (``features_distillation``, ``_local_pod``, ``entropy``,
``Trainer.find_median``, ``Trainer.train``), repository
arthurdouillard/CVPR2021_PLOP.

Notation: ``C_old`` the teacher's output channels (background included),
``N`` the classes added at this step, ``N_all = C_old + N``.  Labels are
channel ids of the current step's training targets: 0 is background (with
data masking "current", old and future classes are 0 too), 255 is ignored.

Every function computes in float32 whatever the input dtype (bf16/fp16 maps
under ``torch.autocast`` are upcast), and detaches the teacher's tensors: no
gradient reaches the previous model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ilseg.errors import IlsegError
from ilseg.methods.base import (
    NON_NEGATIVE,
    ClassifierInit,
    Method,
    MethodConfig,
    Reduce,
    StepSetup,
    TeacherBatch,
    boundary_text,
    ce_text,
    weight_text,
    weighted_total,
)
from ilseg.methods.losses import CEReduction
from ilseg.models import IncrementalSegmenter
from ilseg.tasks import IGNORE_INDEX, Task

POD_SCALES: tuple[int, ...] = (1, 2, 4)
PLOP_THRESHOLD_FLOOR = 0.001  # PLOP's --threshold: in entropy mode a floor on each class's threshold
MEDIAN_BINS = 100_000  # bins of the exact-median histogram over [0, v_max]
COMPAT_BINS = 100  # PLOP's histogram: 100 bins over [0, 1]

ThresholdMode = Literal["median", "plop_compat"]


# ---------------------------------------------------------------- Local POD


def pod_embedding(x: Tensor, scales: Sequence[int] = POD_SCALES) -> Tensor:
    """PLOP's local POD embedding: region-wise means over width and over height.

    For each scale ``s`` the map is cut into ``s x s`` square regions of side
    ``k = W // s`` (rows ``i*k:(i+1)*k``, columns ``j*k:(j+1)*k``; rows and
    columns beyond ``s*k`` are left out, as in PLOP).  Each region gives its
    mean over width (one value per channel and row: ``C*k`` values) and its
    mean over height (one per channel and column: ``C*k``).  Everything is
    concatenated in PLOP's order: scales in the given order, regions row-major
    ``(i, j)``, and within a region the width means (channel-major) then the
    height means.

    Args:
        x: ``BxCxHxW`` map with ``H == W`` (PLOP derives ``k`` from the width
            for both axes, so only square maps are well defined).
        scales: the pyramid's scales, each at most ``W``.

    Returns:
        ``Bx(2*C*W'*sum(scales))`` where ``W' = k*s``; for scales ``(1, 2, 4)``
        and ``W`` divisible by 4 that is ``Bx(14*C*W)``.  Same dtype as ``x``.

    Example::

        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> pod_embedding(x, scales=(1,))  # row means, then column means
        tensor([[ 1.5000,  5.5000,  9.5000, 13.5000,  6.0000,  7.0000,  8.0000,  9.0000]])
    """
    if x.dim() != 4:
        raise ValueError(f"the POD embedding needs a BxCxHxW map, got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if height != width:
        raise ValueError(f"the local POD embedding needs square maps (PLOP cuts both axes by the width), "
                         f"got {height}x{width}")
    parts = []
    for scale in scales:
        side = width // scale
        if scale < 1 or side < 1:
            raise ValueError(f"POD scale {scale} does not fit a map of width {width}")
        # (B, C, i, row, j, column): region (i, j) holds rows i*side.. and columns j*side..
        regions = x[..., : scale * side, : scale * side].reshape(batch, channels, scale, side, scale, side)
        width_means = regions.mean(dim=5).permute(0, 2, 4, 1, 3)  # (B, i, j, C, row)
        height_means = regions.mean(dim=3).permute(0, 2, 3, 1, 4)  # (B, i, j, C, column)
        parts.append(torch.stack([width_means, height_means], dim=3).reshape(batch, -1))
    return torch.cat(parts, dim=1)


def merge_extra_channels(student_logits: Tensor, num_old_channels: int) -> Tensor:
    """PLOP's ``extra_channels="sum"``: the student's logits brought to the teacher's width.

    Channel 0 becomes ``z_0 + sum_{c >= C_old} z_c`` (a plain sum of raw
    logits, the new classes counted as background); channels
    ``1..C_old-1`` are kept.

    Args:
        student_logits: ``BxN_allxhxw``.
        num_old_channels: ``C_old``, at most ``N_all``.

    Returns:
        ``BxC_oldxhxw``.
    """
    if not 1 <= num_old_channels <= student_logits.shape[1]:
        raise ValueError(f"num_old_channels must be in 1..{student_logits.shape[1]}, got {num_old_channels}")
    background = student_logits[:, :1] + student_logits[:, num_old_channels:].sum(dim=1, keepdim=True)
    return torch.cat([background, student_logits[:, 1:num_old_channels]], dim=1)


def local_pod_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    *,
    num_old_channels: int,
    num_classes_total: int,
    num_new: int,
    factors: float | Sequence[float],
    logits_factor: float,
    scales: Sequence[int] = POD_SCALES,
) -> Tensor:
    """PLOP's Local POD distillation (PLOP's ``train.py`` ``features_distillation``; docs/methods.md)::

        L_pod = 1/M * sum_l  lambda_l * sqrt(N_all / N) * mean_b || Phi(a_l^2) - Phi(b_l^2) ||_2

    for the ``M`` maps ``l``, with ``a`` the teacher's maps, ``b`` the
    student's, ``Phi`` :func:`pod_embedding` and ``||.||_2`` the (not squared)
    L2 norm of each image's embedding difference.  No normalisation of the
    embeddings.  The last map is the logits map: when the student has more
    channels than the teacher there, it is first merged to ``C_old`` channels
    (:func:`merge_extra_channels`); every other map must match in shape.
    A map whose factor is 0 adds nothing but still counts in ``M`` (as in PLOP).

    Args:
        student_maps: the student's maps, ``B x C_l x h_l x w_l`` each (the
            model's ``out["taps"]`` for :data:`POD_TAPS`), square.
        teacher_maps: the teacher's, same shapes except the last map's
            ``C_old`` channels; detached here.
        num_old_channels: ``C_old``.
        num_classes_total: ``N_all``.
        num_new: ``N``, so that ``N_all == C_old + N``.
        factors: ``lambda_l`` of every map but the last: one value for all
            (PLOP's ``pod_factor``: 0.01 on VOC, 0.001 on ADE) or one per map.
        logits_factor: ``lambda`` of the last map (PLOP's
            ``pod_options.switch.after.factor``: 0.0005 on VOC, 1e-5 on ADE).
        scales: the POD pyramid (1, 2, 4 in PLOP).

    Returns:
        A float32 scalar.
    """
    count = len(student_maps)
    if count == 0 or count != len(teacher_maps):
        raise ValueError(f"need as many student as teacher maps, at least one; got {count} and {len(teacher_maps)}")
    if num_new < 1 or num_old_channels < 1 or num_old_channels + num_new != num_classes_total:
        raise ValueError(f"need num_old_channels + num_new == num_classes_total with both positive, got "
                         f"{num_old_channels} + {num_new} != {num_classes_total}")
    map_factors = _map_factors(factors, logits_factor, count)
    schedule = math.sqrt(num_classes_total / num_new)
    total = torch.zeros((), dtype=torch.float32, device=student_maps[0].device)
    for index, (student, teacher, factor) in enumerate(zip(student_maps, teacher_maps, map_factors)):
        if factor == 0:
            continue
        a, b = _paired_maps(index, teacher, student, logits=index == count - 1, num_old_channels=num_old_channels,
                            num_classes_total=num_classes_total)
        difference = pod_embedding(a.pow(2), scales) - pod_embedding(b.pow(2), scales)
        distance = torch.linalg.vector_norm(difference, dim=1).mean()
        total = total + factor * distance * schedule
    return total / count


def _map_factors(factors: float | Sequence[float], logits_factor: float, count: int) -> list[float]:
    """``lambda_l`` of each of the ``count`` maps: ``factors`` for all but the last, ``logits_factor`` last."""
    if isinstance(factors, (int, float)):
        return [float(factors)] * (count - 1) + [logits_factor]
    layer_factors = [float(f) for f in factors]
    if len(layer_factors) != count - 1:
        raise ValueError(f"need one factor per map but the last ({count - 1}), got {len(layer_factors)}")
    return layer_factors + [logits_factor]


def _paired_maps(index: int, teacher: Tensor, student: Tensor, *, logits: bool, num_old_channels: int,
                 num_classes_total: int) -> tuple[Tensor, Tensor]:
    """Teacher (detached) and student map ``index`` in float32 and one shape; the logits merged to ``C_old``."""
    a, b = teacher.detach().float(), student.float()
    if logits:
        if a.shape[1] != num_old_channels or b.shape[1] != num_classes_total:
            raise ValueError(f"the last (logits) maps need {num_old_channels} teacher and {num_classes_total} "
                             f"student channels, got {a.shape[1]} and {b.shape[1]}")
        b = merge_extra_channels(b, num_old_channels)
    if a.shape != b.shape:
        raise ValueError(f"POD map {index}: teacher {tuple(a.shape)} and student {tuple(b.shape)} differ")
    return a, b


# ---------------------------------------------------------------- pseudo-labels


def normalized_entropy(probs: Tensor) -> Tensor:
    """PLOP's per-pixel entropy ``e(p) = -1/ln(C) * mean_c p_c ln(p_c + 1e-8)``.

    The mean over channels divides by ``C`` on top of ``ln C``, so
    ``e = H(p) / (C ln C)`` lies in ``[0, 1/C]``, not ``[0, 1]`` (PLOP's
    ``entropy``; its ``ln C`` is ``ln(C + 1e-8)``, kept here).

    Args:
        probs: ``BxCxHxW`` probabilities (a softmax over dim 1).

    Returns:
        ``BxHxW`` float32.

    Example::

        >>> p = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
        >>> round(normalized_entropy(p).item(), 4)  # ln 2 / (2 ln 2)
        0.5
    """
    p = probs.float()
    factor = 1.0 / math.log(p.shape[1] + 1e-8)
    return -factor * torch.mean(p * torch.log(p + 1e-8), dim=1)


def entropy_scores(teacher_logits: Tensor, *, num_classes_total: int) -> tuple[Tensor, Tensor]:
    """The value PLOP compares with a class's threshold, and the teacher's prediction.

    ``v = e(softmax(t)) / ln(N_all)`` (:func:`normalized_entropy`; ``ln N_all``
    in float32 as PLOP's ``max_entropy``), so ``0 <= v <= 1/(C_old ln N_all)``.

    Args:
        teacher_logits: ``BxC_oldxHxW`` teacher logits at the labels'
            resolution (the model's upsampled ``"logits"``).
        num_classes_total: ``N_all``.

    Returns:
        ``(v, prediction)``: ``BxHxW`` float32 and ``BxHxW`` int64, the
        teacher's argmax (which may be 0, background).
    """
    probs = torch.softmax(teacher_logits.detach().float(), dim=1)
    max_entropy = torch.log(torch.tensor(float(num_classes_total), device=probs.device))
    return normalized_entropy(probs) / max_entropy, probs.argmax(dim=1)


class EntropyThresholds:
    """Per-class thresholds on ``v`` from one pass of the teacher over the training set.

    PLOP computes them once per step ``t > 0``, before the first epoch, on the
    training loader (augmented crops).  Feed every batch to :meth:`update`,
    merge the ranks (below), then read :meth:`thresholds`.  Only pixels whose
    training label is 0 count (background, and the masked old and future
    classes; 255 and the current step's classes are left out), each under the
    teacher's predicted class.

    Two histograms per class, kept in one int64 tensor ``counts`` of shape
    ``C_old x (bins + 100)``:

    * columns ``0 .. bins-1``: the exact-median histogram.  Bin ``b`` holds
      ``b*w <= v < (b+1)*w`` with ``w = v_max / bins`` and
      ``v_max = 1 / (C_old ln N_all)`` (the largest possible ``v``; values at
      or above it, from float rounding, go into the last bin);
    * columns ``bins .. bins+99``: PLOP's histogram, bin ``min(floor(100 v), 99)``
      with ``100 v`` computed in float32 as PLOP does.

    Memory: ``8 * C_old * (bins + 100)`` bytes, e.g. 16 MB for VOC (20 old
    channels) and 117 MB for 146 old ADE channels at the default 100000 bins.

    Distributed runs: :meth:`state` returns ``counts`` itself, so
    ``dist.all_reduce(acc.state())`` (a sum) merges every rank's pixels in
    place, after which all ranks read the same thresholds, those of one
    process that saw the whole loader.  (PLOP itself does not reduce: each
    rank keeps thresholds from its own shard.)  :meth:`merge` adds another
    accumulator's state.

    Example::

        >>> acc = EntropyThresholds(num_old_channels=16, num_classes_total=17)
        >>> for images, labels in loader:
        ...     acc.update(teacher(images)["logits"], labels)
        >>> torch.distributed.all_reduce(acc.state())  # when distributed
        >>> thresholds = acc.thresholds(mode="median")  # C_old float32
    """

    def __init__(
        self,
        *,
        num_old_channels: int,
        num_classes_total: int,
        bins: int = MEDIAN_BINS,
        device: torch.device | str | None = None,
    ) -> None:
        if num_old_channels < 2 or num_classes_total <= num_old_channels:
            raise ValueError(f"need 2 <= num_old_channels < num_classes_total, got {num_old_channels} "
                             f"and {num_classes_total}")
        if bins < 1:
            raise ValueError(f"the median histogram needs at least one bin, got {bins}")
        self.num_old_channels = num_old_channels
        self.num_classes_total = num_classes_total
        self.bins = bins
        self.value_max = 1.0 / (num_old_channels * math.log(num_classes_total))
        self.bin_width = self.value_max / bins
        self.counts = torch.zeros(num_old_channels, bins + COMPAT_BINS, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, label: Tensor) -> None:
        """Count the label-0 pixels of one batch under the teacher's predicted class.

        Args:
            teacher_logits: ``BxC_oldxHxW`` teacher logits at the labels'
                resolution (eval-mode teacher, upsampled ``"logits"``).
            label: ``BxHxW`` training targets (channel ids, 0 = background,
                255 = ignored).

        The counts move to the logits' device if they are elsewhere.
        """
        if teacher_logits.dim() != 4 or teacher_logits.shape[1] != self.num_old_channels:
            raise ValueError(f"teacher logits must be Bx{self.num_old_channels}xHxW, got {tuple(teacher_logits.shape)}")
        if label.shape != teacher_logits.shape[:1] + teacher_logits.shape[2:]:
            raise ValueError(f"labels {tuple(label.shape)} do not match the logits {tuple(teacher_logits.shape)}")
        if self.counts.device != teacher_logits.device:
            self.counts = self.counts.to(teacher_logits.device)
        scores, prediction = entropy_scores(teacher_logits, num_classes_total=self.num_classes_total)
        # every pixel is scattered, weighted 1 if its label is 0 and 0 otherwise: no
        # boolean indexing, so no device-to-host synchronisation
        weight = (label.to(teacher_logits.device) == 0).flatten().long()
        classes = prediction.flatten()
        values = scores.flatten()
        fine = torch.floor(values.double() / self.bin_width).clamp(0, self.bins - 1).long()
        compat = (values * COMPAT_BINS).long().clamp(max=COMPAT_BINS - 1) + self.bins
        self.counts.index_put_((classes, fine), weight, accumulate=True)
        self.counts.index_put_((classes, compat), weight, accumulate=True)

    def state(self) -> Tensor:
        """The counts tensor itself (``C_old x (bins + 100)`` int64), for an in-place all-reduce."""
        return self.counts

    def merge(self, state: Tensor) -> None:
        """Add another accumulator's :meth:`state` (e.g. another rank's) to this one."""
        if state.shape != self.counts.shape:
            raise ValueError(f"cannot merge counts of shape {tuple(state.shape)} into {tuple(self.counts.shape)}")
        self.counts += state.to(self.counts.device)

    def thresholds(self, mode: ThresholdMode = "median", floor: float = PLOP_THRESHOLD_FLOOR) -> Tensor:
        """One threshold per teacher class: ``max(median_c, floor)``, ``C_old`` float32.

        * ``"median"``: the lower median of ``v`` over the class's pixels (the
          value of rank ``ceil(n/2)``, as ``torch.median``), read as the centre
          of the histogram bin that holds it: off by at most half a bin,
          ``v_max / (2 bins)``.  A class with no pixel gets ``floor``.
        * ``"plop_compat"``: PLOP's ``find_median`` in entropy mode, quirks
          included (:func:`plop_compat_median`); a class with no pixel gets 0,
          hence ``floor``.  The floor is applied as PLOP's
          ``max(threshold, floor)``, which keeps a NaN.

        ``floor`` is PLOP's ``--threshold`` (0.001).
        """
        if mode == "median":
            return self._median_thresholds(floor)
        if mode == "plop_compat":
            histograms = self.counts[:, self.bins:].cpu().tolist()
            medians = [plop_compat_median(histogram) for histogram in histograms]
            floored = [median if not floor > median else torch.tensor(floor) for median in medians]
            return torch.stack(floored).to(device=self.counts.device, dtype=torch.float32)
        raise ValueError(f"unknown threshold mode {mode!r}; use 'median' or 'plop_compat'")

    def _median_thresholds(self, floor: float) -> Tensor:
        counts = self.counts[:, : self.bins]
        totals = counts.sum(dim=1)
        rank = (totals + 1) // 2  # 1-based rank of the lower median
        # first bin whose cumulative count reaches that rank
        index = (counts.cumsum(dim=1) < rank[:, None]).sum(dim=1)
        centres = (index.double() + 0.5) * self.bin_width
        medians = torch.where(totals > 0, centres, torch.zeros_like(centres)).float()
        return torch.clamp(medians, min=floor)


def plop_compat_median(histogram: Sequence[int]) -> Tensor:
    """PLOP's per-class "median" from its 100-bin histogram, reproduced with its quirks.

    PLOP's ``Trainer.find_median`` (entropy mode) walks ``k = 0..99`` with
    ``lower = k/100`` and reads bin ``int(lower * 100)``; it stops at the first
    ``k`` with ``running <= half <= running + count``, where ``half = n/2``,
    and otherwise adds ``lower * 100`` to ``running``.  Then
    ``median = lower + (half - running) / count * 0.01``.  Hence:

    * the running sum adds the bin's (float) index, not its count: the
      result is a median only when the walk stops at bin 0 or at a bin that
      alone holds at least ``half - running`` pixels;
    * ``int(k/100*100)`` is 28, 56, 57 for ``k`` = 29, 57, 58: bins 28 and 56
      are read twice, bins 29 and 58 never, and bin 57 is read with
      ``lower = 0.58``;
    * when no ``k`` stops the walk it ends with ``lower = 0.99``, bin 99 and
      ``running = 4950`` (0 + 1 + ... + 99); bin 99 is normally empty, so the
      result is ``+inf`` if ``half > 4950`` (every pixel of the class passes),
      ``-inf`` if ``half < 4950`` (the floor wins) and NaN if ``half == 4950``;
    * a walk that stops on an empty bin (``half`` equal to the running sum,
      possible only for small counts) divides 0 by 0: NaN, which survives
      the floor and then rejects every pixel of the class;
    * an empty histogram gives 0.

    The arithmetic is PLOP's: ``half`` and every comparison and operation on
    it in float32 (large counts round), ``running`` a Python float.

    Args:
        histogram: the 100 counts of one class.

    Returns:
        A float32 scalar (on the CPU).
    """
    if len(histogram) != COMPAT_BINS:
        raise ValueError(f"PLOP's histogram has {COMPAT_BINS} bins, got {len(histogram)}")
    total = sum(int(count) for count in histogram)
    if total <= 0:
        return torch.zeros((), dtype=torch.float32)
    half = torch.tensor(total, dtype=torch.int64) / 2  # float32, as PLOP's `total / 2`
    running = 0.0
    lower = 0.0
    count = torch.zeros((), dtype=torch.int64)
    for k in range(COMPAT_BINS):
        lower = k / COMPAT_BINS
        count = torch.tensor(int(histogram[int(lower * COMPAT_BINS)]), dtype=torch.int64)
        if bool(half >= running) and bool(half <= running + count):
            break
        running += lower * COMPAT_BINS
    return lower + ((half - running) / count) * (1 / COMPAT_BINS)


def pseudo_label(
    label: Tensor,
    teacher_logits: Tensor,
    thresholds: Tensor,
    *,
    num_old_channels: int,
    num_classes_total: int,
) -> tuple[Tensor, Tensor]:
    """PLOP's entropy pseudo-labels and per-image adaptive factor (PLOP's ``train.py`` ``Trainer.train``; docs/methods.md).

    With ``bg = label < C_old`` (255 is not background), ``y^`` the
    teacher's argmax (possibly 0) and ``valid = v < thresholds[y^]``
    (:func:`entropy_scores`):

    * ``bg & valid`` pixels get ``y^``; ``bg & ~valid`` pixels get 255;
      every other pixel keeps its label;
    * ``f = #(bg & valid) / (#bg + 1e-6)`` per image.

    Args:
        label: ``BxHxW`` training targets (channel ids, 255 = ignored).
        teacher_logits: ``BxC_oldxHxW`` teacher logits at the labels' resolution.
        thresholds: ``C_old`` float thresholds (:meth:`EntropyThresholds.thresholds`).
        num_old_channels: ``C_old``.
        num_classes_total: ``N_all`` (the scale of ``v``).

    Returns:
        ``(new_label, factor)``: ``BxHxW`` like ``label`` and ``B`` float32.
    """
    if teacher_logits.dim() != 4 or teacher_logits.shape[1] != num_old_channels:
        raise ValueError(f"teacher logits must be Bx{num_old_channels}xHxW, got {tuple(teacher_logits.shape)}")
    if label.shape != teacher_logits.shape[:1] + teacher_logits.shape[2:]:
        raise ValueError(f"labels {tuple(label.shape)} do not match the logits {tuple(teacher_logits.shape)}")
    if thresholds.shape != (num_old_channels,):
        raise ValueError(f"need {num_old_channels} thresholds, got shape {tuple(thresholds.shape)}")
    scores, prediction = entropy_scores(teacher_logits, num_classes_total=num_classes_total)
    background = label < num_old_channels
    valid = scores < thresholds.to(device=scores.device, dtype=torch.float32)[prediction]
    accepted = background & valid
    new_label = label.masked_fill(background & ~valid, IGNORE_INDEX)
    new_label = torch.where(accepted, prediction.to(label.dtype), new_label)
    factor = accepted.float().sum(dim=(1, 2)) / (background.float().sum(dim=(1, 2)) + 1e-6)
    return new_label, factor


def plop_cross_entropy(logits: Tensor, label: Tensor, factor: Tensor) -> Tensor:
    """PLOP's classification loss: ``mean over all B*H*W pixels of f_b * CE``.

    Per-pixel cross-entropy over all channels (255 ignored, counting 0),
    multiplied by the image's adaptive factor, averaged over every pixel of
    the batch, ignored ones included (PLOP's ``(f * CE).mean()``).

    Args:
        logits: ``BxN_allxHxW`` student logits, any float dtype.
        label: ``BxHxW`` channel ids or 255 (the pseudo-labelled targets).
        factor: ``B`` per-image factors (:func:`pseudo_label`).

    Returns:
        A float32 scalar.
    """
    if factor.shape != logits.shape[:1]:
        raise ValueError(f"need one factor per image ({logits.shape[0]}), got shape {tuple(factor.shape)}")
    per_pixel = F.cross_entropy(logits.float(), label.long(), ignore_index=IGNORE_INDEX, reduction="none")
    return (per_pixel * factor.float()[:, None, None]).mean()


# ---------------------------------------------------------------- the method

# The maps Local POD compares, in the order of :func:`local_pod_loss`.
POD_TAPS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4", "head", "logits_lowres")


@dataclasses.dataclass(frozen=True)
class PLOPConfig(MethodConfig):
    """PLOP's settings (and the common fields of :class:`~ilseg.methods.base.MethodConfig`, with PLOP's defaults).

    Attributes:
        pod_factor: Local POD's weight of the four ResNet stages and the head
            output (:func:`local_pod_loss`); 0 with ``pod_logits_factor`` 0 = off.
        pod_logits_factor: its weight of the logits map.
        pseudo_labels: ``"entropy"``: PLOP's pseudo-labels on background
            pixels, the CE scaled per image by the fraction kept and averaged
            over all pixels (:func:`pseudo_label`); ``"none"``: the plain CE.
        pseudo_threshold: per-class entropy thresholds: ``"median"`` (the true
            median over the step's training set, all ranks together) or
            ``"plop_compat"`` (PLOP's own histogram walk, per rank).
        pseudo_floor: the smallest threshold (PLOP's ``--threshold``).
    """

    ce_reduction: CEReduction = "all"
    classifier_init: ClassifierInit = "background"
    pod_factor: float = dataclasses.field(default=0.01, metadata=NON_NEGATIVE)
    pod_logits_factor: float = dataclasses.field(default=0.0005, metadata=NON_NEGATIVE)
    pseudo_labels: Literal["none", "entropy"] = "entropy"
    pseudo_threshold: ThresholdMode = "median"
    pseudo_floor: float = dataclasses.field(default=PLOP_THRESHOLD_FLOOR, metadata=NON_NEGATIVE)

    def check(self) -> None:
        if self.pseudo_labels != "none" and self.ce_reduction != "all":
            self.fail(f"pseudo_labels = {self.pseudo_labels!r} scales each image's cross-entropy and averages it "
                      "over all pixels (PLOP): set ce_reduction to 'all'")

    @property
    def uses_pod(self) -> bool:
        """Whether Local POD is on (either factor positive)."""
        return self.pod_factor > 0 or self.pod_logits_factor > 0


class PLOP(Method):
    """``L = CE(pseudo-labels) + POD`` from step 1 on; ``CE(y)`` at step 0.

    Before each step > 0 it computes the per-class entropy thresholds from
    one pass of the teacher over the step's training set (:meth:`prepare`).
    """

    config_class = PLOPConfig
    cfg: PLOPConfig

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.thresholds: Tensor | None = None  # the current step's, from prepare()
        self._new_channels = 0  # classes added by the step start_step prepared

    @property
    def needs_teacher(self) -> bool:
        return True

    def taps(self, step: int) -> tuple[str, ...]:
        return POD_TAPS if step > 0 and self.cfg.uses_pod else ()

    def start_step(self, model: IncrementalSegmenter, task: Task, step: int) -> StepSetup:
        self.thresholds = None
        self._new_channels = task.step_sizes[step]
        return super().start_step(model, task, step)

    def prepares(self, step: int) -> bool:
        return step > 0 and self.cfg.pseudo_labels != "none"

    def prepare(self, batches: Iterable[TeacherBatch], step: int, *, reduce: Reduce | None = None) -> str:
        """The per-class entropy thresholds of step ``step`` (kept for its losses).

        With ``reduce`` every rank gets the thresholds of the whole training
        set; ``"plop_compat"`` leaves it unused, as PLOP's thresholds come from
        each rank's own shard.
        """
        if self._new_channels < 1:
            raise ValueError("prepare needs the step's start_step first (it sets the number of new classes)")
        acc: EntropyThresholds | None = None
        images = 0
        for teacher_out, target in batches:
            teacher_logits = teacher_out["logits"]
            if acc is None:
                acc = EntropyThresholds(num_old_channels=teacher_logits.shape[1],
                                        num_classes_total=teacher_logits.shape[1] + self._new_channels,
                                        device=teacher_logits.device)
            acc.update(teacher_logits, target)
            images += target.shape[0]
        if acc is None:
            raise IlsegError(f"step {step} has no training batch to compute the pseudo-label thresholds from")
        if reduce is not None and self.cfg.pseudo_threshold == "median":
            reduce(acc.state())
        self.thresholds = acc.thresholds(mode=self.cfg.pseudo_threshold, floor=self.cfg.pseudo_floor)
        return (f"pseudo-label thresholds from {images} training images ({self.cfg.pseudo_threshold}): "
                + " ".join(f"{float(t):.4g}" for t in self.thresholds))

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        logits = student["logits"]
        if teacher is None:
            return self.cross_entropy_only(logits, target)
        old_logits = teacher["logits"]
        losses = {"ce": self._classification(logits, old_logits, target, step)}
        if cfg.uses_pod:
            old = old_logits.shape[1]
            losses["pod"] = local_pod_loss([student["taps"][n] for n in POD_TAPS],
                                           [teacher["taps"][n] for n in POD_TAPS], num_old_channels=old,
                                           num_classes_total=logits.shape[1], num_new=logits.shape[1] - old,
                                           factors=cfg.pod_factor, logits_factor=cfg.pod_logits_factor)
        return weighted_total(losses, {})  # POD's factors are inside the term

    def _classification(self, logits: Tensor, teacher_logits: Tensor, target: Tensor, step: int) -> Tensor:
        if self.cfg.pseudo_labels == "none":
            return self.cross_entropy(logits, target)
        if self.thresholds is None:
            raise ValueError(f"method {self.cfg.name!r} pseudo-labels with thresholds from prepare(), which was "
                             f"not called for step {step}")
        with torch.no_grad():
            labels, kept = pseudo_label(target, teacher_logits, self.thresholds.to(logits.device),
                                        num_old_channels=teacher_logits.shape[1], num_classes_total=logits.shape[1])
        return plop_cross_entropy(logits, labels, kept)

    def describe(self) -> str:
        cfg = self.cfg
        if cfg.pseudo_labels == "entropy":
            terms = [f"CE(pseudo-labels: entropy < {cfg.pseudo_threshold} threshold, x kept fraction, "
                     "mean over all pixels)"]
        else:
            terms = [ce_text(cfg)]
        if cfg.uses_pod:
            terms.append(f"POD(stages+head {weight_text(cfg.pod_factor)}, logits {weight_text(cfg.pod_logits_factor)})")
        return f"{cfg.name}: L = {' + '.join(terms)} {boundary_text(self, distils=True)}"


PRESETS: dict[str, MethodConfig] = {
    # PLOP as its code's `--method PLOP` sets it for VOC: Local POD (0.01 on the stages and head, 0.0005 on
    # the logits), entropy pseudo-labels (true-median thresholds, floor 0.001), new classifiers from the
    # background, CE over all pixels.  ADE20k presets lower the POD factors.
    "plop": PLOPConfig(name="plop"),
}
