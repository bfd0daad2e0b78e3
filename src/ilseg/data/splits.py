"""Per-step image lists: which images each incremental step trains on, cached.

The disjoint / overlapped filter (:func:`ilseg.tasks.keep_image`) only needs
the set of values in every mask.  :func:`class_presence` reads each mask once
(in parallel worker processes) and caches those sets in a JSON file keyed by
the dataset name, the mask paths and each mask's size and modification time,
so the cache is recomputed when files or lists change.  :func:`step_image_indices`
applies the filter and caches the per-step lists under a key that adds the
task's class order and step sizes and the mode.

A user-supplied per-step list can replace the filter (MiB ships ADE20k lists
as ``.npy`` arrays of indices into the split).

Published counts on VOC train_aug (docs/protocol.md#which-images-a-step-trains-on) are in
:data:`PUBLISHED_COUNTS`; :func:`split_report` compares against them.

Example::

    >>> task = get_task("voc", "15-1")
    >>> idx = step_image_indices(train_set, task, 1, "overlap", workers=8)
    >>> step_set = train_set.subset(idx).with_lut(train_lut(task, 1))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
import functools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ilseg.data import io
from ilseg.data.parallel import chunked, run_chunks
from ilseg.data.datasets import SegmentationDataset
from ilseg.errors import IlsegError, WriteError
from ilseg.fileio import atomic_write_text, failure_reason
from ilseg.tasks import Mode, Task, get_task, step_indices

LOGGER = logging.getLogger("ilseg.data.splits")
CACHE_VERSION = 1
VOC_TRAIN_AUG_SIZE = 10582

# Published per-step image counts on VOC train_aug (10,582 images), docs/protocol.md#which-images-a-step-trains-on,
# keyed by (task, mode) with the identity class order.
PUBLISHED_COUNTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("19-1", "disjoint"): (10034, 548),
    ("19-1", "overlap"): (10410, 548),
    ("15-5", "disjoint"): (8437, 2145),
    ("15-5", "overlap"): (9568, 2145),
    ("15-1", "disjoint"): (8437, 378, 299, 420, 500, 548),
    ("15-1", "overlap"): (9568, 487, 299, 491, 500, 548),
}


def default_cache_dir() -> Path:
    """``$ILSEG_CACHE`` if set, else ``~/.cache/ilseg``."""
    env = os.environ.get("ILSEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ilseg"


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def presence_key(dataset: SegmentationDataset) -> str:
    """Hash of the dataset name, absolute mask paths and each mask's size and mtime.

    Raises:
        IlsegError: a mask file has disappeared.
    """
    stamps = []
    for path in dataset.masks:
        try:
            st = os.stat(path)
        except OSError:
            raise IlsegError(f"mask {path} does not exist; re-download the dataset or fix its list") from None
        stamps.append([str(Path(path).absolute()), st.st_size, st.st_mtime_ns])
    return _hash({"version": CACHE_VERSION, "dataset": dataset.name, "num_classes": dataset.num_classes,
                  "masks": stamps})


# Cache folders that could not be written in this process: warned about once, then not written again.
_UNWRITABLE: set[Path] = set()


def _read_json(path: Path) -> dict | None:
    """A cache file's content, or None if missing or unreadable (then it is recomputed)."""
    if path.parent.exists() and not path.parent.is_dir():
        return None  # the cache "folder" is a file: said once when the cache is written
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, RecursionError):
        warnings.warn(f"ignoring unreadable cache file {path}; recomputing it", stacklevel=3)
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically.

    The cache only saves time: a folder that cannot be written (a file, read
    only, full) is said once, on one line, and the run goes on with the lists
    computed in memory.
    """
    folder = path.parent
    if folder in _UNWRITABLE:
        return
    try:
        if folder.exists() and not folder.is_dir():
            raise WriteError(f"{folder} is a file", "it is a file, not a folder")
        atomic_write_text(path, json.dumps(data))
    except (WriteError, OSError) as exc:
        _UNWRITABLE.add(folder)
        reason = exc.reason if isinstance(exc, WriteError) else failure_reason(exc)
        LOGGER.warning(f"ilseg: warning: cache folder {folder} cannot be written ({reason}); going on without "
                       "it (the image lists are computed in memory; give a writable data.cache_dir or "
                       "--cache-dir to keep them)")


def _mask_values(path: Path, num_classes: int) -> list[int]:
    """Sorted values present in one mask (checked against ``num_classes``)."""
    counts = io.read_mask_and_counts(path, num_classes)[1]
    return [int(v) for v in np.flatnonzero(counts)]


def _mask_values_chunk(paths: Sequence[str], num_classes: int) -> list[list[int]]:
    return [_mask_values(Path(p), num_classes) for p in paths]


def class_presence(
    dataset: SegmentationDataset,
    *,
    workers: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[frozenset[int]]:
    """The set of raw mask values (dataset ids, 255 included) of every image.

    Each mask is read once; with ``workers > 1`` in that many processes.
    The result is cached in ``cache_dir`` (default :func:`default_cache_dir`)
    under :func:`presence_key`, written atomically.

    Raises:
        IlsegError: a mask is missing, corrupt, not an index PNG, or holds
            values outside the dataset's classes (the message names the file).
    """
    key = presence_key(dataset)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"presence-{dataset.name}-{key[:24]}.json"
    cached = _read_json(cache_file)
    if cached is not None and cached.get("key") == key and len(cached.get("values", ())) == len(dataset):
        return [frozenset(v) for v in cached["values"]]

    paths = [str(p) for p in dataset.masks]
    bar = tqdm(total=len(paths), desc=f"reading {dataset.name} masks", unit="mask", disable=not progress,
               leave=False)
    values: list[list[int]] = []
    try:
        if workers > 1 and len(paths) > 1:
            chunks = chunked(paths, workers, largest=256)
            parts: dict[int, list[list[int]]] = {}
            read = functools.partial(_mask_values_chunk, num_classes=dataset.num_classes)
            for index, part in run_chunks(read, chunks, workers=workers):  # Ctrl-C: KeyboardInterrupt, pool stopped
                parts[index] = part
                bar.update(len(part))
            values = [v for index in range(len(chunks)) for v in parts[index]]
        else:
            for p in paths:
                values.append(_mask_values(Path(p), dataset.num_classes))
                bar.update(1)
    finally:  # Ctrl-C included: the bar's line is cleared before the message
        bar.close()
    _write_json_atomic(cache_file, {"key": key, "dataset": dataset.name, "values": values})
    return [frozenset(v) for v in values]


# -- per-step lists -------------------------------------------------------------------
def _task_key(task: Task) -> dict:
    """What decides the filter: dataset, class order and step sizes (not the task's name)."""
    return {"dataset": task.dataset, "order": list(task.order), "step_sizes": list(task.step_sizes)}


def _check_mode(mode: str) -> None:
    if mode not in ("disjoint", "overlap"):
        raise IlsegError(f"unknown mode {mode!r}; use 'disjoint' or 'overlap'")


def step_image_indices(
    dataset: SegmentationDataset,
    task: Task,
    step: int,
    mode: Mode,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    index_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
    allow_empty_index: bool = False,
) -> list[int]:
    """Indices into ``dataset`` of the images step ``step`` trains on.

    Without ``index_file``: the disjoint / overlapped filter
    (:func:`ilseg.tasks.keep_image`) over :func:`class_presence`, with the
    lists of every step cached under a key made of the presence key, the
    task's dataset, class order and step sizes, and the mode.

    With ``index_file``: that user-supplied list for this step instead (see
    :func:`load_index_file`).
    """
    task.new_classes(step)  # checks the step
    _check_mode(mode)
    if task.dataset != dataset.name:
        raise IlsegError(f"task {task.dataset}/{task.name} does not belong to dataset {dataset.name!r}")
    if index_file is not None:
        return load_index_file(index_file, dataset, allow_empty=allow_empty_index)

    pkey = presence_key(dataset)
    key = _hash({"presence": pkey, "task": _task_key(task), "mode": mode})
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"steps-{dataset.name}-{key[:24]}.json"
    cached = _read_json(cache_file)
    if cached is not None and cached.get("key") == key and len(cached.get("steps", ())) == task.num_steps:
        return [int(i) for i in cached["steps"][step]]

    presence = class_presence(dataset, workers=workers, cache_dir=cache_dir, progress=progress)
    steps = [step_indices(presence, task, t, mode) for t in range(task.num_steps)]
    _write_json_atomic(cache_file, {"key": key, "dataset": dataset.name, "task": task.fingerprint(),
                                    "mode": mode, "steps": steps})
    return steps[step]


def load_index_file(path: str | os.PathLike[str], dataset: SegmentationDataset, *,
                    allow_empty: bool = False) -> list[int]:
    """Read a per-step image list for ``dataset``.

    Formats: ``.npy`` - integer array of indices into the split (MiB's
    ADE20k lists); ``.json`` - a list of indices or of image ids; any other
    extension (``.txt``) - image ids, one per line.

    ``allow_empty``: an empty list is returned instead of refused (the
    engine then says which step has no images).

    Raises:
        IlsegError: missing/unreadable file, non-integer, negative, out of
            range or repeated indices, unknown ids (the message names the file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise IlsegError(f"index file {path} does not exist; give one per step (use '{{step}}' in its name)")
    n = len(dataset)
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise IlsegError(f"index file {path} must hold a 1-D integer array, got {arr.dtype} {arr.shape}")
            entries: list[int | str] = [int(i) for i in arr]
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list) or not all(
                isinstance(e, str) or (isinstance(e, int) and not isinstance(e, bool)) for e in data
            ):
                raise IlsegError(f"index file {path} must hold a JSON list of indices or image ids")
            entries = list(data)
        else:
            entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except IlsegError:
        raise
    except (OSError, ValueError) as exc:
        raise IlsegError(f"cannot read index file {path} ({exc}); regenerate or re-download it") from None

    position = {item: i for i, item in enumerate(dataset.ids)}
    indices: list[int] = []
    for k, entry in enumerate(entries):
        if isinstance(entry, str):
            if entry not in position:
                raise IlsegError(f"index file {path}, entry {k + 1}: image id {entry!r} is not in the dataset's list")
            indices.append(position[entry])
        else:
            if not 0 <= entry < n:
                raise IlsegError(
                    f"index file {path}, entry {k + 1}: index {entry} is out of range for a split of {n} images "
                    "(the list belongs to another split or dataset)"
                )
            indices.append(entry)
    if len(set(indices)) != len(indices):
        raise IlsegError(f"index file {path} lists some images more than once")
    if not indices and not allow_empty:
        raise IlsegError(f"index file {path} is empty")
    return indices


# -- comparing with the published counts -------------------------------------------
def published_counts(task: Task, mode: str) -> tuple[int, ...] | None:
    """The published per-step counts on VOC train_aug of a task with this class order and step sizes, if any.

    Tasks are matched by what decides the counts (class order, step sizes), so
    the alias ``15-5s`` and a config's custom task with the same steps match.
    """
    if task.dataset != "voc":
        return None
    for (name, m), counts in PUBLISHED_COUNTS.items():
        ref = get_task("voc", name)
        if m == mode and ref.order == task.order and ref.step_sizes == task.step_sizes:
            return counts
    return None


def _published_for(dataset: SegmentationDataset, task: Task, mode: str) -> tuple[int, ...] | None:
    """Published counts for this task and mode, only on the full VOC train_aug list."""
    if dataset.name != "voc" or len(dataset) != VOC_TRAIN_AUG_SIZE:
        return None
    return published_counts(task, mode)


def split_report(
    dataset: SegmentationDataset,
    task: Task,
    mode: Mode,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Per-step image counts of ``task`` on ``dataset``, with the published ones where known.

    Returns::

        {"dataset": "voc", "task": "15-1", "overlap": False, "total_images": 10582,
         "steps": [{"step": 0, "classes": ["background", ...], "count": 8437,
                    "published": 8437, "match": True}, ...]}

    ``published`` / ``match`` are ``None`` unless the dataset is VOC with the
    full 10,582-image train_aug list and the task is one of
    :data:`PUBLISHED_COUNTS` (identity class order).
    """
    _check_mode(mode)
    published = _published_for(dataset, task, mode)
    steps = []
    for t in range(task.num_steps):
        count = len(step_image_indices(dataset, task, t, mode, cache_dir=cache_dir, workers=workers,
                                       progress=progress))
        ref = published[t] if published is not None else None
        steps.append({"step": t, "classes": [task.class_names[c] for c in task.new_classes(t)], "count": count,
                      "published": ref, "match": None if ref is None else count == ref})
    return {"dataset": dataset.name, "task": task.name, "overlap": mode == "overlap", "steps": steps,
            "total_images": len(dataset)}
