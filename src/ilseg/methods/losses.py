"""The loss terms of ILT and its baselines, as pure functions of tensors.

Notation (docs/protocol.md#ilt-losses): ``z`` are the student's logits, ``z°`` the
teacher's (the previous step's model, ``C_old`` channels), ``y`` the training
target (channel ids, 255 = ignore), ``f`` / ``f°`` the encoder features.
Logits arrive already upsampled to the target's resolution.

Every function computes its softmax / log-softmax in float32, whatever the
input dtype, so the losses stay exact under ``torch.autocast`` (bf16 or fp16
logits): a bf16 input is upcast once, a float32 input is used as is.  Teacher
tensors are detached: no gradient ever reaches the previous model.  No
function synchronises with the GPU (no ``.item()``), and a term with no pixel
to average over returns 0 with a gradient instead of NaN.

Sources:

* ``cross_entropy`` - PyTorch / cssegmentation (``"valid"``) and MiB (``"all"``).
* ``kd_mib`` - MiB's re-implementation of ILT (``KnowledgeDistillationLoss``),
  which cssegmentation's ILT page runs with weight 100.
* ``kd_ilt_output`` - the ILT paper's output distillation ``L'_D``.
* ``feature_distillation`` - MiB's ``L_FD`` and the ILT paper's ``L''_D``.
* ``unbiased_cross_entropy`` and ``kd_unbiased`` - MiB's own method
  (``UnbiasedCrossEntropy``, ``UnbiasedKnowledgeDistillationLoss``;
  docs/protocol.md#mib-unbiased-cross-entropy).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ilseg.tasks import IGNORE_INDEX

CEReduction = Literal["valid", "all"]
KDMask = Literal["old_bgr", "all", "old"]


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: CEReduction = "valid",
) -> Tensor:
    """Pixel-wise cross-entropy with an ignore label.

    ``CE = - sum_{i : y_i != 255} log softmax(z_i)[y_i] / N``, where ``N`` is

    * ``"valid"``: the number of non-ignored pixels (PyTorch's ``mean``, what
      cssegmentation uses);
    * ``"all"``: every pixel of the batch, ignored ones included (MiB takes the
      mean of the unreduced loss, in which ignored pixels count as 0).

    If every pixel is ignored the result is 0 (with a gradient), not NaN.

    Args:
        logits: ``BxCxHxW`` student logits, any float dtype.
        target: ``BxHxW`` int64 channel ids in ``0..C-1`` or ``ignore_index``.
        ignore_index: the label whose pixels are left out of the sum.
        reduction: ``"valid"`` or ``"all"`` (see above).

    Returns:
        A float32 scalar.

    Example::

        >>> z = torch.zeros(1, 2, 1, 2); y = torch.tensor([[[0, 255]]])
        >>> round(cross_entropy(z, y).item(), 4), round(cross_entropy(z, y, reduction="all").item(), 4)
        (0.6931, 0.3466)
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    if reduction == "valid":
        return total / per_process_share((target != ignore_index).sum())
    if reduction == "all":
        return total / max(target.numel(), 1)
    raise ValueError(f"unknown cross-entropy reduction {reduction!r}; use 'valid' or 'all'")


