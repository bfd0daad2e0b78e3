"""One incremental step, read as a recipe.

:func:`train_step` is the whole step: the method builds the student and the
teacher, the data and the optimiser are made, the epochs run (each ending in
``last.pth``), the final model is evaluated, saved as ``step{t}.pth`` and
recorded in the results.  Each line is one named call below it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ilseg.config import OptimConfig, RunConfig
from ilseg.engine import distributed
from ilseg.engine.checkpoint import load_checkpoint, save_checkpoint, training_state, check_compatible
from ilseg.engine.data import TrainingData, eval_loader, training_data
from ilseg.engine.loop import Precision, build_optimizer, evaluate, poly_schedule, train_one_epoch
from ilseg.engine.rundir import (
    checkpoint_identity,
    last_checkpoint,
    load_weights,
    model_from_config,
    step_checkpoint,
)
from ilseg.engine.runlog import RunLogger
from ilseg.errors import IlsegError
from ilseg.methods import Method, StepSetup
from ilseg.metrics import mean_over_steps, segmentation_scores
from ilseg.models import IncrementalSegmenter, convert_sync_batchnorm
from ilseg.report import write_results
from ilseg.tasks import Task


@dataclasses.dataclass
class RunContext:
    """What every step of a run shares."""

    cfg: RunConfig
    method: Method
    run_dir: Path
    task: Task  # the configured task: old / new classes are reported by its step 0
    train_task: Task  # the task the method trains (== task unless joint)
    dist: distributed.DistInfo
    precision: Precision
    log: RunLogger
    results: dict[str, Any]
    progress: bool = True


@dataclasses.dataclass
class Optimisation:
    """Optimiser, per-iteration poly schedule and (fp16 only) gradient scaler of one step."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None

    @classmethod
    def build(cls, cfg: RunConfig, model: nn.Module, *, lr: float, total_iters: int,
              precision: Precision) -> Optimisation:
        o = cfg.optim
        optimizer = build_optimizer(model.parameters(), kind=o.optimizer, lr=lr, momentum=o.momentum,
                                    nesterov=o.nesterov, weight_decay=o.weight_decay)
        scheduler = poly_schedule(optimizer, total_iters, o.poly_power)
        use_scaler = precision.amp == "fp16" and precision.device.type == "cuda"
        return cls(optimizer, scheduler, torch.amp.GradScaler(precision.device.type) if use_scaler else None)

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def step_recipe(optim: OptimConfig, step: int) -> tuple[int, float]:
    """``(epochs, learning rate)`` of ``step``: step 0's, or the ``*_next`` values."""
    return (optim.epochs, optim.lr) if step == 0 else (optim.epochs_next, optim.lr_next)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train_step(ctx: RunContext, step: int, resume: dict[str, Any] | None = None) -> None:
    """Train, evaluate, save and record ``step``; ``resume`` is a ``last.pth`` state of this step."""
    epochs, lr = step_recipe(ctx.cfg.optim, step)
    seed_everything(ctx.cfg.runtime.seed + 1000 * step + 999)  # the new classifier's init, resume or not
    setup = ctx.method.start_step(initial_model(ctx, step), ctx.train_task, step)
    if resume is not None:  # before DDP wraps it, so every rank starts from the same weights
        load_weights(setup.student, resume, last_checkpoint(ctx.run_dir))
    train_model = place_models(ctx, setup)
    data = training_data(ctx.cfg, ctx.train_task, step, setup.target_lut, dist=ctx.dist, progress=ctx.progress)
    opt = Optimisation.build(ctx.cfg, train_model, lr=lr, total_iters=epochs * len(data.loader),
                             precision=ctx.precision)
    start_epoch, seconds = 0, 0.0
    if resume is not None:
        opt.restore(resume)
        start_epoch, seconds = resume["epoch"] + 1, float(resume.get("train_seconds", 0.0))
    log_step_start(ctx, step, data, epochs, start_epoch, lr)
    for epoch in range(start_epoch, epochs):
        seconds += train_epoch(ctx, step, epoch, epochs, train_model, setup, data, opt)
        save_state(ctx, last_checkpoint(ctx.run_dir), setup.student, opt, step, epoch, epochs, seconds)
    scores = evaluate_step(ctx.cfg, ctx.task, ctx.train_task, setup.student, step, ctx.dist, ctx.precision)
    entry = step_entry(ctx.train_task, step, scores, len(data.dataset), epochs, seconds)
    save_state(ctx, step_checkpoint(ctx.run_dir, step), setup.student, opt, step, epochs - 1, epochs, seconds,
               entry=entry, confusion_matrix=scores["confusion_matrix"])
    record_step(ctx, entry)


def initial_model(ctx: RunContext, step: int) -> IncrementalSegmenter:
    """Step 0: a new model (ImageNet body if configured).  Later: step ``step - 1``'s final model."""
    if step == 0:
        return model_from_config(ctx.cfg, ctx.train_task.classifier_sizes(0), pretrained=True)
    prev = step_checkpoint(ctx.run_dir, step - 1)
    if not prev.is_file():
        raise IlsegError(
            f"step {step} needs the final checkpoint of step {step - 1} ({prev}); train step {step - 1} first "
            "(ilseg train --steps), or give --init-from RUN_DIR whose step-0 checkpoint to start from"
        )
    state = load_checkpoint(prev)
    check_compatible(state, checkpoint_identity(ctx.cfg, step - 1, ctx.method), prev)
    model = model_from_config(ctx.cfg, ctx.train_task.classifier_sizes(step - 1), pretrained=False)
    load_weights(model, state, prev)
    return model


