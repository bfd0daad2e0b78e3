"""A whole incremental run: every step trained (:func:`ilseg.engine.step.train_step`), evaluated and saved.

The run folder's layout is in :mod:`ilseg.runs.folder`.  Before anything
is created, everything that can be refused is (:func:`check_runtime`,
:func:`~ilseg.runs.folder.check_run_dir`,
:func:`~ilseg.engine.loaders.check_data`); then the folder is locked and the
steps run.  ``--resume`` continues from the last saved iteration in
``last.pth`` (going straight to evaluation when the step's epochs were all
trained); ``--init-from`` takes step 0 from another run trained with the same
step-0 settings.  docs/robustness.md lists every fault and what happens.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision

import ilseg
from ilseg.config import RunConfig
from ilseg.engine import distributed
from ilseg.engine.callbacks import Callbacks
from ilseg.engine.loaders import check_data, shut_down_workers
from ilseg.engine.runlog import RunLogger
from ilseg.engine.signals import StopRequests, signal_name
from ilseg.engine.step import (
    RunContext,
    evaluate_step,
    preview_step,
    record_step,
    train_step,
)
from ilseg.errors import IlsegError, Interrupted
from ilseg.fileio import temporary_path
from ilseg.methods import Method, build_method
from ilseg.metrics import mean_over_steps
from ilseg.placement import Placement, resolve_device
from ilseg.runs.checkpoint import check_compatible, load_checkpoint
from ilseg.runs.folder import (
    CONFIG_FILE,
    HISTORY_FILE,
    RunLock,
    check_run_dir,
    checkpoint_identity,
    create_run_dir,
    finished_steps,
    last_checkpoint,
    load_step_model,
    read_history,
    model_from_config,
    nothing_trained,
    read_run_config,
    rebuild_results,
    record_config_change,
    remove_temporaries,
    resume_changes,
    same_eval_protocol,
    saved_config,
    step_checkpoint,
    training_task,
)
from ilseg.runs.results import pct, read_results, write_results


def run_training(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    steps: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    init_from: str | Path | None = None,
    quiet: bool = False,
    callbacks: Callbacks | None = None,
) -> dict[str, Any]:
    """Train and evaluate the steps of ``cfg``'s task; return the results dict.

    Args:
        cfg: the run configuration (with ``resume``: the saved one, possibly
            with optimisation values changed from the step being resumed).
        run_dir: the run folder (created; an existing one must hold the same config).
        steps: ``"START:STOP"`` or one step; all steps by default.
        resume: continue after the last saved iteration (``last.pth``), skip finished steps.
        overwrite: start the run in ``run_dir`` over (its checkpoints and results are removed).
        init_from: a run folder (or step-0 checkpoint) whose step 0 this run reuses.
        quiet: no progress bars (logs only).
        callbacks: hooks at the run's step and epoch boundaries (:class:`~ilseg.engine.callbacks.Callbacks`).

    Everything that can be refused is refused before the run folder is
    created or changed: the step range, the batch size, the run folder's
    state, each step's training images and the test split's masks.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.runtime.device)
    todo = check_runtime(cfg, device, steps, resume=resume, overwrite=overwrite, init_from=init_from)
    dist = distributed.setup(cfg.runtime.backend, device.type, cfg.runtime.collective_timeout_s)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lock = RunLock(run_dir)
    finished = False
    try:
        distributed.on_main(lambda: check_run_dir(cfg, run_dir, todo, resume=resume, overwrite=overwrite))
        train_task = training_task(cfg)
        first = 1 if (init_from is not None and todo.start == 0) else todo.start
        distributed.on_main(lambda: check_data(cfg, train_task, range(first, todo.stop), progress=not quiet))
        if init_from is not None:  # its identity is checked now, not after the folder exists
            distributed.on_main(lambda: load_step_model(cfg, step0_source(Path(init_from)), 0) and None)
        elif todo.start == 0 and (overwrite or not step_checkpoint(run_dir, 0).is_file()):
            distributed.on_main(lambda: check_pretrained(cfg))
        restart, notes = distributed.on_main(lambda: open_run_dir(cfg, run_dir, lock, todo, overwrite=overwrite))
        with RunLogger(run_dir, enabled=dist.is_main, quiet=quiet, tensorboard=cfg.runtime.tensorboard) as log, \
                StopRequests() as stop:
            ctx = run_context(cfg, run_dir, dist, device, log, stop, progress=not quiet,
                              callbacks=callbacks or Callbacks())
            results = run_steps(ctx, todo, resume=resume, restart=restart, init_from=init_from, notes=notes)
            finished = True
            return results
    finally:
        shut_down_workers()  # the persistent training loader's, or those an error left (engine/loaders.py)
        lock.release()
        distributed.teardown(together=finished)


