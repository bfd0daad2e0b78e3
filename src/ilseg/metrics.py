"""Confusion matrix over pixels, and the scores papers report from it.

docs/protocol.md#evaluation: the confusion matrix counts pixels whose target is not 255;
``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; the mIoU averages the classes present
in the ground truth, background included.  Papers report, after the last
step, the mIoU over the step-0 classes ("old"), over later classes ("new") and
over all; PLOP also the mean over steps of the all-class mIoU.

All scores are fractions in ``0..1`` (reports multiply by 100).

Example::

    >>> cm = ConfusionMatrix(3)
    >>> cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [2, 255]]))
    >>> s = segmentation_scores(cm.matrix, class_names=["bg", "a", "b"], old=[0, 1], new=[2])
    >>> s["miou_all"], s["num_pixels"]
    (1.0, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ilseg.tasks import IGNORE_INDEX


class ConfusionMatrix:
    """Pixel counts by (ground truth, prediction), accumulated over batches.

    ``matrix[g, p]`` is the number of pixels of ground-truth channel ``g``
    predicted as channel ``p`` (rows: ground truth, columns: prediction),
    an int64 ``CxC`` tensor kept on ``device`` (CPU by default).  Updates may
    come from tensors on any device: the counting runs there and only the
    ``CxC`` result moves.

    Args:
        num_classes: ``C``, the model's output channels.
        device: where :attr:`matrix` lives.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.matrix.sum())})"

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Count one batch.

        Args:
            pred: ``BxHxW`` or ``HxW`` integer predictions (an argmax, so in
                ``0..C-1``).
            target: the same shape; ``0..C-1`` or 255 (ignored).

        Raises:
            ValueError: shapes differ, or a prediction or a non-ignored
                target is outside ``0..C-1``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        c = self.num_classes
        valid = target != IGNORE_INDEX
        t = target[valid].long()
        p = pred.to(target.device)[valid].long()
        if t.numel() == 0:
            return
        out_of_range = (t < 0) | (t >= c) | (p < 0) | (p >= c)
        if bool(out_of_range.any()):
            raise ValueError(
                f"predictions and non-ignored targets must lie in 0..{c - 1}; got targets "
                f"{sorted(set(t[out_of_range].tolist()))[:10]}, predictions {sorted(set(p[out_of_range].tolist()))[:10]}"
            )
        counts = torch.bincount(t * c + p, minlength=c * c).reshape(c, c)
        self.matrix += counts.to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix; returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def reset(self) -> None:
        """Set every count back to 0."""
        self.matrix.zero_()


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(sum(present) / len(present)) if present else None


def segmentation_scores(
    matrix: Tensor | np.ndarray,
    *,
    class_names: Sequence[str],
    old: Sequence[int],
    new: Sequence[int],
) -> dict[str, Any]:
    """IoU per class and the means papers report, from a confusion matrix.

    Args:
        matrix: ``CxC`` counts, rows ground truth, columns prediction.
        class_names: the name of every channel (``C`` names).
        old: channel ids of the step-0 classes (background included).
        new: channel ids of the classes learned after step 0.

    Returns:
        A dict of fractions in ``0..1``:

        * ``iou_per_class``: ``{name: IoU or None}``;
        * ``miou_all``: mean IoU over all channels;
        * ``miou_old``: over ``old``; ``miou_old_fg``: over ``old`` without
          channel 0 (background); ``miou_new``: over ``new``;
        * ``pixel_accuracy``: correct pixels / counted pixels;
        * ``mean_class_accuracy``: mean over classes of ``TP_c / GT_c``;
        * ``num_pixels``: counted pixels (an int).

    Absent classes: a class with no ground-truth pixel (row sum 0) gets IoU
    ``None`` and is left out of every mean (mIoU over the classes present in
    the ground truth), even if it was predicted.  Its false positives are not
    lost: a pixel of true class ``k`` predicted as the absent class is a false
    negative of ``k`` and lowers ``IoU_k`` (and the accuracies).  A mean over
    no class, or any score of an empty matrix, is ``None``.
    """
    m = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    c = m.shape[0]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}x{c} confusion matrix")
    bad = [k for k in (*old, *new) if not 0 <= k < c]
    if bad:
        raise ValueError(f"channel ids {bad} are outside 0..{c - 1}")
    m = m.astype(np.float64)
    tp = np.diag(m)
    gt = m.sum(axis=1)
    predicted = m.sum(axis=0)
    present = gt > 0
    union = gt + predicted - tp

    iou: list[float | None] = [float(tp[k] / union[k]) if present[k] else None for k in range(c)]
    accuracy: list[float | None] = [float(tp[k] / gt[k]) if present[k] else None for k in range(c)]
    total = float(m.sum())
    return {
        "iou_per_class": dict(zip(class_names, iou)),
        "miou_all": _mean(iou),
        "miou_old": _mean([iou[k] for k in old]),
        "miou_old_fg": _mean([iou[k] for k in old if k != 0]),
        "miou_new": _mean([iou[k] for k in new]),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
        "mean_class_accuracy": _mean(accuracy),
        "num_pixels": int(total),
    }


def mean_over_steps(values: Sequence[float | None]) -> float | None:
    """Mean of per-step scores (PLOP's average all-class mIoU over steps).

    ``None`` entries (a step with no score) are left out; ``None`` if none is left.
    """
    return _mean(values)
