"""A whole incremental run: every step trained, evaluated and saved.

Run folder layout (``RUN_DIR``)::

    config.yaml        the resolved config (what ``--resume`` reads back)
    step{t}.pth        the final model of step t (+ optimiser, scheduler, metrics)
    last.pth           resumable state at the end of the latest epoch
    results.json/.csv/.md   every number per step, rewritten after each step
    train.log          what was printed;  metrics.jsonl: every logged scalar

Per step t: build the model with the classifiers of steps 0..t-1, load step
t-1's final weights, keep a frozen copy as the teacher (when the method
distils), add step t's classifier, train for the step's epochs with the poly
schedule, evaluate on the test split with the labels seen so far, save.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import ilseg
from ilseg.config import RunConfig, dump_config, load_config
from ilseg.data.datasets import SeededItems, SegmentationDataset, build_dataset
from ilseg.data.splits import step_image_indices
from ilseg.data.transforms import test_transform, train_transform
from ilseg.engine import distributed as D
from ilseg.engine.checkpoint import (
    check_compatible,
    load_checkpoint,
    save_checkpoint,
)
from ilseg.engine.runlog import RunLogger
from ilseg.engine.loop import Precision, build_optimizer, evaluate, poly_schedule, train_one_epoch
from ilseg.errors import IlsegError
from ilseg.fileio import atomic_write_text
from ilseg.methods import build_method
from ilseg.metrics import mean_over_steps, segmentation_scores
from ilseg.models import IncrementalSegmenter, build_segmenter, convert_sync_batchnorm, copy_for_teacher
from ilseg.report import read_results, write_results
from ilseg.tasks import Task, test_lut, train_lut


# -- small helpers ---------------------------------------------------------------
def step_checkpoint(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step{step}.pth"


def last_finished_step(run_dir: Path) -> int:
    """The highest step with a final checkpoint in ``run_dir``."""
    done = [int(p.stem[4:]) for p in Path(run_dir).glob("step*.pth") if p.stem[4:].isdigit()]
    if not done:
        raise IlsegError(f"--run {run_dir} has no finished step (no step*.pth)")
    return max(done)


def resolve_device(kind: str) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise IlsegError("runtime.device is 'cuda' but no CUDA device is available; use runtime.device=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def training_task(cfg: RunConfig) -> Task:
    """The task actually trained: the configured one, or one step of all its classes (joint)."""
    task = cfg.build_task()
    if cfg.method.joint:
        return dataclasses.replace(task, name=f"{task.name}-joint", step_sizes=(len(task.order),))
    return task


def checkpoint_identity(cfg: RunConfig, task: Task, step: int) -> dict[str, Any]:
    """What a step checkpoint must match to be loaded into this run."""
    return {
        "dataset": task.dataset,
        "order": list(task.order),
        "step_sizes": list(task.step_sizes),
        "step": step,
        "backbone": cfg.model.backbone,
        "output_stride": cfg.model.output_stride,
        "head_channels": cfg.model.head_channels,
        "width": cfg.model.width,
    }


def versions() -> dict[str, str]:
    return {"ilseg": ilseg.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def model_from_config(cfg: RunConfig, classes_per_step: Sequence[int], *, pretrained: bool) -> IncrementalSegmenter:
    """The segmenter of ``cfg.model`` with these classifiers (body weights only at step 0)."""
    m = cfg.model
    return build_segmenter(backbone=m.backbone, output_stride=m.output_stride, head_channels=m.head_channels,
                           backbone_width=m.width, classes_per_step=classes_per_step,
                           pretrained=m.pretrained if pretrained else None)


def unwrap(model: nn.Module) -> IncrementalSegmenter:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


# -- data -----------------------------------------------------------------------
def test_dataset(cfg: RunConfig, task: Task, step: int) -> SegmentationDataset:
    """The test split with the labels of REFERENCE.md §3 after ``step``."""
    d = cfg.data
    lut = test_lut(task, step, unseen=d.unseen, ignore_background=(d.dataset == "ade" and d.ade_zero == "ignore"))
    return build_dataset(d.dataset, d.root, "val", transform=test_transform(d.test_size, crop=d.test_crop), lut=lut)


def train_dataset(cfg: RunConfig, task: Task, step: int, progress: bool) -> SegmentationDataset:
    d = cfg.data
    lut = train_lut(task, step, keep_old=cfg.method.keep_old_labels)
    ds = build_dataset(d.dataset, d.root, "train", transform=train_transform(d.crop_size, scale=d.scale), lut=lut)
    index_file = d.index_file.replace("{step}", str(step)) if d.index_file else None
    mode = "overlap" if d.overlap else "disjoint"

    def image_list() -> list[int]:
        indices = step_image_indices(ds, task, step, mode, cache_dir=d.cache_dir, workers=d.workers,
                                     index_file=index_file, progress=progress)
        if not indices:
            raise IlsegError(
                f"step {step} of {task.dataset} {task.name} ({mode}) has no training image: no image in "
                f"{d.root} contains its classes {[task.class_names[c] for c in task.new_classes(step)]}"
            )
        return indices

    # Rank 0 reads every mask (or the cache) once and sends the list to the other ranks.
    return ds.subset(D.on_main(image_list))


def make_loader(ds: Dataset, *, workers: int, batch_size: int = 1, sampler: Sampler | None = None,
                batch_sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader with ilseg's settings; the (batch) sampler decides order and sharding.

    Workers are started again for every pass (``persistent_workers=False``),
    so they see the epoch set on a :class:`SeededItems` dataset.
    """
    pin = torch.cuda.is_available()
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                          persistent_workers=False)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=False)


