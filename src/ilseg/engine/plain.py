"""The plain training iteration: the yardstick the fast path is measured and tested against.

:func:`plain_iteration` does one incremental-step iteration the straightforward
way: float32, contiguous memory, the teacher's forward under ``no_grad`` with
its BatchNorms as they are, every loss written from its textbook formula
(full log-softmax and softmax tensors), and a per-parameter SGD loop.  The
engine's iteration (:func:`ilseg.engine.loop.train_one_epoch` with the
method's losses, the folded teacher, fused SGD, autocast and channels-last
where configured) must compute the same losses and weights within float
tolerance (``tests/test_plain_vs_fast.py``), and is timed against this one by
``benchmarks/bench_train_step.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ilseg.methods import MethodConfig
from ilseg.tasks import IGNORE_INDEX


def plain_losses(cfg: MethodConfig, student: dict[str, Tensor], teacher: dict[str, Tensor] | None,
                 target: Tensor, step: int) -> dict[str, Tensor]:
    """The losses of ``cfg`` from their formulas (docs/methods.md), without any numerical shortcut."""
    logits = student["logits"]
    log_p = F.log_softmax(logits, dim=1)
    per_pixel = F.nll_loss(log_p, target.clamp_max(logits.shape[1] - 1), reduction="none")
    valid = target != IGNORE_INDEX
    per_pixel = per_pixel * valid
    count = valid.sum().clamp_min(1) if cfg.ce_reduction == "valid" else target.numel()
    losses = {"ce": per_pixel.sum() / count}
    total = losses["ce"]
    distils = cfg.uses_kd or cfg.fd_weight > 0
    if step > 0 and distils and teacher is not None:
        old = teacher["logits"].shape[1]
        if cfg.uses_kd and cfg.kd == "mib":
            teacher_p = F.softmax(cfg.kd_alpha * teacher["logits"], dim=1)
            student_log_p = F.log_softmax(logits[:, :old], dim=1)
            losses["kd"] = -(teacher_p * student_log_p).sum(dim=1).mean() / old
        elif cfg.uses_kd:
            t = cfg.kd_temperature
            teacher_p = F.softmax(teacher["logits"] / t, dim=1)
            student_log_p = F.log_softmax(logits / t, dim=1)[:, :old]
            per_pixel = -(teacher_p * student_log_p).sum(dim=1)
            pixels = {"old_bgr": (target < old) & valid, "old": (target >= 1) & (target < old) & valid,
                      "all": torch.ones_like(valid)}[cfg.kd_mask]
            losses["kd"] = (per_pixel * pixels).sum() / pixels.sum().clamp_min(1)
        if "kd" in losses:
            total = total + cfg.kd_weight * losses["kd"]
        if cfg.fd_weight > 0:
            losses["fd"] = F.mse_loss(student["features"], teacher["features"])
            total = total + cfg.fd_weight * losses["fd"]
    losses["loss"] = total
    return losses


def plain_sgd(params: list[nn.Parameter], *, lr: float, momentum: float, nesterov: bool,
              weight_decay: float) -> torch.optim.SGD:
    """SGD with torch's per-parameter loop (no for-each, no fused kernel)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                           foreach=False)


def plain_iteration(model: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, images: Tensor,
                    target: Tensor, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
    """One training iteration done plainly; returns the loss values."""
    model.train()
    teacher_out = None
    if teacher is not None:
        with torch.no_grad():
            teacher_out = teacher(images)
    losses = plain_losses(cfg, model(images), teacher_out, target, step)
    optimizer.zero_grad(set_to_none=False)
    losses["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}
