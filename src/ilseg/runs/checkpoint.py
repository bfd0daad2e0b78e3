"""Checkpoints: written atomically, loaded safely, checked against the run.

A checkpoint is a plain dict of tensors and builtin values, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs).  Writes go to a
temporary file in the same folder, are fsync'ed, then renamed over the
target: a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilseg.errors import IlsegError, plural
from ilseg.fileio import atomic_write_bytes, load_failure, quiet_pickle_warnings

FORMAT_VERSION = 2  # 2: identity lists every setting that shaped the weights


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically save ``state`` (tensors and builtin values only)."""
    payload = {"format_version": FORMAT_VERSION, **state}
    atomic_write_bytes(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        raise IlsegError(f"checkpoint {path} is a folder; give a checkpoint file (a run's stepN.pth), or the run "
                         "folder as --run")
    if not path.is_file():
        raise IlsegError(f"checkpoint {path} does not exist")
    try:
        with quiet_pickle_warnings():
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        raise IlsegError(
            f"checkpoint {path} cannot be read ({load_failure(exc, path)}); it is corrupt or not an ilseg "
            "checkpoint: delete it and train that step again"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise IlsegError(f"checkpoint {path} is not an ilseg checkpoint (no 'model' / 'format_version' entry)")
    return state


def check_compatible(state: Mapping[str, Any], expected: Mapping[str, Any], path: Path) -> None:
    """Raise, naming every difference, if the checkpoint's identity is not ``expected``.

    ``expected`` comes from :func:`ilseg.runs.folder.checkpoint_identity`.
    """
    found = upgraded_identity(state)
    defaults = setting_defaults(expected)
    # A setting added after the checkpoint was written is absent from it; the checkpoint then trained with
    # what the setting's default does (every setting is added with a default that keeps the old behaviour).
    diffs = [
        f"{k}: checkpoint has {found.get(k, '(not recorded)')!r}, this run has {v!r}"
        for k, v in expected.items()
        if found.get(k) != v and not (k not in found and k in defaults and defaults[k] == v)
    ]
    if diffs:
        older = state.get("format_version", 0) < FORMAT_VERSION
        hint = (f" (it was written by an older ilseg, checkpoint format {state.get('format_version')}, that recorded "
                f"fewer settings: train that step again with this version)") if older else ""
        raise IlsegError(
            f"checkpoint {path} belongs to another run ({plural(len(diffs), 'difference')}): " + "; ".join(diffs)
            + f". Use a checkpoint trained with the same settings, or change this run's config to match{hint}"
        )


def setting_defaults(expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every config setting's default as a flat ``section.key`` entry.

    ``method.*``: the defaults of the fields of the method ``expected`` (an
    identity) records with ``method.kind``, when it names a registered method.
    """
    from ilseg.config import RunConfig
    from ilseg.methods import METHODS

    plain = RunConfig().to_dict()
    flat = {f"{section}.{k}": v for section, values in plain.items() if isinstance(values, dict)
            for k, v in values.items() if section != "method"}
    method = METHODS.get(str((expected or {}).get("method.kind")))
    if method is not None:
        flat |= {f"method.{f.name}": f.default for f in dataclasses.fields(method.config_class)
                 if f.name != "name" and f.default is not dataclasses.MISSING}
    return flat


def upgraded_identity(state: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's identity, its method part in today's layout.

    A checkpoint of a step > 0 written by ilseg 0.1 records the 18 fields of
    the flat method config (:mod:`ilseg.methods.legacy`); they are read into
    the method's own config (the preset named in the checkpoint's config) and
    recorded as that method records them now.  Anything that cannot be read
    so is left as it is, and shows as a difference.
    """
    from ilseg.errors import IlsegError
    from ilseg.methods import METHOD_PRESETS, build_method
    from ilseg.methods.legacy import LEGACY_FIELDS, from_legacy

    found = dict(state.get("identity", {}))
    if "method.kind" in found or "method.unbiased_ce" not in found:
        return found
    flat = {k[len("method."):]: v for k, v in found.items() if k.startswith("method.")}
    name = ((state.get("config") or {}).get("method") or {}).get("name")
    if name not in METHOD_PRESETS or not set(flat) <= set(LEGACY_FIELDS):
        return found
    try:
        cfg = from_legacy(METHOD_PRESETS[name], flat | {"name": name}, "method")
    except IlsegError:
        return found
    step = int(found.get("step", 1))
    method_part = {f"method.{k}": v for k, v in build_method(cfg).identity(step).items()}
    return {k: v for k, v in found.items() if not k.startswith("method.")} | method_part


def training_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    step: int,
    epoch: int,
    epochs: int,
    train_seconds: float,
    identity: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    confusion_matrix: list[list[int]] | None = None,
    partial: Mapping[str, Any] | None = None,
    method_state: Mapping[str, Any] | None = None,
    method_kind: str | None = None,
    evaluations: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The one checkpoint layout, for ``last.pth`` (no metrics) and ``step{t}.pth`` (with them).

    ``epoch`` is the last finished epoch (0-based) of ``epochs``; the state
    after the last epoch is all that evaluation and the next step need.
    ``partial`` (``last.pth`` of a run stopped mid-epoch) records the epoch
    under way, the iterations done in it and their loss sums.  ``method_state``
    is what the method keeps across steps (:meth:`~ilseg.methods.Method.state_dict`);
    it is left out when empty, as in checkpoints written before methods kept state.
    """
    state: dict[str, Any] = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step, "epoch": epoch, "epochs": epochs, "train_seconds": train_seconds,
        "identity": dict(identity), "config": dict(config),
    }
    if partial is not None:
        state["partial"] = dict(partial)
    if method_state:
        state["method_state"] = dict(method_state)
        state["method_kind"] = method_kind  # whose state it is: another method starting from it ignores it
    if evaluations:  # eval.every's scores so far in this step (last.pth)
        state["evaluations"] = [dict(e) for e in evaluations]
    if metrics is not None:
        state["metrics"] = dict(metrics)
        state["confusion_matrix"] = confusion_matrix
    return state