# -- the run ----------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    cfg: RunConfig
    run_dir: Path
    task: Task  # the full task (old/new reporting)
    train_task: Task  # what is trained (== task unless joint)
    dist: D.DistInfo
    precision: Precision
    log: RunLogger
    results: dict[str, Any]


def _new_results(cfg: RunConfig, task: Task) -> dict[str, Any]:
    return {
        "method": cfg.method.name, "dataset": task.dataset, "task": task.name, "overlap": cfg.data.overlap,
        "order": list(task.order), "step_sizes": list(task.step_sizes),
        "labels": "all classes" if cfg.method.joint else ("old kept" if cfg.method.keep_old_labels else "current step"),
        "config_hash": cfg.hash(),
        "versions": versions(), "steps": [], "mean_miou_over_steps": None,
    }


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Create RUN_DIR or check that the run there is this config's."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = load_config(saved)
        if old.hash() != cfg.hash():
            a, b = old.to_dict(), cfg.to_dict()
            diff = [f"{sec}.{k}: {a[sec][k]!r} -> {b[sec][k]!r}" for sec in b if isinstance(b[sec], dict)
                    for k in b[sec] if a.get(sec, {}).get(k) != b[sec][k]]
            raise IlsegError(
                f"{run_dir} holds a run with another config ({'; '.join(diff) or 'name'}); "
                "choose another --out, or use --resume to continue that run as it was configured"
            )
    elif resume:
        raise IlsegError(f"--resume {run_dir}: no config.yaml there, so it is not an ilseg run folder")
    elif run_dir.exists() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
        raise IlsegError(f"--out {run_dir} exists and is not an ilseg run folder; choose a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.is_file():
        atomic_write_text(saved, dump_config(cfg))


def _load_weights(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise IlsegError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None


def _build_step_model(rs: RunState, step: int, source_dir: Path) -> tuple[IncrementalSegmenter, IncrementalSegmenter | None]:
    """Student for ``step`` (previous weights + new classifier) and, if needed, the teacher."""
    cfg, task = rs.cfg, rs.train_task
    method = cfg.method
    if step == 0:
        model = model_from_config(cfg, task.classifier_sizes(0), pretrained=True)
        return model, None
    prev = step_checkpoint(source_dir, step - 1)
    if not prev.is_file():
        raise IlsegError(
            f"step {step} needs the final checkpoint of step {step - 1} ({prev}); train step {step - 1} first "
            "(ilseg train --steps), or give --init-from RUN_DIR whose step-0 checkpoint to start from"
        )
    state = load_checkpoint(prev)
    check_compatible(state, checkpoint_identity(cfg, task, step - 1), prev)
    model = model_from_config(cfg, task.classifier_sizes(step - 1), pretrained=False)
    _load_weights(model, state, prev)
    teacher = copy_for_teacher(model) if (method.kd_weight > 0 or method.fd_weight > 0) else None
    model.add_step(task.step_sizes[step], init=method.classifier_init)
    return model, teacher


def _evaluate_step(rs: RunState, model: nn.Module, step: int) -> dict[str, Any]:
    cfg, task = rs.cfg, rs.task
    eval_task = rs.train_task
    ds = test_dataset(cfg, eval_task, step)
    batch = cfg.eval.batch_size if (cfg.data.test_size is not None and cfg.data.test_crop) else 1
    sampler = D.ShardSampler(len(ds), rs.dist.rank, rs.dist.world_size)
    loader = make_loader(ds, batch_size=batch, sampler=sampler, workers=cfg.data.workers)
    cm = evaluate(unwrap(model), loader, eval_task.num_outputs(step), rs.precision)
    seen = eval_task.num_outputs(step)
    n_old = task.step_sizes[0]
    scores = segmentation_scores(cm.matrix.cpu(), class_names=eval_task.channel_names(step),
                                 old=list(range(min(n_old, seen))), new=list(range(n_old, seen)))
    scores["confusion_matrix"] = cm.matrix.cpu().tolist()
    return scores


def _train_step(rs: RunState, step: int, source_dir: Path, resume_state: dict | None, progress: bool) -> None:
    cfg, task, log = rs.cfg, rs.train_task, rs.log
    o = cfg.optim
    epochs = o.epochs if step == 0 else o.epochs_next
    lr = o.lr if step == 0 else o.lr_next
    seed_everything(cfg.runtime.seed + 1000 * step + 999)  # the new classifier's init, resume or not
    model, teacher = _build_step_model(rs, step, source_dir)
    if resume_state is not None:  # before DDP wraps it, so every rank starts from the same weights
        _load_weights(model, resume_state, rs.run_dir / "last.pth")
    method = build_method(cfg.method)
    dev = rs.precision.device
    model.to(dev)
    if teacher is not None:
        teacher.to(dev)
    if rs.precision.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    method.begin_step(model, step)
    train_model: nn.Module = model
    if rs.dist.enabled:
        if cfg.runtime.sync_bn:  # in place: ``model`` keeps its state-dict keys (the teacher stays plain BN)
            convert_sync_batchnorm(model, device_type=dev.type)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rs.dist.local_rank] if dev.type == "cuda" else None,
            find_unused_parameters=False)

    ds = train_dataset(cfg, task, step, progress)
    if len(ds) < o.batch_size:
        raise IlsegError(f"step {step} has only {len(ds)} training images, fewer than optim.batch_size={o.batch_size}")
    # Every rank takes its slice of the same global batches, and each image's augmentation is a function
    # of (seed, step, epoch, image): the run does not depend on the number of processes or workers.
    data_seed = cfg.runtime.seed + 1000 * step
    items = SeededItems(ds, data_seed)
    batches = D.GlobalBatchSampler(len(ds), o.batch_size, rank=rs.dist.rank, world_size=rs.dist.world_size,
                                   seed=data_seed)
    loader = make_loader(items, batch_sampler=batches, workers=cfg.data.workers)
    optimizer = build_optimizer(train_model.parameters(), kind=o.optimizer, lr=lr, momentum=o.momentum,
                                nesterov=o.nesterov, weight_decay=o.weight_decay)
    scheduler = poly_schedule(optimizer, epochs * len(loader), o.poly_power)
    scaler = torch.amp.GradScaler(dev.type) if (cfg.runtime.amp == "fp16" and dev.type == "cuda") else None

    start_epoch = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = resume_state["epoch"] + 1
        log.info(f"resuming step {step} after epoch {start_epoch}/{epochs}")

    log.info(f"step {step}: classes {[task.class_names[c] for c in task.new_classes(step)]}, "
             f"{len(ds)} training images, {epochs} epochs x {len(loader)} iterations, lr {lr:g}")
    identity = checkpoint_identity(cfg, task, step)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        # Every epoch's randomness is a function of (seed, step, epoch): a resumed
        # run draws exactly the crops and order an uninterrupted run would.
        seed_everything(cfg.runtime.seed + 1000 * step + epoch)
        batches.set_epoch(epoch)
        items.set_epoch(epoch)
        bar = log.progress(len(loader), f"step {step} epoch {epoch + 1}/{epochs}")

        def on_iteration(values: dict[str, float], cur_lr: float) -> None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {"lr": f"{cur_lr:.2e}"}, refresh=False)
            bar.update()

        means = train_one_epoch(model=train_model, teacher=teacher, method=method, loader=loader,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler, precision=rs.precision,
                                step=step, on_iteration=on_iteration)
        bar.close()
        lr_now = optimizer.param_groups[0]["lr"]
        log.scalars({"step": step, "epoch": epoch + 1, "lr": lr_now, **{f"train/{k}": v for k, v in means.items()}})
        log.info(f"step {step} epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                 + f", lr {lr_now:.2e}")
        if rs.dist.is_main:
            save_checkpoint(rs.run_dir / "last.pth", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "step": step, "epoch": epoch, "epochs": epochs, "identity": identity,
                "config": cfg.to_dict(),
            })
        D.barrier()
    train_seconds = time.perf_counter() - t0

    scores = _evaluate_step(rs, model, step)
    entry = {
        "step": step, "classes_seen": task.num_outputs(step),
        "new_classes": [task.class_names[c] for c in task.new_classes(step)],
        **{k: v for k, v in scores.items() if k != "confusion_matrix"},
        "num_train_images": len(ds), "epochs": epochs, "train_seconds": round(train_seconds, 2),
    }
    if rs.dist.is_main:
        save_checkpoint(step_checkpoint(rs.run_dir, step), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "epoch": epochs - 1, "epochs": epochs, "identity": identity, "config": cfg.to_dict(),
            "metrics": entry, "confusion_matrix": scores["confusion_matrix"],
        })
    D.barrier()  # the next step's model is read from this file on every rank
    _record_step(rs, entry)