def unbiased_cross_entropy(
    logits: Tensor,
    target: Tensor,
    num_old: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: CEReduction = "all",
) -> Tensor:
    """MiB's unbiased cross-entropy: a pixel labelled background may be any old class.

    At a step whose training targets keep only the new classes (old classes
    are background there), the probability of "background" is that of the
    background *or any old class*:

    ``log p_bg = logsumexp(z[:num_old]) - logsumexp(z)``,
    ``log p_c = z_c - logsumexp(z)`` for a new class ``c >= num_old``,

    and the loss is ``- sum_i log p_{y_i}`` over the non-ignored pixels,
    with every target below ``num_old`` read as background (the caller's
    tensor is not modified), divided as :func:`cross_entropy` divides
    (MiB: ``"all"``, every pixel of the batch).

    Args:
        logits: ``BxCxHxW`` student logits, ``C > num_old``.
        target: ``BxHxW`` int64 channel ids or ``ignore_index``.
        num_old: the previous step's channel count, background included
            (the teacher's ``C_old``).
        reduction: ``"all"`` (MiB) or ``"valid"``.

    Returns:
        A float32 scalar.

    Example::

        >>> z = torch.tensor([[1.0, 2.0, 0.5]]).view(1, 3, 1, 1)   # bg, old, new
        >>> y = torch.tensor([[[0]]])                                 # "background"
        >>> expected = -(torch.logsumexp(z[0, :2, 0, 0], 0) - torch.logsumexp(z[0, :, 0, 0], 0))
        >>> bool(torch.isclose(unbiased_cross_entropy(z, y, num_old=2), expected))
        True
    """
    if not 0 < num_old <= logits.shape[1]:
        raise ValueError(f"num_old must be in 1..{logits.shape[1]}, got {num_old}")
    z = logits.float()
    valid = target != ignore_index
    label = torch.where(valid, target, torch.zeros_like(target))
    den = torch.logsumexp(z, dim=1)
    merged = torch.logsumexp(z[:, :num_old], dim=1)
    own = z.gather(1, label.unsqueeze(1)).squeeze(1)
    per_pixel = (den - torch.where(label < num_old, merged, own)) * valid
    if reduction == "valid":
        return per_pixel.sum() / per_process_share(valid.sum())
    if reduction == "all":
        return per_pixel.sum() / max(target.numel(), 1)
    raise ValueError(f"unknown cross-entropy reduction {reduction!r}; use 'valid' or 'all'")


def kd_unbiased(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 1.0) -> Tensor:
    """MiB's unbiased output distillation: the teacher's background is the student's background
    *or any new class*.

    ``L = - mean_i (1/C_old) [ q_0 log p~_bg + sum_{c=1}^{C_old-1} q_c log p_c ]`` with
    ``q = softmax(alpha * z°)`` over the teacher's ``C_old`` channels,
    ``log p~_bg = logsumexp(z[[0, C_old, ..., C-1]]) - logsumexp(z)`` and
    ``log p_c = z_c - logsumexp(z)``; the division by ``C_old`` (background
    included) and the mean over all pixels are MiB's.

    Args:
        student_logits: ``BxCxHxW``, ``C >= C_old``.
        teacher_logits: ``BxC_oldxHxW``; detached here.
        alpha: scale of the teacher's logits (MiB's ``--alpha``, 1 by default).

    Returns:
        A float32 scalar.
    """
    c_old = _check_teacher_logits(student_logits, teacher_logits)
    z = student_logits.float()
    q = torch.softmax(teacher_logits.detach().float() * alpha, dim=1)
    den = torch.logsumexp(z, dim=1)
    background = torch.logsumexp(torch.cat([z[:, :1], z[:, c_old:]], dim=1), dim=1)
    # sum_c q_c (log p_c) with sum_c q_c = 1: the common "- den" comes out once.
    weighted = q[:, 0] * background + (q[:, 1:] * z[:, 1:c_old]).sum(dim=1) - den
    return -(weighted / c_old).mean()


def _check_teacher_logits(student_logits: Tensor, teacher_logits: Tensor) -> int:
    """The teacher's channel count, after checking it fits the student's."""
    c_old = teacher_logits.shape[1]
    if student_logits.dim() != 4 or teacher_logits.dim() != 4:
        raise ValueError(
            f"logits must be BxCxHxW; got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    same_pixels = (student_logits.shape[0], *student_logits.shape[2:]) == (
        teacher_logits.shape[0], *teacher_logits.shape[2:])
    if not same_pixels or c_old > student_logits.shape[1]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not fit student logits "
            f"{tuple(student_logits.shape)}: same batch and size, at most as many channels"
        )
    return c_old