def open_run_dir(cfg: RunConfig, run_dir: Path, lock: RunLock, todo: range, *,
                 overwrite: bool) -> tuple[int | None, list[str]]:
    """Create and lock the run folder, clean what a killed process left, record a resumed run's new settings.

    Returns the step from which a changed config applies (that step restarts) or ``None``, and the lines
    to log about what was removed and kept (the log is opened after this).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    notes = []
    removed, lookalikes = remove_temporaries(run_dir)
    if removed:
        kept = f"; kept {', '.join(lookalikes)} (not written by ilseg)" if lookalikes else ""
        notes.append(f"removed {len(removed)} half-written file(s) a stopped process left: "
                     f"{', '.join(str(p.relative_to(run_dir)) for p in removed)}{kept}")
    saved = run_dir / CONFIG_FILE
    if overwrite or not saved.is_file() or nothing_trained(run_dir):  # the last: starts again with this config
        gone, others = create_run_dir(cfg, run_dir, overwrite=overwrite)
        if overwrite:
            notes.append(f"--overwrite removed the previous run's {len(gone)} file(s) (checkpoints, results, logs, "
                         "previews); " + (f"kept what ilseg did not write: {', '.join(others)}" if others else
                                          "nothing else was in the folder"))
        return None, notes
    old = saved_config(run_dir)
    changed = resume_changes(old, cfg)
    if not changed:
        return None, notes
    done = set(finished_steps(run_dir))
    num_steps = training_task(cfg).num_steps
    from_step = next((t for t in range(num_steps) if t not in done), num_steps)  # the run's, not --steps'
    if todo.start > from_step:
        raise IlsegError(f"--steps {todo.start}:{todo.stop} with new settings, but step {from_step} is not finished: "
                         f"the settings would apply from step {from_step}; resume from there (drop --steps)")
    return (from_step if record_config_change(run_dir, old, cfg, from_step, changed) else None), notes


def check_pretrained(cfg: RunConfig) -> None:
    """Build step 0's model with ``model.pretrained`` when it is a file, so a missing, unreadable or unfitting
    weights file is refused before the run folder exists (a corrected command then starts cleanly)."""
    if cfg.model.pretrained not in (None, "imagenet"):
        model_from_config(cfg, training_task(cfg).classifier_sizes(0), pretrained=True)


def run_steps(ctx: RunContext, todo: range, *, resume: bool, restart: int | None,
              init_from: str | Path | None, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Each step of ``todo`` in order: adopted, skipped (resume, already done) or trained.

    ``notes``: lines about the run folder (files removed, files kept) logged after the first line.
    """
    ctx.log.info(f"ilseg {ilseg.__version__} | {ctx.cfg.method.name} on {ctx.task.dataset} {ctx.train_task.name} "
                 f"({'overlapped' if ctx.cfg.data.overlap else 'disjoint'}) | steps {todo.start}..{todo.stop - 1} "
                 f"| device {ctx.placement.device}{f' x{ctx.dist.world_size}' if ctx.dist.enabled else ''} "
                 f"| run {ctx.run_dir}")
    for note in notes:
        ctx.log.info(note)
    if rebuild_results(ctx.run_dir, ctx.results):
        ctx.log.info("results rebuilt from the step checkpoints (the last run stopped before writing them)")
        ctx.results["mean_miou_over_steps"] = mean_over_steps([s["miou_all"] for s in ctx.results["steps"]])
        distributed.on_main(lambda: write_results(ctx.run_dir, ctx.results))
    if restart is not None and restart < ctx.train_task.num_steps:
        ctx.log.info(f"settings changed from step {restart} on ({ctx.run_dir / HISTORY_FILE}); it starts again")
    resume_state = read_resume_state(ctx, restart) if resume else None
    for step in todo:
        if ctx.stop.requested():
            raise Interrupted(f"stopped by {signal_name(ctx.stop.signal_number or 2)} before step {step}; continue "
                              f"with: ilseg train --resume {ctx.run_dir.resolve()}", ctx.stop.signal_number or 2)
        if resume and step_checkpoint(ctx.run_dir, step).is_file():
            ctx.log.info(f"step {step} already complete, skipped")
        elif step == 0 and init_from is not None:
            adopt_step0(ctx, Path(init_from))
        else:
            same_step = resume_state is not None and resume_state["step"] == step
            train_step(ctx, step, resume_state if same_step else None)
    ctx.log.info("results: mIoU all " + ", ".join(f"step {s['step']} {pct(s['miou_all'])}%"
                                                  for s in ctx.results["steps"]))
    return ctx.results