def _record_step(rs: RunState, entry: dict[str, Any]) -> None:
    steps = [s for s in rs.results["steps"] if s["step"] != entry["step"]] + [entry]
    steps.sort(key=lambda s: s["step"])
    rs.results["steps"] = steps
    rs.results["mean_miou_over_steps"] = mean_over_steps([s["miou_all"] for s in steps])
    if rs.dist.is_main:
        write_results(rs.run_dir, rs.results)
    rs.log.step_table(entry)


def _adopt_step0(rs: RunState, source: Path) -> None:
    """Copy another run's step-0 checkpoint into this run (papers share step 0 across methods)."""
    src = source if source.is_file() else step_checkpoint(source, 0)
    state = load_checkpoint(src)
    check_compatible(state, checkpoint_identity(rs.cfg, rs.train_task, 0), src)
    dst = step_checkpoint(rs.run_dir, 0)
    if rs.dist.is_main and src.resolve() != dst.resolve():
        tmp = dst.with_name(f".{dst.name}.copy")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    D.barrier()
    if "metrics" in state:
        _record_step(rs, dict(state["metrics"], adopted_from=str(src)))
    rs.log.info(f"step 0 taken from {src}")


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


def run_training(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    steps: str | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train and evaluate the steps of ``cfg``'s task; return the results dict.

    Args:
        cfg: the run configuration.
        run_dir: the run folder (created; an existing one must hold the same config).
        steps: ``"START:STOP"`` or one step; all steps by default.
        resume: continue after the last completed epoch recorded in ``last.pth``.
        init_from: a run folder (or step-0 checkpoint) whose step 0 this run reuses.
        quiet: no progress bars (logs only).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.runtime.device)
    if cfg.runtime.amp == "fp16" and device.type != "cuda":
        raise IlsegError("runtime.amp=fp16 needs CUDA; on the CPU use runtime.amp=bf16 or none")
    _, world = D.env_rank()
    if cfg.optim.batch_size % world:
        raise IlsegError(f"optim.batch_size {cfg.optim.batch_size} is the global batch and must divide by the "
                         f"{world} processes; change one of them (the learning rate is not rescaled)")
    dist = D.setup(cfg.runtime.backend, device.type, cfg.runtime.collective_timeout_s)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        D.on_main(lambda: _prepare_run_dir(cfg, run_dir, resume))
        log = RunLogger(run_dir, enabled=dist.is_main, quiet=quiet, tensorboard=cfg.runtime.tensorboard)
        try:
            return _run(cfg, run_dir, dist, device, log, steps=steps, resume=resume, init_from=init_from,
                        progress=not quiet)
        finally:
            log.close()
    finally:
        D.teardown()


