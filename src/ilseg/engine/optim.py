"""Optimisation of one step: the optimiser, the poly schedule, and how long the step trains.

:class:`Optimisation` bundles what a step's checkpoint saves and restores
(optimiser, schedule, fp16 gradient scaler); :class:`StepLength` turns
``optim.epochs*`` / ``optim.iterations*`` into epochs and iterations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ilseg.config import OptimConfig, RunConfig
from ilseg.errors import IlsegError
from ilseg.placement import Placement


def build_optimizer(params: Iterable[nn.Parameter], *, kind: str, lr: float, momentum: float,
                    nesterov: bool, weight_decay: float, fused: bool = True,
                    decay_kernels_only: bool = False) -> torch.optim.Optimizer:
    """SGD (the references' recipe) or AdamW (used by the CPU demo) over trainable params.

    ``fused``: torch's fused kernel (one pass over all parameters, on the CPU
    and CUDA) where the parameters allow it.  Fused SGD's updates equal the
    per-parameter loop's bit for bit (tested).  Fused AdamW (2.4x faster per
    update than the loop on the demo's model on a CPU) rounds differently,
    and Adam's first updates amplify rounding (about lr times the sign of a
    tiny gradient), so its weights drift from the loop's within a few
    updates while the loss follows the same course (tested); runs stay
    repeatable, as each kernel is deterministic.

    ``decay_kernels_only``: weight decay on the convolution kernels alone
    (4-d weights), none on biases and BatchNorm parameters (the paper setting's
    code decays the variables named ``weights``); two parameter groups.
    """
    params = [p for p in params if p.requires_grad]
    use_fused = fused and bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                               for p in params)
    groups: list[Any] | list[nn.Parameter] = params
    if decay_kernels_only:
        groups = [{"params": [p for p in params if p.dim() == 4]},
                  {"params": [p for p in params if p.dim() != 4], "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               fused=use_fused or None)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=use_fused or None)
    raise IlsegError(f"unknown optimizer {kind!r}; use 'sgd' or 'adamw'")


def poly_schedule(optimizer: torch.optim.Optimizer, total_iters: int, power: float,
                  lr_end: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """lr_i = (lr_0 - lr_end) * (1 - i / total_iters) ** power + lr_end, stepped once per iteration.

    From ``total_iters`` on the rate stays at ``lr_end``.  ``lr_end`` 0 is
    torch's ``PolynomialLR`` (the published recipe, docs/protocol.md#training-recipe);
    a positive floor (TensorFlow's ``polynomial_decay`` with an ``end_learning_rate``,
    docs/methods.md) is a ``LambdaLR`` of the closed form, relative to
    each group's initial rate.  Both keep their position in ``state_dict()``,
    so a resumed step continues the same sequence.
    """
    total = max(1, total_iters)
    if lr_end == 0.0:
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=power)
    floors = [lr_end / float(group["lr"]) for group in optimizer.param_groups]

    def factor(floor: float) -> Callable[[int], float]:
        return lambda i: (1.0 - floor) * (1.0 - min(i, total) / total) ** power + floor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(f) for f in floors])


@dataclasses.dataclass
class Optimisation:
    """Optimiser, per-iteration poly schedule and (fp16 only) gradient scaler of one step."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None

    @classmethod
    def build(cls, cfg: RunConfig, model: nn.Module, *, lr: float, total_iters: int,
              placement: Placement, lr_end: float = 0.0) -> Optimisation:
        """``total_iters``: the poly schedule's horizon (the step's length, or ``optim.decay_iterations*``)."""
        o = cfg.optim
        optimizer = build_optimizer(model.parameters(), kind=o.optimizer, lr=lr, momentum=o.momentum,
                                    nesterov=o.nesterov, weight_decay=o.weight_decay,
                                    decay_kernels_only=o.weight_decay_on == "kernels")
        if o.schedule == "constant":  # cssegmentation as it ran: its poly scheduler is never applied
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.ConstantLR(
                optimizer, factor=1.0, total_iters=0)
        else:
            scheduler = poly_schedule(optimizer, total_iters, o.poly_power, lr_end=lr_end)
        use_scaler = placement.amp == "fp16" and placement.device.type == "cuda"
        return cls(optimizer, scheduler, torch.amp.GradScaler(placement.device.type) if use_scaler else None)

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def step_recipe(optim: OptimConfig, step: int) -> tuple[int, float]:
    """``(epochs, learning rate)`` of ``step``: step 0's, or the ``*_next`` values."""
    return (optim.epochs, optim.lr) if step == 0 else (optim.epochs_next, optim.lr_next)


@dataclasses.dataclass(frozen=True)
class StepLength:
    """How long a step trains: ``epochs`` passes over the loader, ``total`` iterations in all.

    Epoch-based (``optim.iterations*`` 0): ``total = epochs * batches``.
    Iteration-based: as many whole epochs as fit, then the first batches of
    one more (``epochs = ceil(total / batches)``).  Every epoch keeps its own
    seeded order and crops, so an interrupted last epoch resumes exactly.
    """

    epochs: int
    total: int
    batches: int  # the loader's batches per epoch
    lr_end: float
    horizon: int = 0  # the iterations the poly schedule decays over (``total`` unless ``optim.decay_iterations*``)

    @classmethod
    def of(cls, optim: OptimConfig, step: int, batches: int) -> StepLength:
        iterations, lr_end = (optim.iterations, optim.lr_end) if step == 0 else (optim.iterations_next,
                                                                                 optim.lr_end_next)
        decay = optim.decay_iterations if step == 0 else optim.decay_iterations_next
        batches = max(1, batches)
        if iterations <= 0:
            epochs = step_recipe(optim, step)[0]
            total = epochs * batches
            return cls(epochs, total, batches, lr_end, decay or total)
        return cls(math.ceil(iterations / batches), iterations, batches, lr_end, decay or iterations)

    def iterations_in(self, epoch: int) -> int:
        """Iterations of epoch ``epoch``: a whole pass, or what is left of ``total`` in the last one."""
        return max(0, min(self.batches, self.total - epoch * self.batches))