def place_models(ctx: RunContext, setup: StepSetup) -> nn.Module:
    """Move student and teacher to the device and memory format; wrap the student for DDP.

    Returns the module to train (the student, or its DDP wrapper); the student
    itself keeps its state-dict keys (SyncBN conversion is in place).
    """
    device = ctx.precision.device
    for model in (setup.student, setup.teacher):
        if model is not None:
            model.to(device)
            if ctx.precision.channels_last:
                model.to(memory_format=torch.channels_last)
    if not ctx.dist.enabled:
        return setup.student
    if ctx.cfg.runtime.sync_bn:  # the teacher stays plain BN: it runs in eval mode
        convert_sync_batchnorm(setup.student, device_type=device.type)
    return nn.parallel.DistributedDataParallel(
        setup.student, device_ids=[ctx.dist.local_rank] if device.type == "cuda" else None,
        find_unused_parameters=False)


def log_step_start(ctx: RunContext, step: int, data: TrainingData, epochs: int, start_epoch: int, lr: float) -> None:
    task = ctx.train_task
    ctx.log.info(f"step {step}: classes {[task.class_names[c] for c in task.new_classes(step)]}, "
                 f"{len(data.dataset)} training images, {epochs} epochs x {len(data.loader)} iterations, lr {lr:g}")
    if start_epoch >= epochs:
        ctx.log.info(f"step {step}: all {epochs} epochs were trained ({last_checkpoint(ctx.run_dir).name}); "
                     "evaluating them")
    elif start_epoch > 0:
        ctx.log.info(f"resuming step {step} after epoch {start_epoch}/{epochs}")


def train_epoch(ctx: RunContext, step: int, epoch: int, epochs: int, train_model: nn.Module, setup: StepSetup,
                data: TrainingData, opt: Optimisation) -> float:
    """One epoch with a progress bar and its logged means; returns its wall time in seconds."""
    # Every epoch's randomness is a function of (seed, step, epoch): a resumed
    # run draws exactly the crops and order an uninterrupted run would.
    seed_everything(ctx.cfg.runtime.seed + 1000 * step + epoch)
    data.set_epoch(epoch)
    bar = ctx.log.progress(len(data.loader), f"step {step} epoch {epoch + 1}/{epochs}")

    def on_iteration(values: dict[str, float], lr: float) -> None:
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {"lr": f"{lr:.2e}"}, refresh=False)
        bar.update()

    start = time.perf_counter()
    means = train_one_epoch(model=train_model, teacher=setup.teacher, method=ctx.method, loader=data.loader,
                            optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler,
                            precision=ctx.precision, step=step, on_iteration=on_iteration)
    seconds = time.perf_counter() - start
    bar.close()
    lr = opt.optimizer.param_groups[0]["lr"]
    ctx.log.scalars({"step": step, "epoch": epoch + 1, "lr": lr, **{f"train/{k}": v for k, v in means.items()}})
    ctx.log.info(f"step {step} epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                 + f", lr {lr:.2e}")
    return seconds


def save_state(ctx: RunContext, path: Path, model: nn.Module, opt: Optimisation, step: int, epoch: int,
               epochs: int, seconds: float, *, entry: dict[str, Any] | None = None,
               confusion_matrix: list[list[int]] | None = None) -> None:
    """Write ``last.pth`` or ``step{t}.pth`` on rank 0; every rank waits for it."""
    if ctx.dist.is_main:
        save_checkpoint(path, training_state(
            model=model, optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler, step=step,
            epoch=epoch, epochs=epochs, train_seconds=round(seconds, 2),
            identity=checkpoint_identity(ctx.cfg, step, ctx.method), config=ctx.cfg.to_dict(),
            metrics=entry, confusion_matrix=confusion_matrix))
    distributed.barrier()


def evaluate_step(cfg: RunConfig, task: Task, train_task: Task, model: nn.Module, step: int,
                  dist: distributed.DistInfo, precision: Precision) -> dict[str, Any]:
    """Scores of ``model`` after ``step`` on the test split; old / new split by ``task``'s step 0."""
    seen = train_task.num_outputs(step)
    matrix = evaluate(model, eval_loader(cfg, train_task, step, dist), seen, precision).matrix.cpu()
    n_old = task.step_sizes[0]
    scores = segmentation_scores(matrix, class_names=train_task.channel_names(step),
                                 old=list(range(min(n_old, seen))), new=list(range(n_old, seen)))
    scores["confusion_matrix"] = matrix.tolist()
    return scores


def step_entry(task: Task, step: int, scores: dict[str, Any], num_images: int, epochs: int,
               seconds: float) -> dict[str, Any]:
    """The results row of a finished step."""
    return {
        "step": step, "classes_seen": task.num_outputs(step),
        "new_classes": [task.class_names[c] for c in task.new_classes(step)],
        **{k: v for k, v in scores.items() if k != "confusion_matrix"},
        "num_train_images": num_images, "epochs": epochs, "train_seconds": round(seconds, 2),
    }


def record_step(ctx: RunContext, entry: dict[str, Any]) -> None:
    """Put ``entry`` in the results (replacing an older row of that step), write them, print the table."""
    steps = sorted([s for s in ctx.results["steps"] if s["step"] != entry["step"]] + [entry],
                   key=lambda s: s["step"])
    ctx.results["steps"] = steps
    ctx.results["mean_miou_over_steps"] = mean_over_steps([s["miou_all"] for s in steps])
    if ctx.dist.is_main:
        write_results(ctx.run_dir, ctx.results)
    ctx.log.step_table(entry)
