"""Checkpoints: written atomically, loaded safely, checked against the run.

A checkpoint is a plain dict of tensors and builtin values, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs).  Writes go to a
temporary file in the same folder, are fsync'ed, then renamed over the
target: a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ilseg.errors import IlsegError
from ilseg.fileio import atomic_write_bytes

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically save ``state`` (tensors and builtin values only)."""
    payload = {"format_version": FORMAT_VERSION, **state}
    atomic_write_bytes(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise IlsegError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a torch file
        raise IlsegError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is corrupt or not an ilseg checkpoint: delete it and train that step again"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise IlsegError(f"checkpoint {path} is not an ilseg checkpoint (no 'model' / 'format_version' entry)")
    return state


def check_compatible(state: Mapping[str, Any], expected: Mapping[str, Any], path: Path) -> None:
    """Raise if the checkpoint's identity (dataset, task, order, step, model) differs."""
    found = state.get("identity", {})
    diffs = [
        f"{k}: checkpoint has {found.get(k)!r}, this run needs {v!r}"
        for k, v in expected.items()
        if found.get(k) != v
    ]
    if diffs:
        raise IlsegError(
            f"checkpoint {path} belongs to another run: " + "; ".join(diffs)
            + ". Use the checkpoint of the same dataset, task, class order, step and model."
        )