def run_context(cfg: RunConfig, run_dir: Path, dist: distributed.DistInfo, device: torch.device, log: RunLogger,
                stop: StopRequests, *, progress: bool = True, callbacks: Callbacks | None = None) -> RunContext:
    method = build_method(cfg.method)
    task = cfg.build_task()
    return RunContext(cfg=cfg, method=method, run_dir=run_dir, task=task, train_task=method.training_task(task),
                      dist=dist, placement=Placement.for_runtime(cfg.runtime, device), log=log,
                      results=read_results(run_dir) or new_results(cfg, method) | {"config_hash": cfg.hash()},
                      stop=stop, progress=progress, callbacks=callbacks or Callbacks())


def check_runtime(cfg: RunConfig, device: torch.device, steps: str | None, *, resume: bool,
                  overwrite: bool, init_from: str | Path | None = None) -> range:
    """Refuse what this device, process count or command line cannot run; return the steps to run."""
    if resume and overwrite:
        raise IlsegError("--resume continues a run and --overwrite starts it over: pass one of them")
    todo = parse_steps(steps, training_task(cfg).num_steps)
    if overwrite and todo.start > 0:
        raise IlsegError(f"--overwrite starts the run over from step 0, but --steps starts at {todo.start}; "
                         "drop --steps or make it start at 0")
    if init_from is not None and todo.start > 0:
        raise IlsegError("--init-from gives step 0, but --steps does not include step 0; make --steps start at 0")
    if cfg.runtime.amp_for(device.type) == "fp16" and device.type != "cuda":
        raise IlsegError("runtime.amp=fp16 needs CUDA; on the CPU use runtime.amp=bf16 or none")
    _, world = distributed.env_rank()
    if cfg.optim.batch_size % world:
        raise IlsegError(f"optim.batch_size {cfg.optim.batch_size} is the global batch and must divide by the "
                         f"{world} processes; change one of them (the learning rate is not rescaled)")
    return todo


