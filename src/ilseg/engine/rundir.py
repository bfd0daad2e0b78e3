"""The run folder: its layout, its config, and which checkpoint belongs to which run.

Layout of ``RUN_DIR``::

    config.yaml        the resolved config (what ``--resume``, eval and predict read back)
    step{t}.pth        the final model of step t (+ optimiser, scheduler, metrics)
    last.pth           resumable state at the end of the latest epoch
    results.json/.csv/.md   every number per step, rewritten after each step
    train.log          what was printed;  metrics.jsonl: every logged scalar

A checkpoint carries an *identity*: every setting that shaped its weights
(:func:`checkpoint_identity`).  Loading one into a run whose identity differs
is refused with every difference named, so a step-0 model of another protocol
cannot start a run by accident.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ilseg.config import RunConfig, dump_config, load_config
from ilseg.engine.checkpoint import check_compatible, load_checkpoint
from ilseg.errors import IlsegError
from ilseg.fileio import atomic_write_text
from ilseg.methods import Method, build_method
from ilseg.models import IncrementalSegmenter, build_segmenter
from ilseg.tasks import Task

CONFIG_FILE = "config.yaml"
LAST_CHECKPOINT = "last.pth"

# Settings that change which images a step trains on or how (data.root, workers and caches do not).
_DATA_TRAINING = ("overlap", "index_file", "crop_size", "scale")
# Settings that change only how a finished model is scored.
EVAL_PROTOCOL = ("unseen", "ade_zero", "test_size", "test_crop")
_OPTIM_STEP0 = ("optimizer", "lr", "epochs", "batch_size", "momentum", "nesterov", "weight_decay", "poly_power")
_RUNTIME_TRAINING = ("seed", "amp")


def step_checkpoint(run_dir: Path, step: int) -> Path:
    """``RUN_DIR/step{step}.pth``: the final model of ``step``."""
    return Path(run_dir) / f"step{step}.pth"


def last_checkpoint(run_dir: Path) -> Path:
    """``RUN_DIR/last.pth``: the state after the latest finished epoch."""
    return Path(run_dir) / LAST_CHECKPOINT


def finished_steps(run_dir: Path) -> list[int]:
    """The steps with a final checkpoint in ``run_dir``, in order."""
    return sorted(int(p.stem[4:]) for p in Path(run_dir).glob("step*.pth") if p.stem[4:].isdigit())


def last_finished_step(run_dir: Path) -> int:
    """The highest step with a final checkpoint in ``run_dir``."""
    done = finished_steps(run_dir)
    if not done:
        raise IlsegError(f"--run {run_dir} has no finished step (no step*.pth)")
    return done[-1]


def read_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The config saved in ``run_dir`` (with ``--set`` overrides), or a clear error."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise IlsegError(f"--run {run_dir}: no {CONFIG_FILE} there, so it is not an ilseg run folder")
    return load_config(path, overrides)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Create ``run_dir`` with its ``config.yaml``, or check that the run there is ``cfg``'s."""
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        old = load_config(saved)
        if old.hash() != cfg.hash():
            diff = _differences(_flatten(old.to_dict()), _flatten(cfg.to_dict()))
            raise IlsegError(
                f"{run_dir} holds a run with another config ({'; '.join(diff) or 'name'}); "
                "choose another --out, or use --resume to continue that run as it was configured"
            )
    elif resume:
        raise IlsegError(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not an ilseg run folder")
    elif run_dir.exists() and any(p for p in run_dir.iterdir() if not p.name.startswith(".")):
        raise IlsegError(f"--out {run_dir} exists and is not an ilseg run folder; choose a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.is_file():
        atomic_write_text(saved, dump_config(cfg))


def checkpoint_identity(cfg: RunConfig, step: int, method: Method | None = None) -> dict[str, Any]:
    """Every setting that shaped the weights of a step-``step`` model, as flat ``section.key`` entries.

    Step 0 depends on the dataset, the task's order and step sizes, the
    training data settings, the model, the step-0 optimiser settings, the
    seed, the precision and the method's step-0 fields (for the methods here,
    the CE reduction and joint training).  Later steps depend on all method
    and optimiser settings too.  Where the data comes from (``data.root``),
    loader workers, caches and evaluation settings are left out.
    """
    method = method or build_method(cfg.method)
    task = method.training_task(cfg.build_task())
    identity: dict[str, Any] = {
        "dataset": task.dataset, "order": list(task.order), "step_sizes": list(task.step_sizes), "step": step,
    }
    plain = cfg.to_dict()
    identity |= {f"data.{k}": plain["data"][k] for k in _DATA_TRAINING}
    identity |= {f"model.{k}": v for k, v in plain["model"].items()}
    optim_keys = _OPTIM_STEP0 if step == 0 else tuple(plain["optim"])
    identity |= {f"optim.{k}": plain["optim"][k] for k in optim_keys}
    identity |= {f"method.{k}": v for k, v in _plain(method.identity(step)).items()}
    identity |= {f"runtime.{k}": plain["runtime"][k] for k in _RUNTIME_TRAINING}
    return identity


def same_eval_protocol(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two config dicts score a model the same way (``data.unseen``, ...)."""
    return all(a.get("data", {}).get(k) == b.get("data", {}).get(k) for k in EVAL_PROTOCOL)


def model_from_config(cfg: RunConfig, classes_per_step: Sequence[int], *, pretrained: bool) -> IncrementalSegmenter:
    """The segmenter of ``cfg.model`` with these classifiers (ImageNet body weights only if ``pretrained``)."""
    m = cfg.model
    return build_segmenter(backbone=m.backbone, output_stride=m.output_stride, head_channels=m.head_channels,
                           backbone_width=m.width, classes_per_step=classes_per_step,
                           pretrained=m.pretrained if pretrained else None)


def load_weights(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """Load ``state["model"]`` strictly, or say which file does not fit."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise IlsegError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None


def load_step_model(cfg: RunConfig, path: Path, step: int | None = None) -> tuple[IncrementalSegmenter, dict[str, Any]]:
    """The model saved in ``path`` as step ``step`` (default: the step it records) of a ``cfg`` run.

    The checkpoint's identity is checked against ``cfg`` first.  Returns the
    model and the whole checkpoint state.
    """
    state = load_checkpoint(path)
    if step is None:
        step = state.get("step")
        if not isinstance(step, int):
            raise IlsegError(f"checkpoint {path} does not record its step; pass --step")
    method = build_method(cfg.method)
    check_compatible(state, checkpoint_identity(cfg, step, method), path)
    model = model_from_config(cfg, method.training_task(cfg.build_task()).classifier_sizes(step), pretrained=False)
    load_weights(model, state, path)
    return model, state


def training_task(cfg: RunConfig) -> Task:
    """The task ``cfg``'s method trains (one step of all classes for joint training)."""
    return build_method(cfg.method).training_task(cfg.build_task())


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat |= _flatten(v, f"{key}.")
        else:
            flat[key] = v
    return flat


def _differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in dict.fromkeys([*before, *after])
            if before.get(k) != after.get(k)]


__all__ = [
    "CONFIG_FILE", "EVAL_PROTOCOL", "checkpoint_identity", "finished_steps", "last_checkpoint",
    "last_finished_step", "load_step_model", "load_weights", "model_from_config", "prepare_run_dir",
    "read_run_config", "same_eval_protocol", "step_checkpoint", "training_task",
]
