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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ilseg.config import RunConfig
from ilseg.engine import distributed
from ilseg.engine.callbacks import Callbacks
from ilseg.engine.loaders import TrainingData, eval_dataset, eval_loader, step_image_counts, training_data
from ilseg.engine.loop import EpochProgress, NonFiniteLoss, evaluate, train_one_epoch
from ilseg.engine.optim import Optimisation, StepLength, step_recipe
from ilseg.engine.runlog import TENSORBOARD_EVERY, RunLogger
from ilseg.engine.signals import StopRequests, signal_name
from ilseg.errors import IlsegError, Interrupted, plural
from ilseg.methods import Method, StepSetup
from ilseg.methods.base import method_kind
from ilseg.metrics import mean_over_steps, segmentation_scores
from ilseg.models import IncrementalSegmenter, convert_sync_batchnorm, fold_batchnorm
from ilseg.placement import Placement
from ilseg.runs.checkpoint import (
    check_compatible,
    load_checkpoint,
    save_checkpoint,
    training_state,
)
from ilseg.runs.folder import (
    checkpoint_identity,
    last_checkpoint,
    load_weights,
    model_from_config,
    read_run_config,
    step_checkpoint,
)
from ilseg.runs.results import write_results
from ilseg.tasks import Task, train_lut
from ilseg.visual.preview import write_preview


@dataclasses.dataclass
class RunContext:
    """What every step of a run shares."""

    cfg: RunConfig
    method: Method
    run_dir: Path
    task: Task  # the configured task: old / new classes are reported by its step 0
    train_task: Task  # the task the method trains (== task unless joint)
    dist: distributed.DistInfo
    placement: Placement
    log: RunLogger
    results: dict[str, Any]
    stop: StopRequests = dataclasses.field(default_factory=StopRequests)
    progress: bool = True
    callbacks: Callbacks = dataclasses.field(default_factory=Callbacks)
    image_counts: dict[int, int] | None = None  # training images of each later step, for the run's time estimate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train_step(ctx: RunContext, step: int, resume: dict[str, Any] | None = None) -> None:
    """Train, evaluate, save and record ``step``; ``resume`` is a ``last.pth`` state of this step."""
    epochs, lr = step_recipe(ctx.cfg.optim, step)
    forget_divergence(ctx)
    seed_everything(ctx.cfg.runtime.seed + 1000 * step + 999)  # the new classifier's init, resume or not
    model, previous = initial_model(ctx, step)
    for state in (previous, resume):  # what the method kept across steps, as the last step (or save) left it
        if state is not None:
            ctx.method.load_state_dict(own_method_state(ctx, state))
    setup = ctx.method.start_step(model, ctx.train_task, step)
    if resume is not None:  # before DDP wraps it, so every rank starts from the same weights
        load_weights(setup.student, resume, last_checkpoint(ctx.run_dir))
    ctx.callbacks.on_step_start(step, setup)
    train_model = place_models(ctx, setup)
    teacher: nn.Module | None = setup.teacher
    if teacher is not None and ctx.cfg.runtime.cache_teacher and ctx.cfg.data.fixed_crops:
        teacher = ReplayedTeacher(teacher)  # the same outputs on the same crops, computed once per step
    data = training_data(ctx.cfg, ctx.train_task, step, setup.target_lut, dist=ctx.dist, progress=ctx.progress)
    prepare_previous(ctx, setup, step)
    prepare(ctx, setup, data, step)
    length = StepLength.of(ctx.cfg.optim, step, len(data.loader))
    epochs = length.epochs
    opt = Optimisation.build(ctx.cfg, train_model, lr=lr, total_iters=length.horizon, placement=ctx.placement,
                             lr_end=length.lr_end)
    at = Position.of(resume, opt)
    log_step_start(ctx, step, data, epochs, at, length)
    for epoch in range(at.epoch, epochs):
        iterations = length.iterations_in(epoch)
        ctx.callbacks.on_epoch_start(step, epoch)
        progress = train_epoch(ctx, step, epoch, epochs, train_model, setup, data, opt, at, iterations,
                               length=length, teacher=teacher)
        finished = epoch if progress.finished else epoch - 1
        partial = None if progress.finished else {"epoch": epoch, **progress.state()}
        if progress.finished:
            evaluate_during_step(ctx, setup.student, step, epoch, epochs, at)
        save_state(ctx, last_checkpoint(ctx.run_dir), setup.student, opt, step, finished, epochs, at.seconds,
                   partial=partial, evaluations=at.evaluations)
        if not progress.finished:
            raise interrupted(ctx, step, epoch, epochs, progress.iterations, iterations)
        ctx.callbacks.on_epoch_end(step, epoch, progress.means() | {"lr": opt.optimizer.param_groups[0]["lr"]})
    ctx.method.finish_step(setup.student, setup.teacher, step)
    scores = evaluate_step(ctx.cfg, ctx.task, ctx.train_task, setup.student, step, ctx.dist, ctx.placement)
    entry = step_entry(ctx.train_task, step, scores, len(data.dataset), epochs, at.seconds)
    if ctx.cfg.eval.every > 0:
        entry["evaluations"] = [*at.evaluations, evaluation_row(scores, epochs)]
    save_state(ctx, step_checkpoint(ctx.run_dir, step), setup.student, opt, step, epochs - 1, epochs, at.seconds,
               entry=entry, confusion_matrix=scores["confusion_matrix"])
    record_step(ctx, entry)
    preview_step(ctx, setup.student, step)
    ctx.callbacks.on_step_end(step, entry)


