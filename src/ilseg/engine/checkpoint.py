"""Checkpoints: written atomically, loaded safely, checked against the run.

A checkpoint is a plain dict of tensors and builtin values, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs).  Writes go to a
temporary file in the same folder, are fsync'ed, then renamed over the
target: a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ilseg.errors import IlsegError

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


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