def _soft_cross_entropy(teacher_prob: Tensor, student_logits: Tensor) -> Tensor:
    """``- sum_c p_c * log softmax(s)_c`` per pixel, for ``p`` summing to 1 over c.

    ``teacher_prob`` is ``BxKxHxW`` (a probability over its K channels) and
    ``student_logits`` ``BxLxHxW`` with ``L >= K``, any float dtype; the
    softmax runs over all ``L`` student channels and the sum over the first
    ``K``, in float32.  Since ``log softmax(s)_c = s_c - logsumexp(s)`` and
    ``sum_c p_c = 1``, the value is ``logsumexp(s) - sum_{c<K} p_c s_c``.
    Returns ``BxHxW`` float32 (:class:`_SoftCrossEntropy`: one saved tensor).
    """
    return _SoftCrossEntropy.apply(student_logits, teacher_prob.detach().float())


class _SoftCrossEntropy(torch.autograd.Function):
    """The soft cross-entropy of :func:`_soft_cross_entropy` with a backward that keeps one tensor.

    Its gradient with respect to ``s`` is ``softmax(s) - p`` (``p`` padded
    with zeros to ``L`` channels) times the incoming per-pixel gradient.  The
    forward computes that difference once and keeps only it, in the student
    logits' dtype (bf16 under autocast, whose gradient is bf16 anyway), where
    autograd would keep the float32 logits and the teacher's probabilities:
    two full-resolution float32 tensors (BENCHMARKS.md: ILT's memory).
    """

    @staticmethod
    def forward(ctx: Any, student_logits: Tensor, teacher_prob: Tensor) -> Tensor:
        k = teacher_prob.shape[1]
        s = student_logits.float()
        lse = torch.logsumexp(s, dim=1)
        per_pixel = lse - (teacher_prob * s[:, :k]).sum(dim=1)
        direction = torch.softmax(s, dim=1)
        direction[:, :k] -= teacher_prob
        ctx.save_for_backward(direction.to(student_logits.dtype))
        return per_pixel

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (direction,) = ctx.saved_tensors
        return direction * grad.unsqueeze(1).to(direction.dtype), None


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (``BxHxW``) over ``mask``'s pixels; 0 (with grad) if none."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the pixels {tuple(values.shape)}")
    return (values * mask.to(dtype=values.dtype)).sum() / per_process_share(mask.sum())