def own_method_state(ctx: RunContext, state: dict[str, Any]) -> dict[str, Any]:
    """The method state a checkpoint holds when this run's method wrote it; ``{}`` otherwise (a step 0
    adopted with ``--init-from`` from a run of another method, or a checkpoint from before method state)."""
    if state.get("method_kind") != method_kind(type(ctx.method)):
        return {}
    return dict(state.get("method_state", {}))


def prepare(ctx: RunContext, setup: StepSetup, data: TrainingData, step: int) -> None:
    """The method's pass of the teacher over the step's training set before training, when it asks for one
    (:meth:`~ilseg.methods.Method.prepares`): epoch 0's batches of this process, reductions over the
    processes; the method's line goes to the log."""
    if not ctx.method.prepares(step):
        return
    teacher = setup.teacher
    if teacher is None:
        raise ValueError(f"method {ctx.method.cfg.name!r} prepares step {step} from a teacher, but has none")
    start = time.perf_counter()
    line = ctx.method.prepare(teacher_batches(ctx, teacher, data), step, reduce=process_sum(ctx))
    ctx.log.info(f"step {step}, before training ({time.perf_counter() - start:.1f} s): {line}")


def prepare_previous(ctx: RunContext, setup: StepSetup, step: int) -> None:
    """The method's pass of the teacher over the previous step's training set (its images and the targets it
    trained on) before training, when it asks for one (:meth:`~ilseg.methods.Method.prepares_previous`)."""
    if step == 0 or not ctx.method.prepares_previous(step):
        return
    if setup.teacher is None:
        raise ValueError(f"method {ctx.method.cfg.name!r} prepares step {step} from a teacher, but has none")
    start = time.perf_counter()
    lut = train_lut(ctx.train_task, step - 1, keep_old=ctx.method.cfg.keep_old_labels)
    data = training_data(ctx.cfg, ctx.train_task, step - 1, lut, dist=ctx.dist, progress=ctx.progress)
    line = ctx.method.prepare_previous(teacher_batches(ctx, setup.teacher, data), step, reduce=process_sum(ctx))
    ctx.log.info(f"step {step}, before training, over step {step - 1}'s training set "
                 f"({time.perf_counter() - start:.1f} s): {line}")


def teacher_batches(ctx: RunContext, teacher: nn.Module, data: TrainingData) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """``(teacher outputs, targets)`` of epoch 0's batches of this process (logits in float32)."""
    data.set_epoch(0)
    for images, targets in data.loader:
        images = ctx.placement.images(images)
        with torch.inference_mode(), ctx.placement.autocast():
            out = teacher(images)
        yield {**out, "logits": out["logits"].float()}, targets.to(ctx.placement.device, non_blocking=True)


def process_sum(ctx: RunContext) -> Callable[[torch.Tensor], object] | None:
    """Sums a tensor over the processes in place (``all_reduce``); ``None`` in a single process."""
    return (lambda t: torch.distributed.all_reduce(t)) if ctx.dist.enabled else None