def versions() -> dict[str, str]:
    return {"ilseg": ilseg.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def new_results(cfg: RunConfig, method: Method) -> dict[str, Any]:
    task = cfg.build_task()
    return {
        "method": cfg.method.name, "dataset": task.dataset, "task": task.name, "overlap": cfg.data.overlap,
        "order": list(task.order), "step_sizes": list(task.step_sizes), "labels": method.label_protocol,
        "config_hash": cfg.hash(), "versions": versions(), "steps": [], "mean_miou_over_steps": None,
    }


def read_resume_state(ctx: RunContext, restart: int | None) -> dict[str, Any] | None:
    """``last.pth`` of this run, checked against the config its step was trained with.

    ``None`` if there is none, or if it belongs to a step that starts again
    (``restart`` and later: trained with settings that changed).
    """
    path = last_checkpoint(ctx.run_dir)
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    step = state.get("step", -1)
    if restart is not None and isinstance(step, int) and step >= restart:
        return None
    cfg = read_run_config(ctx.run_dir, step=step) if isinstance(step, int) and step >= 0 else ctx.cfg
    try:
        check_compatible(state, checkpoint_identity(cfg, step), path)
    except IlsegError:
        if not read_history(ctx.run_dir):
            raise
        # Saved before the run's settings last changed (a stop between the change and the first new save):
        # that step starts again with the new settings.
        ctx.log.info(f"{path.name} was saved with settings this run has changed since; step {step} starts again")
        return None
    return state


def adopt_step0(ctx: RunContext, source: Path) -> None:
    """Copy another run's step-0 checkpoint into this run (papers share step 0 across methods).

    The source must have been trained with this run's step-0 settings (every
    difference is named).  Its recorded scores are reused when it was scored
    the same way as this run scores; otherwise step 0 is evaluated again.
    """
    src = step0_source(source)
    model, state = load_step_model(ctx.cfg, src, 0)
    dst = step_checkpoint(ctx.run_dir, 0)
    if ctx.dist.is_main and src.resolve() != dst.resolve():
        tmp = temporary_path(dst)
        try:
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
        finally:
            tmp.unlink(missing_ok=True)
    distributed.barrier()
    if "metrics" in state and same_eval_protocol(state.get("config", {}), ctx.cfg.to_dict()):
        entry = dict(state["metrics"])
    else:
        model.to(ctx.placement.device)
        scores = evaluate_step(ctx.cfg, ctx.task, ctx.train_task, model, 0, ctx.dist, ctx.placement)
        entry = {k: v for k, v in scores.items() if k != "confusion_matrix"}
        entry |= {k: state.get("metrics", {}).get(k) for k in ("new_classes", "num_train_images", "epochs",
                                                                "train_seconds")}
        entry |= {"step": 0, "classes_seen": ctx.train_task.num_outputs(0)}
    record_step(ctx, entry | {"adopted_from": str(src)})
    ctx.log.info(f"step 0 taken from {src}")
    preview_step(ctx, model.to(ctx.placement.device), 0)


def step0_source(source: Path) -> Path:
    """The step-0 checkpoint ``--init-from`` names: the file itself, or ``RUN_DIR/step0.pth``."""
    return source if source.is_file() else step_checkpoint(source, 0)


def parse_steps(spec: str | None, num_steps: int) -> range:
    """``"2:4"`` -> steps 2, 3; ``"1"`` -> step 1 only; ``None`` -> all steps."""
    if spec is None:
        return range(num_steps)
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            start, stop = int(a or 0), int(b) if b else num_steps
        else:
            start = int(spec)
            stop = start + 1
    except ValueError:
        raise IlsegError(f"--steps {spec!r}: expected START:STOP (e.g. 1:3) or one step number") from None
    if not 0 <= start < stop <= num_steps:
        raise IlsegError(f"--steps {spec!r}: this task has steps 0..{num_steps - 1}")
    return range(start, stop)


def evaluate_checkpoint(cfg: RunConfig, checkpoint: Path, *, step: int | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Re-evaluate one saved step checkpoint on the test split; return its scores."""
    model, state = load_step_model(cfg, checkpoint, step, for_inference=True)
    step = int(state["step"]) if step is None else step
    dev = resolve_device(device or cfg.runtime.device)
    model.to(dev)
    task = cfg.build_task()
    train_task = training_task(cfg)
    placement = Placement.for_runtime(cfg.runtime, dev)
    scores = evaluate_step(cfg, task, train_task, model, step, distributed.DistInfo(), placement)
    return scores | {"step": step, "classes_seen": train_task.num_outputs(step)}
