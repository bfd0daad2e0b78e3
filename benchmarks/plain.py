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
from ilseg.methods.legacy import to_legacy
from ilseg.tasks import IGNORE_INDEX


def has_plain_twin(cfg: MethodConfig) -> bool:
    """Whether :func:`plain_losses` computes ``cfg``'s losses (every built-in method but PLOP and the four
    of issue 23, whose terms have no flat form)."""
    flat = to_legacy(cfg)
    return not (flat is None or flat["pod_factor"] or flat["pod_logits_factor"] or flat["pseudo_labels"] != "none")


def plain_losses(cfg: MethodConfig, student: dict[str, Tensor], teacher: dict[str, Tensor] | None,
                 target: Tensor, step: int) -> dict[str, Tensor]:
    """The losses of ``cfg`` from their formulas (docs/methods.md), without any numerical shortcut.

    Written once for every built-in method but PLOP, over the method's settings in the flat form of
    :func:`ilseg.methods.legacy.to_legacy` (which terms are on, their weights).
    """
    if not has_plain_twin(cfg):
        raise ValueError(f"no plain twin of method {cfg.name!r}")
    flat = to_legacy(cfg)
    assert flat is not None
    uses_kd = flat["kd"] != "none" and flat["kd_weight"] > 0
    logits = student["logits"]
    log_p = F.log_softmax(logits, dim=1)
    valid = target != IGNORE_INDEX
    label = target.clamp_max(logits.shape[1] - 1)
    distils = uses_kd or flat["fd_weight"] > 0 or flat["unbiased_ce"]
    if step > 0 and flat["unbiased_ce"] and teacher is not None:
        # MiB: a background pixel may be any old class, so its probability is the old channels' sum.
        old = teacher["logits"].shape[1]
        p = log_p.exp()
        merged = torch.cat([p[:, :old].sum(dim=1, keepdim=True), p[:, old:]], dim=1).log()
        label = torch.where(label < old, 0, label - old + 1)
        per_pixel = F.nll_loss(merged, label, reduction="none")
    else:
        per_pixel = F.nll_loss(log_p, label, reduction="none")
    per_pixel = per_pixel * valid
    count = valid.sum().clamp_min(1) if flat["ce_reduction"] == "valid" else target.numel()
    losses = {"ce": per_pixel.sum() / count}
    total = losses["ce"]
    if step > 0 and distils and teacher is not None:
        old = teacher["logits"].shape[1]
        if uses_kd and flat["kd"] == "unbiased":
            # MiB: the teacher's background is the student's background or any new class.
            p = log_p.exp()
            student_p = torch.cat([p[:, :1] + p[:, old:].sum(dim=1, keepdim=True), p[:, 1:old]], dim=1)
            teacher_p = F.softmax(flat["kd_alpha"] * teacher["logits"], dim=1)
            losses["kd"] = -(teacher_p * student_p.log()).sum(dim=1).mean() / old
        elif uses_kd and flat["kd"] == "mib":  # ILT as MiB's code computes it (its name in the flat form)
            teacher_p = F.softmax(flat["kd_alpha"] * teacher["logits"], dim=1)
            student_log_p = F.log_softmax(logits[:, :old], dim=1)
            losses["kd"] = -(teacher_p * student_log_p).sum(dim=1).mean() / old
        elif uses_kd:
            t = flat["kd_temperature"]
            teacher_p = F.softmax(teacher["logits"] / t, dim=1)
            student_log_p = F.log_softmax(logits / t, dim=1)[:, :old]
            per_pixel = -(teacher_p * student_log_p).sum(dim=1)
            pixels = {"old_bgr": (target < old) & valid, "old": (target >= 1) & (target < old) & valid,
                      "all": torch.ones_like(valid)}[flat["kd_mask"]]
            losses["kd"] = (per_pixel * pixels).sum() / pixels.sum().clamp_min(1)
        if "kd" in losses:
            total = total + flat["kd_weight"] * losses["kd"]
        if flat["fd_weight"] > 0:
            losses["fd"] = F.mse_loss(student["features"], teacher["features"])
            total = total + flat["fd_weight"] * losses["fd"]
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