@dataclasses.dataclass
class Position:
    """Where a step starts: the first epoch to train, an epoch stopped part-way, the time already spent."""

    epoch: int = 0
    partial: EpochProgress | None = None
    seconds: float = 0.0
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # eval.every's, so far

    @classmethod
    def of(cls, resume: dict[str, Any] | None, opt: Optimisation) -> Position:
        """The start of the step, or where ``resume`` (a ``last.pth`` state) left it (optimiser restored)."""
        if resume is None:
            return cls()
        opt.restore(resume)
        partial = resume.get("partial")
        seconds = float(resume.get("train_seconds", 0.0))
        evaluations = list(resume.get("evaluations", []))
        if partial:
            return cls(epoch=int(partial["epoch"]), partial=EpochProgress.from_state(partial), seconds=seconds,
                       evaluations=evaluations)
        return cls(epoch=int(resume["epoch"]) + 1, seconds=seconds, evaluations=evaluations)


def initial_model(ctx: RunContext, step: int) -> tuple[IncrementalSegmenter, dict[str, Any] | None]:
    """Step 0: a new model (ImageNet body if configured).  Later: step ``step - 1``'s final model.

    Returns the model and, from step 1 on, the checkpoint it came from (the method's state is in it).
    """
    if step == 0:
        return model_from_config(ctx.cfg, ctx.train_task.classifier_sizes(0), pretrained=True), None
    prev = step_checkpoint(ctx.run_dir, step - 1)
    if not prev.is_file():
        raise IlsegError(
            f"step {step} needs the final checkpoint of step {step - 1} ({prev}); train step {step - 1} first "
            "(ilseg train --steps), or give --init-from RUN_DIR whose step-0 checkpoint to start from"
        )
    state = load_checkpoint(prev)
    trained_with = read_run_config(ctx.run_dir, step=step - 1)  # the settings in force then (config history)
    check_compatible(state, checkpoint_identity(trained_with, step - 1), prev)
    model = model_from_config(ctx.cfg, ctx.train_task.classifier_sizes(step - 1), pretrained=False)
    load_weights(model, state, prev)
    return model, state