def _run(cfg: RunConfig, run_dir: Path, dist: D.DistInfo, device: torch.device, log: RunLogger, *,
         steps: str | None, resume: bool, init_from: str | Path | None, progress: bool) -> dict[str, Any]:
    task = cfg.build_task()
    train_task = training_task(cfg)
    results = read_results(run_dir) or _new_results(cfg, task)
    rs = RunState(cfg=cfg, run_dir=run_dir, task=task, train_task=train_task, dist=dist,
                  precision=Precision(device, cfg.runtime.amp, cfg.runtime.channels_last), log=log, results=results)
    todo = parse_steps(steps, train_task.num_steps)
    log.info(f"ilseg {ilseg.__version__} | {cfg.method.name} on {task.dataset} {train_task.name} "
             f"({'overlapped' if cfg.data.overlap else 'disjoint'}) | steps {todo.start}..{todo.stop - 1} | "
             f"device {device}{f' x{dist.world_size}' if dist.enabled else ''} | run {run_dir}")

    resume_state = None
    if resume and (run_dir / "last.pth").is_file():
        resume_state = load_checkpoint(run_dir / "last.pth")
        check_compatible(resume_state, checkpoint_identity(cfg, train_task, resume_state["step"]),
                         run_dir / "last.pth")
    for step in todo:
        if step == 0 and init_from is not None:
            _adopt_step0(rs, Path(init_from))
            continue
        if resume and step_checkpoint(run_dir, step).is_file():
            log.info(f"step {step} already complete, skipped")
            continue
        state = resume_state if (resume_state is not None and resume_state["step"] == step
                                 and resume_state["epoch"] + 1 < resume_state["epochs"]) else None
        _train_step(rs, step, run_dir, state, progress)
    log.info("results: " + json.dumps({s["step"]: s["miou_all"] for s in rs.results["steps"]}))
    return rs.results


def evaluate_checkpoint(cfg: RunConfig, checkpoint: Path, *, step: int | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Re-evaluate one saved step checkpoint on the test split; return its scores."""
    train_task = training_task(cfg)
    state = load_checkpoint(checkpoint)
    step = state.get("step") if step is None else step
    if step is None:
        raise IlsegError(f"checkpoint {checkpoint} does not record its step; pass --step")
    check_compatible(state, checkpoint_identity(cfg, train_task, step), checkpoint)
    dev = resolve_device(device or cfg.runtime.device)
    model = model_from_config(cfg, train_task.classifier_sizes(step), pretrained=False)
    _load_weights(model, state, checkpoint)
    model.to(dev)
    log = RunLogger(None, enabled=True, quiet=True)
    rs = RunState(cfg=cfg, run_dir=checkpoint.parent, task=cfg.build_task(), train_task=train_task,
                  dist=D.DistInfo(), precision=Precision(dev, cfg.runtime.amp, cfg.runtime.channels_last),
                  log=log, results={})
    scores = _evaluate_step(rs, model, step)
    scores["step"] = step
    scores["classes_seen"] = train_task.num_outputs(step)
    return scores
