"""One training epoch and one evaluation pass, readable top to bottom."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ilseg.engine.distributed import all_reduce_sum, average_over_ranks
from ilseg.errors import IlsegError
from ilseg.metrics import ConfusionMatrix
from ilseg.placement import Placement


@dataclass
class EpochProgress:
    """Running sums of the loss terms over the iterations of one epoch done so far.

    Saved inside ``last.pth`` when a run stops mid-epoch, so that a resumed
    epoch reports the same means as an uninterrupted one.
    """

    sums: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    finished: bool = False

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.iterations += 1

    def means(self) -> dict[str, float]:
        """The mean of each term over this epoch's iterations and over ranks."""
        return average_over_ranks({k: v / max(1, self.iterations) for k, v in self.sums.items()})

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "iterations": self.iterations}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochProgress:
        return cls() if not state else cls(sums=dict(state["sums"]), iterations=int(state["iterations"]))


def train_one_epoch(
    *,
    model: nn.Module,
    teacher: nn.Module | None,
    method: Callable[..., dict[str, torch.Tensor]],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    placement: Placement,
    step: int,
    progress: EpochProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_iteration: Callable[[dict[str, float], float], None] | None = None,
    limit: int | None = None,
) -> EpochProgress:
    """Train ``model`` over ``loader`` (the rest of an epoch); return the running loss sums.

    ``method(student_out, teacher_out, target, step)`` gives the named losses;
    the teacher runs under ``torch.inference_mode`` so none of its activations
    are kept.  A non-finite loss stops training with a clear error before the
    optimiser step, so the weights of the last checkpoint stay valid.  After
    each iteration ``should_stop()`` may end the pass early (a stop request):
    the result then has ``finished=False``.  ``progress`` continues the sums
    of an epoch that was stopped part-way.  ``limit``: the epoch ends
    (``finished=True``) once it has run that many iterations in all, resumed
    ones included (the last, partial epoch of an iteration-based step).
    """
    model.train()
    progress = progress if progress is not None else EpochProgress()
    for images, targets in loader:
        images = placement.images(images)
        targets = targets.to(placement.device, non_blocking=True)
        teacher_out = None
        with placement.autocast():
            if teacher is not None:
                # No activations kept.  The losses never save the teacher's
                # (inference) tensors for backward, so no copy of them is needed.
                with torch.inference_mode():
                    teacher_out = teacher(images)
            student_out = model(images)
            losses = method(student_out, teacher_out, targets, step)
        loss = losses["loss"]
        # One device-to-host copy for all the terms (one sync per iteration, not one per term).
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        if not math.isfinite(values["loss"]):
            parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise NonFiniteLoss(f"the training loss became non-finite at step {step} ({parts}); nothing of this "
                                "epoch after the last checkpoint was saved", iterations_done=progress.iterations)
        # What backward does not need goes before it: the teacher's outputs and the student's full-resolution
        # logits (the losses keep what their gradients need), several B x C x H x W tensors at 512 px.
        del teacher_out, student_out, losses
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        progress.add(values)
        if on_iteration is not None:
            on_iteration(values, optimizer.param_groups[0]["lr"])
        if limit is not None and progress.iterations >= limit:
            break
        if should_stop is not None and should_stop():
            return progress
    progress.finished = True
    return progress


class NonFiniteLoss(IlsegError):
    """The loss became NaN or infinite; the engine adds how to continue with a lower learning rate.

    ``iterations_done``: the epoch's iterations before the one that failed.
    """

    def __init__(self, message: str, iterations_done: int = 0) -> None:
        super().__init__(message)
        self.iterations_done = iterations_done


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, placement: Placement,
             *, on_batch: Callable[[], None] | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``loader`` (summed over ranks when distributed).

    Targets hold channel ids or 255; 255 pixels are left out.  Logits come back
    at the input's resolution, so predictions are compared pixel for pixel.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, device=placement.device)
    for images, targets in loader:
        images = placement.images(images)
        targets = targets.to(placement.device, non_blocking=True)
        with placement.autocast():
            logits = model(images)["logits"]
        cm.update(logits.argmax(1), targets)
        if on_batch is not None:
            on_batch()
    all_reduce_sum(cm.matrix)
    return cm