def place_models(ctx: RunContext, setup: StepSetup) -> nn.Module:
    """Fold the teacher's BNs; move student and teacher to the device and memory format; wrap the student for DDP.

    Returns the module to train (the student, or its DDP wrapper); the student
    itself keeps its state-dict keys (SyncBN conversion is in place).
    """
    device = ctx.placement.device
    if setup.teacher is not None:
        fold_batchnorm(setup.teacher)  # forward-only in eval mode: one conv instead of conv + BN (same outputs)
    for model in (setup.student, setup.teacher):
        if model is not None:
            model.to(device)
            if ctx.placement.channels_last:
                model.to(memory_format=torch.channels_last)
    train_model: nn.Module = setup.student
    if ctx.dist.enabled:
        if ctx.cfg.runtime.sync_bn:  # the teacher stays plain BN: it runs in eval mode
            convert_sync_batchnorm(setup.student, device_type=device.type)
        train_model = nn.parallel.DistributedDataParallel(
            setup.student, device_ids=[ctx.dist.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=False)
    return CompiledOrEager(train_model, ctx.log.info) if ctx.cfg.runtime.compile else train_model


class ReplayedTeacher(nn.Module):
    """The teacher's outputs computed once per batch of a step and replayed in every later epoch.

    With ``data.fixed_crops`` every epoch of a step > 0 feeds the same crops
    in the same order, so the teacher's outputs for batch ``b`` never change:
    the first epoch computes and keeps them (on the training device), the
    others reuse them (``runtime.cache_teacher``; the reference code of the paper setting stores
    them once per step the same way).  The outputs are the very tensors the
    online teacher returns, so the losses are the same, at the memory cost of
    one step's teacher outputs (logits at crop size, features, taps).
    :meth:`start_epoch` tells it where an epoch (or its resumed rest) begins.
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.outputs: dict[int, Any] = {}
        self.position = 0

    def start_epoch(self, skip: int = 0) -> None:
        self.position = skip

    def forward(self, images: torch.Tensor) -> Any:
        out = self.outputs.get(self.position)
        if out is None:
            out = self.outputs[self.position] = self.teacher(images)
        self.position += 1
        return out


class CompiledOrEager(nn.Module):
    """``torch.compile(model)``, or ``model`` itself from the first call on which compiling fails.

    Compilation happens at the first forward (torch compiles lazily); if it
    raises (no C++ compiler, an unsupported operation, a backend bug), the
    failure is logged once and training goes on with the eager model, whose
    parameters are the same objects.  An error of the model itself fails
    again in eager mode and is raised.
    """

    def __init__(self, model: nn.Module, log: Callable[[str], None]) -> None:
        super().__init__()
        self.eager = model
        self.compiled: nn.Module | None = torch.compile(model)  # type: ignore[assignment]
        self._log = log

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 (any compiler failure: fall back, say so)
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                self._log(f"torch.compile failed ({type(exc).__name__}: {first}); training without it")
                self.compiled = None
        return self.eager(*args, **kwargs)


def log_step_start(ctx: RunContext, step: int, data: TrainingData, epochs: int, at: Position,
                   length: StepLength) -> None:
    task = ctx.train_task
    lr = step_recipe(ctx.cfg.optim, step)[1]
    if length.total == epochs * len(data.loader):
        span = f"{plural(epochs, 'epoch')} x {plural(len(data.loader), 'iteration')}"
    else:
        span = (f"{plural(length.total, 'iteration')} ({plural(epochs, 'pass', 'passes')} over "
                f"{plural(len(data.loader), 'batch', 'batches')}, the last partial)")
    floor = f" -> {length.lr_end:g}" if length.lr_end > 0 else ""
    ctx.log.info(f"step {step}: classes {[task.class_names[c] for c in task.new_classes(step)]}, "
                 f"{len(data.dataset)} training images, {span}, lr {lr:g}{floor}")
    if at.epoch >= epochs:
        ctx.log.info(f"step {step}: {'the epoch was' if epochs == 1 else f'all {epochs} epochs were'} trained "
                     f"({last_checkpoint(ctx.run_dir).name}); evaluating {'it' if epochs == 1 else 'them'}")
    elif at.partial is not None:
        ctx.log.info(f"resuming step {step} in epoch {at.epoch + 1}/{epochs} after iteration {at.partial.iterations}")
    elif at.epoch > 0:
        ctx.log.info(f"resuming step {step} after epoch {at.epoch}/{epochs}")


def train_epoch(ctx: RunContext, step: int, epoch: int, epochs: int, train_model: nn.Module, setup: StepSetup,
                data: TrainingData, opt: Optimisation, at: Position, iterations: int, *,
                length: StepLength | None = None, teacher: nn.Module | None = None) -> EpochProgress:
    """One epoch (or its rest) with a progress bar and its logged means; adds its wall time to ``at``.

    ``iterations``: how many the epoch has (the loader's length, or fewer in
    the last epoch of an iteration-based step).  ``length``: the step's, for
    the estimate of the time left that ends the epoch's line.  ``teacher``: what
    answers for ``setup.teacher`` (a :class:`ReplayedTeacher` of it).  TensorBoard
    (``runtime.tensorboard``) also gets the means of every
    :data:`~ilseg.engine.runlog.TENSORBOARD_EVERY` iterations.
    """
    # Every epoch's randomness is a function of (seed, step, epoch): a resumed
    # run draws exactly the crops and order an uninterrupted run would.
    seed_everything(ctx.cfg.runtime.seed + 1000 * step + epoch)
    partial = at.partial if epoch == at.epoch else None
    done = partial.iterations if partial is not None else 0
    data.set_epoch(epoch, skip=done)
    bar = ctx.log.progress(iterations - done, f"step {step} epoch {epoch + 1}/{epochs}")

    window = EpochProgress()  # the iterations since the last TensorBoard point (local means, no collective)
    at_iteration = [epoch * len(data.loader) + done]  # the step's iterations done so far

    def on_iteration(values: dict[str, float], lr: float) -> None:
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {"lr": f"{lr:.2e}"}, refresh=False)
        bar.update()
        at_iteration[0] += 1
        window.add(values)
        if window.iterations == TENSORBOARD_EVERY:
            means = {f"train/{k}": v / window.iterations for k, v in window.sums.items()}
            ctx.log.iteration_scalars(step, at_iteration[0], means | {"lr": lr})
            window.sums, window.iterations = {}, 0

    start = time.perf_counter()
    try:
        teacher = teacher if teacher is not None else setup.teacher
        if isinstance(teacher, ReplayedTeacher):
            teacher.start_epoch(done)
        progress = train_one_epoch(model=train_model, teacher=teacher, method=ctx.method, loader=data.loader,
                                   optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler,
                                   placement=ctx.placement, step=step, progress=partial,
                                   should_stop=ctx.stop.requested, on_iteration=on_iteration,
                                   limit=iterations if iterations < len(data.loader) else None)
    except NonFiniteLoss as exc:
        first_batch = step > 0 and epoch == 0 and exc.iterations_done == 0
        advice = start_over_advice(ctx, step) if first_batch else lower_lr_advice(ctx, step)
        record_divergence(ctx, step, epoch, str(exc), advice)
        raise IlsegError(f"{exc}. {advice}") from None
    finally:
        bar.close()
    at.seconds += time.perf_counter() - start
    if progress.finished:
        means = progress.means()
        lr = opt.optimizer.param_groups[0]["lr"]
        ctx.log.scalars({"step": step, "epoch": epoch + 1, "lr": lr, **{f"train/{k}": v for k, v in means.items()}})
        left = f"; {time_left(ctx, step, epoch, length, at)}" if length is not None else ""
        ctx.log.info(f"step {step} epoch {epoch + 1}/{epochs}: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + f", lr {lr:.2e}{left}")
    return progress


def time_left(ctx: RunContext, step: int, epoch: int, length: StepLength, at: Position) -> str:
    """``"about 12 min left in step 1, 1 h 5 min in the run (to step 5, at this step's pace)"``.

    The pace is this step's seconds per iteration so far; a later step's
    iterations follow from its image count (the per-step lists' cache) and
    its epochs.  Later steps run the teacher too, so from step 0 the run's
    estimate is low.
    """
    done = sum(length.iterations_in(e) for e in range(epoch + 1))
    pace = at.seconds / max(1, done)
    text = f"about {duration(pace * (length.total - done))} left in step {step}"
    last = ctx.train_task.num_steps - 1
    if step == last or not ctx.dist.is_main:
        return text
    if ctx.image_counts is None:
        try:
            ctx.image_counts = step_image_counts(ctx.cfg, ctx.train_task, range(step + 1, last + 1))
        except IlsegError:  # a later step's images cannot be listed now: training will say so there
            ctx.image_counts = {}
    if not all(t in ctx.image_counts for t in range(step + 1, last + 1)):
        return text
    later = sum(StepLength.of(ctx.cfg.optim, t, ctx.image_counts[t] // ctx.cfg.optim.batch_size).total
                for t in range(step + 1, last + 1))
    return (f"{text}, {duration(pace * (length.total - done + later))} in the run (to step {last}, at this "
            "step's pace)")


def duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"1 h"``, ``"3 h 5 min"``."""
    if seconds < 60:
        return f"{max(0, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h" + (f" {minutes % 60} min" if minutes % 60 else "")


def record_divergence(ctx: RunContext, step: int, epoch: int, error: str, advice: str) -> None:
    """Keep a non-finite loss's error and advice in ``results.json`` (``"diverged"``), so that ``ilseg report``
    repeats the advice for this run; cleared when the run trains again (:func:`forget_divergence`)."""
    ctx.results["diverged"] = {"step": step, "epoch": epoch + 1, "error": error, "advice": advice}
    if ctx.dist.is_main:
        write_results(ctx.run_dir, ctx.results)


def forget_divergence(ctx: RunContext) -> None:
    """A step trains again: the divergence :func:`record_divergence` kept is history."""
    if ctx.results.pop("diverged", None) is not None and ctx.dist.is_main:
        write_results(ctx.run_dir, ctx.results)


def lower_lr_advice(ctx: RunContext, step: int) -> str:
    """How to continue a run whose loss diverged: the same run, this step again, a lower learning rate."""
    key = "lr" if step == 0 else "lr_next"
    lr = getattr(ctx.cfg.optim, key)
    fp16 = " (or use runtime.amp=bf16 instead of fp16)" if ctx.placement.amp == "fp16" else ""
    return (f"Lower the learning rate{fp16} and train step {step} again, keeping the finished steps: "
            f"ilseg train --resume {ctx.run_dir.resolve()} --set optim.{key}={lr / 10:g}")


def start_over_advice(ctx: RunContext, step: int) -> str:
    """A later step whose very first batch gives a non-finite loss: the model the step before ended with is broken.

    Its weights are finite but its training diverged (a loss that grew by
    orders of magnitude without overflowing), so no learning rate of this step
    helps: the later steps are trained again, in a new run folder, from this
    run's step-0 model and with a lower learning rate.
    """
    lr = ctx.cfg.optim.lr_next
    fresh = ctx.run_dir.with_name(f"{ctx.run_dir.name}-lr{lr / 10:g}")
    return (f"It failed on step {step}'s first batch, before any update, so the model step {step - 1} ended with "
            f"is at fault (step {step - 1}'s training diverged: see its loss in {ctx.run_dir / 'train.log'}).  "
            f"Train the later steps again from this run's step 0 with a lower learning rate: ilseg train --config "
            f"{ctx.run_dir.resolve() / 'config.yaml'} --init-from {ctx.run_dir.resolve()} --out {fresh.resolve()} "
            f"--set optim.lr_next={lr / 10:g}")


def interrupted(ctx: RunContext, step: int, epoch: int, epochs: int, done: int, total: int) -> Interrupted:
    signum = ctx.stop.signal_number or 2
    return Interrupted(
        f"stopped by {signal_name(signum)} in step {step}, epoch {epoch + 1}/{epochs}, after iteration {done}/{total}; "
        f"the state is saved in {last_checkpoint(ctx.run_dir)}. Continue with: "
        f"ilseg train --resume {ctx.run_dir.resolve()}", signum)


def save_state(ctx: RunContext, path: Path, model: nn.Module, opt: Optimisation, step: int, epoch: int,
               epochs: int, seconds: float, *, entry: dict[str, Any] | None = None,
               confusion_matrix: list[list[int]] | None = None, partial: dict[str, Any] | None = None,
               evaluations: list[dict[str, Any]] | None = None) -> None:
    """Write ``last.pth`` or ``step{t}.pth`` on rank 0; every rank waits for it (and gets its error)."""
    def write() -> None:
        save_checkpoint(path, training_state(
            model=model, optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler, step=step,
            epoch=epoch, epochs=epochs, train_seconds=round(seconds, 2),
            identity=checkpoint_identity(ctx.cfg, step, ctx.method), config=ctx.cfg.to_dict(),
            metrics=entry, confusion_matrix=confusion_matrix, partial=partial,
            method_state=ctx.method.state_dict(), method_kind=method_kind(type(ctx.method)),
            evaluations=evaluations))

    distributed.on_main(write)


def evaluate_step(cfg: RunConfig, task: Task, train_task: Task, model: nn.Module, step: int,
                  dist: distributed.DistInfo, placement: Placement) -> dict[str, Any]:
    """Scores of ``model`` after ``step`` on the test split; old / new split by ``task``'s step 0."""
    seen = train_task.num_outputs(step)
    matrix = evaluate(model, eval_loader(cfg, train_task, step, dist), seen, placement).matrix.cpu()
    n_old = task.step_sizes[0]
    scores = segmentation_scores(matrix, class_names=train_task.channel_names(step),
                                 old=list(range(min(n_old, seen))), new=list(range(n_old, seen)))
    scores["confusion_matrix"] = matrix.tolist()
    return scores


def evaluate_during_step(ctx: RunContext, model: nn.Module, step: int, epoch: int, epochs: int,
                         at: Position) -> None:
    """``eval.every``: score the model after epoch ``epoch`` (0-based) when it is an ``every``-th epoch before
    the last (the last is scored anyway), and keep the scores in ``at`` (saved in ``last.pth``).

    Evaluation changes nothing that training uses: the next epoch sets train mode and re-seeds.
    """
    every = ctx.cfg.eval.every
    if every <= 0 or (epoch + 1) % every or epoch + 1 >= epochs:
        return
    scores = evaluate_step(ctx.cfg, ctx.task, ctx.train_task, model, step, ctx.dist, ctx.placement)
    at.evaluations.append(evaluation_row(scores, epoch + 1))
    ctx.log.info(f"step {step} after epoch {epoch + 1}/{epochs} (eval.every {every}): "
                 f"mIoU all {100 * scores['miou_all']:.1f}")


def evaluation_row(scores: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The scores of one evaluation during a step, with the epoch after which it was made."""
    return {"epoch": epoch, **{k: v for k, v in scores.items() if k != "confusion_matrix"}}


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


def preview_step(ctx: RunContext, model: nn.Module, step: int) -> None:
    """On the main rank, ``RUN_DIR/preview/step{step}.png`` when ``runtime.preview_images`` is on."""
    if ctx.dist.is_main and ctx.cfg.runtime.preview_images > 0:
        path = write_preview(ctx.cfg, ctx.train_task, model, step, ctx.run_dir, ctx.placement,
                             eval_dataset(ctx.cfg, ctx.train_task, step))
        if path is not None:
            ctx.log.info(f"step {step}: test images, ground truth and predictions drawn in {path}")