def per_process_share(count: Tensor) -> Tensor:
    """The denominator that makes a per-process mean exact under DistributedDataParallel.

    A mean over a data-dependent set of pixels (the non-ignored ones, the
    old-class ones) divides by this process's count; DDP then averages the
    processes' gradients, which weights each process's pixels by 1 / its own
    count instead of 1 / the global count.  Dividing by ``global count / W``
    instead (one all-reduce of a scalar) makes the averaged gradient, and the
    logged loss averaged over processes, exactly those of one process on the
    whole batch.  Without a process group this is ``count`` itself; at least 1.
    """
    count = count.detach().to(torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
        return count.clamp_min(1.0 / dist.get_world_size())
    return count.clamp_min(1)


def kd_mib(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Output distillation of MiB's ILT baseline (the cssegmentation ILT recipe).

    ``L_KD = - mean_i [ (1/C_old) * sum_{c<C_old} softmax(alpha * z°_i)_c
    * log softmax(z_i[:C_old])_c ]``

    The student's log-softmax runs over its **old channels only** (the new
    channels take no part, so raising a new logit leaves the loss unchanged),
    and the channel sum is divided by ``C_old`` (MiB takes the mean over
    channels).  With ``student == teacher`` on the old channels (and alpha 1)
    the loss reaches its minimum, the teacher's entropy divided by ``C_old``.

    Args:
        student_logits: ``BxCxHxW``, ``C >= C_old``.
        teacher_logits: ``BxC_oldxHxW``; detached here.
        alpha: scale of the teacher's logits before its softmax (MiB's
            ``alpha``; 1 in the ILT recipe).
        mask: optional ``BxHxW`` bool; the mean then runs over the masked
            pixels only (MiB multiplies by the mask but still divides by all
            pixels; its ILT recipe uses no mask).  No masked pixel gives 0.

    Returns:
        A float32 scalar.
    """
    c_old = _check_teacher_logits(student_logits, teacher_logits)
    teacher = teacher_logits.detach().float()
    if alpha != 1.0:
        teacher = teacher * alpha
    teacher_prob = torch.softmax(teacher, dim=1)
    per_pixel = _soft_cross_entropy(teacher_prob, student_logits[:, :c_old]) / c_old
    return _masked_mean(per_pixel, mask)


def kd_ilt_output(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    mask: KDMask = "old_bgr",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """The ILT paper's output distillation ``L'_D``.

    ``L'_D = - mean_{i in P} sum_{c<C_old} softmax(z°_i / T)_c * log softmax(z_i / T)_c``

    a cross-entropy between the teacher's softmax over its ``C_old`` channels
    and the student's softmax over **all** its current channels, read on the
    old channels (so raising a new logit does change the loss).  ``P`` is the
    set of pixels selected by ``mask``, from the training target ``y``
    (channel ids; channel ``c < C_old`` is an old class, 0 is background):

    * ``"old_bgr"`` (the paper's default): ``y_i < C_old``, i.e. background or
      an old class; 255 excluded.  Under the MiB-style protocol old classes
      are already 0 in the target, so this is the background pixels.
    * ``"all"``: every pixel, **255 included**.  Not the paper's code: its
      ``applied_to='all'`` masks ``gt <= num_classes - 1`` and so drops the
      255 pixels (LTTM/IL-SemSegm ``codes/LD1/model_with_distillation.py``,
      ``distillation_loss``); a known difference, listed in docs/fidelity.md.
    * ``"old"``: ``1 <= y_i < C_old``, old classes without background (empty
      under the MiB-style protocol, which relabels old classes to 0).

    No ``T^2`` factor: the ILT paper does not use one (its experiments run at
    ``T = 1``, where the question is moot), so none is applied.  With no
    selected pixel the result is 0 (with a gradient).

    Args:
        student_logits: ``BxCxHxW``, ``C >= C_old``.
        teacher_logits: ``BxC_oldxHxW``; detached here.
        target: ``BxHxW`` int64 training target (channel ids or 255).
        temperature: ``T > 0`` dividing both models' logits.
        mask: ``"old_bgr"``, ``"all"`` or ``"old"`` (see above).
        ignore_index: the ignore label of ``target``.

    Returns:
        A float32 scalar.
    """
    c_old = _check_teacher_logits(student_logits, teacher_logits)
    if target.shape != (student_logits.shape[0], *student_logits.shape[2:]):
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match logits {tuple(student_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if mask == "old_bgr":
        pixels: Tensor | None = (target < c_old) & (target != ignore_index)
    elif mask == "old":
        pixels = (target >= 1) & (target < c_old) & (target != ignore_index)
    elif mask == "all":
        pixels = None
    else:
        raise ValueError(f"unknown KD mask {mask!r}; use 'old_bgr', 'all' or 'old'")

    teacher = teacher_logits.detach().float()
    student = student_logits
    if temperature != 1.0:
        teacher = teacher / temperature
        student = student.float() / temperature
    teacher_prob = torch.softmax(teacher, dim=1)
    per_pixel = _soft_cross_entropy(teacher_prob, student)
    return _masked_mean(per_pixel, pixels)


def feature_distillation(features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared error between student and teacher encoder features.

    ``L_FD = mean over all elements of (f - f°)^2``

    The same function is MiB's ``L_FD`` (weight 100 in the cssegmentation
    recipe) and the ILT paper's ``L''_D`` (weight 50); only the weight differs.

    Args:
        features: ``BxKxhxw`` student features (layer4 output).
        teacher_features: ``BxKxhxw`` teacher features; detached here.

    Returns:
        A float32 scalar.
    """
    if features.shape != teacher_features.shape:
        raise ValueError(
            f"feature shapes differ: student {tuple(features.shape)}, teacher {tuple(teacher_features.shape)}"
        )
    # (f - f°)² written out rather than F.mse_loss: autograd then keeps only the
    # difference, never the teacher's tensor, which may be an inference tensor.
    return (features.float() - teacher_features.detach().float()).pow(2).mean()
