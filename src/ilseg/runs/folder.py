"""The run folder: its layout, its config, and which checkpoint belongs to which run.

Layout of ``RUN_DIR``::

    config.yaml        the resolved config (what ``--resume``, eval and predict read back)
    step{t}.pth        the final model of step t (+ optimiser, scheduler, metrics)
    last.pth           resumable state at the end of the latest epoch
    results.json/.csv/.md   every number per step, rewritten after each step
    train.log          what was printed;  metrics.jsonl: every logged scalar
    preview/step{t}.png   test images, ground truth and predictions after step t (runtime.preview_images)

A checkpoint carries an *identity*: every setting that shaped its weights
(:func:`checkpoint_identity`).  Loading one into a run whose identity differs
is refused with every difference named, so a step-0 model of another protocol
cannot start a run by accident.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilseg.config import (
    EVALUATION,
    LATER_STEPS,
    MODEL,
    TRAINING,
    ConfigFileError,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    settings_of,
)
from ilseg.runs.checkpoint import check_compatible, load_checkpoint
from ilseg.errors import IlsegError, WriteError
from ilseg.fileio import atomic_write_text, check_output_folder, is_ilseg_temporary, write_failure
from ilseg.methods import Method, build_method
from ilseg.models import IncrementalSegmenter, build_segmenter
from ilseg.tasks import Task

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config-history.json"
LAST_CHECKPOINT = "last.pth"
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"
PREVIEW_DIR = "preview"
# The files ilseg writes at the top of a run folder (the lock aside); nothing else there is ilseg's.
_RUN_FILE = re.compile(r"^(step\d+\.pth|last\.pth|config\.yaml|config-history\.json|results\.(json|csv|md)"
                       r"|train\.log|metrics\.jsonl|iou-step\d+\.md)$")
_PREVIEW_FILE = re.compile(r"^step\d+\.png$")
_TENSORBOARD_FILE = re.compile(r"^events\.out\.tfevents\.")
_OLD_STEP_COPY = re.compile(r"^\.step\d+\.pth\.copy$")  # adopt_step0's temporary before ilseg used its prefix


def is_run_file(name: str) -> bool:
    """Whether ilseg writes a file called ``name`` at the top of a run folder.

    >>> is_run_file("step2.pth"), is_run_file("results.md"), is_run_file("notes.txt")
    (True, True, False)
    """
    return _RUN_FILE.match(name) is not None


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


def read_run_config(run_dir: Path, overrides: Sequence[str] = (), *, step: int | None = None) -> RunConfig:
    """The config saved in ``run_dir`` (the one step ``step`` was trained with), with ``--set`` overrides."""
    path = Path(run_dir) / CONFIG_FILE
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise IlsegError(f"run folder {run_dir} is a file; give the run's folder (the one holding {CONFIG_FILE})")
    if path.is_dir():
        raise IlsegError(f"{path} is a folder, where a run keeps its config file; move that folder away, then "
                         f"restore the file: {restore_hint(Path(run_dir))}")
    if not path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else f"has no {CONFIG_FILE}, so it is not an ilseg run folder"
        raise IlsegError(f"run folder {run_dir} {what}")
    if step is not None:
        for from_step, data in reversed(read_history(run_dir)):
            if from_step <= step:
                return load_config_dict(data, overrides)
    return saved_config(run_dir, overrides)


def saved_config(run_dir: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """``RUN_DIR/config.yaml`` with ``--set`` overrides.

    A damaged file (empty, not text, not YAML) is refused, saying how to
    restore it: a run never takes the default settings in place of its own.
    """
    path = Path(run_dir) / CONFIG_FILE
    try:
        return load_config(path, overrides)
    except ConfigFileError as exc:
        if exc.path != path:
            raise
        raise IlsegError(f"{path} {exc.reason}: it is this run's config, and a run never takes the default settings "
                         f"in place of its own; {restore_hint(Path(run_dir))}") from None


def config_backup(run_dir: Path) -> tuple[RunConfig, Path] | None:
    """The run's config as ``config-history.json`` (its last entry) or, without a history, a checkpoint records it.

    Every settings change on resume is written to the history and to
    ``config.yaml`` together, so the history's last entry is ``config.yaml``;
    without a history the settings never changed, and every checkpoint of the
    run records them.  ``None`` if neither holds a valid config.
    """
    run_dir = Path(run_dir)
    try:
        history = read_history(run_dir)
    except IlsegError:
        history = []
    if history:
        try:
            return config_from_dict(history[-1][1]), run_dir / HISTORY_FILE
        except IlsegError:
            pass
    if (run_dir / HISTORY_FILE).exists():
        return None  # the settings changed at some point: a checkpoint may record older ones
    for path in [*(step_checkpoint(run_dir, t) for t in reversed(finished_steps(run_dir))), last_checkpoint(run_dir)]:
        recorded = read_checkpoint_entry(path, "config") if path.is_file() else None
        if isinstance(recorded, dict):
            try:
                return config_from_dict(recorded), path
            except IlsegError:
                continue
    return None


def restore_hint(run_dir: Path) -> str:
    """How to get a damaged or missing ``config.yaml`` back: the command, when the run holds a copy."""
    backup = config_backup(run_dir)
    if backup is None:
        return (f"restore it from a backup, or start the run again with 'ilseg train --config FILE --out "
                f"{shlex.quote(str(run_dir))} --overwrite'")
    return f"restore it from {backup[1]} with: ilseg config restore {shlex.quote(str(run_dir))}"


def restore_config(run_dir: Path) -> tuple[Path, Path | None]:
    """Write ``RUN_DIR/config.yaml`` again from the run's own copy (:func:`config_backup`).

    Refused when the file is readable, or a folder.  A damaged file that is
    not empty is kept as ``config.yaml.damaged`` (``.damaged-2`` ... if taken).
    Returns the source and where the damaged file was kept (or ``None``).
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise IlsegError(f"run folder {run_dir} does not exist" if not run_dir.exists() else
                         f"{run_dir} is a file; give a run folder")
    if path.is_dir():
        raise IlsegError(f"{path} is a folder, not the run's config file; move it away, then run this again")
    if path.is_file():
        try:
            load_config(path)
        except ConfigFileError:
            pass
        else:
            raise IlsegError(f"{path} is readable: there is nothing to restore (see it with: ilseg config show {path})")
    backup = config_backup(run_dir)
    if backup is None:
        raise IlsegError(f"{run_dir} holds no copy of its config (no readable {HISTORY_FILE}, no checkpoint that "
                         "records it); restore config.yaml from a backup, or start the run again with --overwrite")
    cfg, source = backup
    with RunLock(run_dir):
        kept = None
        if path.is_file() and path.stat().st_size > 0:
            kept = path.with_name(f"{CONFIG_FILE}.damaged")
            number = 2
            while kept.exists():
                kept, number = path.with_name(f"{CONFIG_FILE}.damaged-{number}"), number + 1
            os.link(path, kept)  # a second name for it: the damaged file is never lost, even if the write fails
        atomic_write_text(path, dump_config(cfg))
    return source, kept


def resume_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """The keys ``new`` changes in ``old``; refuses those a resumed run cannot change."""
    before, after = _flatten(old.to_dict()), _flatten(new.to_dict())
    changed = [k for k in after if before.get(k) != after[k]]
    settable = {s.key for s in settings_of() if s.resume}
    refused = [k for k in changed if k not in settable]
    if refused:
        others = sorted(k for k in settable if not k.startswith("optim."))
        raise IlsegError(
            f"--resume cannot change {', '.join(refused)}: it changes what the finished steps were trained on; "
            f"start a new run (--out) instead. A resumed run may change: optim.*, {', '.join(others)}"
        )
    return changed


def read_history(run_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """``[(from_step, config dict), ...]``: the configs a run was trained with, oldest first (empty if one)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
        return [(int(e["from_step"]), dict(e["config"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IlsegError(f"{path} cannot be read ({exc}); restore it from a backup or start a new run") from None


# Of those, the settings that change how a step trains: the step being resumed starts again with them.
RESUME_RESTARTS = ("optim.", "runtime.amp")


def record_config_change(run_dir: Path, old: RunConfig, new: RunConfig, from_step: int,
                         changed: list[str]) -> bool:
    """Make ``new`` the run's config; return whether step ``from_step`` must start again.

    Settings that only say where and how the run executes (``data.root``,
    workers, device, ...) apply to every step, past ones included.  Settings
    that change training (:data:`RESUME_RESTARTS`) apply from ``from_step``
    on: ``config-history.json`` keeps the config each earlier step was trained
    with, so its checkpoint is still checked against its own settings.
    """
    entries: list[dict[str, Any]] = [{"from_step": s, "config": c} for s, c in read_history(run_dir)] or [
        {"from_step": 0, "config": old.to_dict()}]
    new_plain, flat_new = new.to_dict(), _flatten(new.to_dict())
    everywhere = [k for k in changed if not k.startswith(RESUME_RESTARTS)]
    for entry in entries:  # where the data is, how many workers...: true of every step
        for key in everywhere:
            section, name = key.split(".", 1)
            entry["config"][section][name] = flat_new[key]
    restart = len(everywhere) < len(changed)
    if restart:
        entries = [e for e in entries if e["from_step"] < from_step] + [{"from_step": from_step, "config": new_plain}]
    entries[-1] |= {"changed": changed, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(Path(run_dir) / HISTORY_FILE, json.dumps(entries, indent=1) + "\n")
    atomic_write_text(Path(run_dir) / CONFIG_FILE, dump_config(new))
    return restart


def check_run_dir(cfg: RunConfig, run_dir: Path, todo: range, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is created or read for long, what would lose or silently redo work.

    * ``--out`` must be a folder: new, empty, or an ilseg run folder;
    * a run folder must hold this config (``--resume`` reads it from there);
    * without ``--resume``, the steps to train must not be finished or begun
      there (running the same command twice does not retrain and overwrite
      them): ``--resume`` continues, ``--overwrite`` starts the run over.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise IlsegError(f"--out {run_dir} is a file, not a folder; choose a folder for the run")
    if todo.start > 0 and not overwrite and not step_checkpoint(run_dir, todo.start - 1).is_file():
        raise IlsegError(f"--steps starts at step {todo.start}, which needs {step_checkpoint(run_dir, todo.start - 1)}; "
                         f"train step {todo.start - 1} first (or make --steps start earlier)")
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        if resume:
            raise IlsegError(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not an ilseg run folder")
        check_output_folder(run_dir, option="--out", what="an ilseg run folder", ours=lambda entry: False)
        return
    if overwrite or nothing_trained(run_dir):  # nothing trained there yet: nothing to lose or redo
        return
    old = saved_config(run_dir)
    if old != cfg and not resume:
        diff = config_differences(old, cfg)
        raise IlsegError(
            f"{run_dir} holds a run with another config ({'; '.join(diff) or 'name'}); choose another --out, "
            "use --resume to continue that run as it was configured, or --overwrite to start it over with this one"
        )
    if resume:
        resume_changes(old, cfg)  # refuses a change the finished steps would contradict
        return
    begun = [t for t in todo if step_checkpoint(run_dir, t).is_file()]
    last = _last_step(run_dir)
    if last is not None and last in todo and last not in begun:
        begun.append(last)
    if begun:
        raise IlsegError(
            f"{run_dir} already holds {'step' if len(begun) == 1 else 'steps'} {', '.join(map(str, sorted(begun)))} of this run; continue it with "
            f"'ilseg train --resume {run_dir}', choose a new --out, or pass --overwrite to train it again from scratch"
        )


def nothing_trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds no trained weights: no ``step{t}.pth`` and no ``last.pth``.

    The run stopped before its first save (a wrong path or setting, a loss
    that diverged in the first epoch), so the folder may start again with
    another config without ``--overwrite``: nothing would be lost.
    """
    return not last_checkpoint(run_dir).exists() and not finished_steps(run_dir)


def create_run_dir(cfg: RunConfig, run_dir: Path, *, overwrite: bool) -> tuple[list[Path], list[str]]:
    """Make ``run_dir`` and write its ``config.yaml``; ``overwrite`` first removes the run's files.

    Call with the run folder locked (:class:`RunLock`).  ``--overwrite``
    removes what the old run wrote (:func:`run_files`: checkpoints, results,
    logs, previews, TensorBoard events), never other files, then writes this
    config.  Returns the files removed and the names of the entries kept
    (what ilseg did not write; the lock aside).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / CONFIG_FILE
    removed: list[Path] = []
    again = saved.is_file() and not overwrite and nothing_trained(run_dir)
    if again:  # a run that stopped before its first save starts again, with this config: its logs stay
        removed = [p for p in (run_dir / "results.json", run_dir / "results.csv", run_dir / "results.md",
                               run_dir / HISTORY_FILE) if p.is_file()]
        for path in removed:
            path.unlink()
        atomic_write_text(saved, dump_config(cfg))
    if overwrite and saved.is_file():
        removed = run_files(run_dir)
        for path in removed:
            path.unlink(missing_ok=True)
        for folder in (run_dir / PREVIEW_DIR, run_dir / TENSORBOARD_DIR):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()  # emptied of ilseg's files: nothing else was in it
    if overwrite or not saved.is_file():
        atomic_write_text(saved, dump_config(cfg))
    kept = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()
                  if p.name not in (CONFIG_FILE, LOCK_FILE)) if overwrite else []
    return removed, kept


def run_files(run_dir: Path) -> list[Path]:
    """What a run writes, for ``--overwrite``: the files of :func:`is_run_file` but ``config.yaml``,
    ``preview/step{t}.png`` and the TensorBoard event files in ``tensorboard/``."""
    run_dir = Path(run_dir)
    top = [p for p in run_dir.iterdir() if is_run_file(p.name) and p.name != CONFIG_FILE] if run_dir.is_dir() else []
    inside = [p for folder, pattern in ((PREVIEW_DIR, _PREVIEW_FILE), (TENSORBOARD_DIR, _TENSORBOARD_FILE))
              if (run_dir / folder).is_dir() for p in (run_dir / folder).iterdir() if pattern.match(p.name)]
    return [p for p in sorted(top) + sorted(inside) if p.is_file() or p.is_symlink()]  # a folder so named is not ours


def is_run_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of ilseg's in a run folder (or its ``preview/``).

    ``.ilseg-tmp-...`` (every atomic write), and the names ilseg used before,
    recognised only for the files ilseg writes there (``.last.pth.1a2b.tmp``,
    ``.step0.pth.copy``); a user's ``.notes.tmp`` is never one.
    """
    return (is_ilseg_temporary(name, lambda target: is_run_file(target) or _PREVIEW_FILE.match(target) is not None)
            or _OLD_STEP_COPY.match(name) is not None)


def remove_temporaries(run_dir: Path) -> tuple[list[Path], list[str]]:
    """Delete the half-written files a killed process left (:func:`is_run_temporary`), and nothing else.

    Call with the run folder locked, so no live writer owns them.  Returns
    the files removed, and the names of the files that look like temporary
    files (``*.tmp``, ``*.copy``) but are not ilseg's, which are kept.
    """
    removed: list[Path] = []
    kept: list[str] = []
    for folder in (run_dir, run_dir / PREVIEW_DIR):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.name.startswith(".") or not path.is_file():
                continue
            if is_run_temporary(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
            elif path.name.endswith((".tmp", ".copy")):
                kept.append(str(path.relative_to(run_dir)))
    return removed, kept


class RunLock:
    """An exclusive lock on a run folder: ``RUN_DIR/.lock``, held with ``flock`` while the run lives.

    The file names the holder (PID, host, start time) for the message a second
    ``ilseg train`` on the same folder gets.  The lock itself is the kernel's
    ``flock`` on the open file: it is released when the process ends, however
    it ends (a SIGKILL included), so a lock file left by a dead process is
    simply taken over; there is no PID guessing and no window in which two
    processes both believe they hold it.  On a clean exit the file is removed.
    (On file systems without working ``flock`` across machines, two hosts are
    not excluded from each other.)
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.path.is_dir() or (self.path.exists() and not self.path.is_file()):
            what = "a folder" if self.path.is_dir() else "not a regular file"
            raise IlsegError(f"{self.path} is {what}, where ilseg keeps the lock file of the run folder (ilseg never "
                             "makes it so); move it out of the folder, then run the command again")
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise WriteError(write_failure(self.path, exc)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                raise IlsegError(
                    f"{self.path.parent} is in use by another ilseg process (PID {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it to finish"
                ) from None
            if not self._still_at_path(fd):  # the holder removed it between our open and our lock: retry
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(record).encode())
            self._fd, self.held = fd, True
            return
        raise IlsegError(f"could not take the lock {self.path}; other processes keep taking and removing it")

    def release(self) -> None:
        """Remove the lock file (while still holding the lock), then let go."""
        if self._fd is not None:
            if self._still_at_path(self._fd):
                self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing releases the flock
        self._fd, self.held = None, False

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def log_final_line(run_dir: Path, line: str) -> bool:
    """Append ``line`` (the command's last, error or stop, line) to ``RUN_DIR/train.log``; return whether it was.

    Only in an ilseg run folder (one with ``config.yaml``: never a user's
    folder the command refused) and only while no other process holds the
    run's lock (its log is its own).  A batch job's user reads the log, not
    the terminal.  Failing to write is not reported: the line is on stderr.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        return False
    lock = run_dir / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY) if lock.is_file() else None
    except OSError:
        return False
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held by a live run: BlockingIOError
        with open(run_dir / "train.log", "a", encoding="utf-8") as log:
            log.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _last_step(run_dir: Path) -> int | None:
    """The step recorded in ``last.pth`` (read lazily), or ``None``."""
    path = last_checkpoint(run_dir)
    if not path.is_file():
        return None
    step = read_checkpoint_entry(path, "step")
    return step if isinstance(step, int) else None


def read_checkpoint_entry(path: Path, key: str) -> Any:
    """One entry of a checkpoint without reading its tensors (memory-mapped); ``None`` if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (a corrupt file is reported where it is really loaded)
        return None
    return state.get(key) if isinstance(state, dict) else None


def rebuild_results(run_dir: Path, results: dict[str, Any]) -> bool:
    """Make ``results["steps"]`` agree with the step checkpoints (which hold the metrics); True if it changed.

    A process killed after ``step{t}.pth`` was renamed into place but before
    the results were rewritten leaves results without step t; rows of steps
    without a checkpoint (removed, or never finished) are dropped.
    """
    rows = {s["step"]: s for s in results.get("steps", [])}
    rebuilt = []
    for step in finished_steps(run_dir):
        metrics = read_checkpoint_entry(step_checkpoint(run_dir, step), "metrics")
        if metrics is None and read_checkpoint_entry(step_checkpoint(run_dir, step), "imported") is not None:
            # imported from another tool without scores (ilseg import without --evaluate): a row only if one
            # was recorded since (--init-from scores the step it adopts)
            if step in rows:
                rebuilt.append(rows[step])
            continue
        if metrics is None:  # unreadable: say which file, never drop its row silently
            load_checkpoint(step_checkpoint(run_dir, step))
            raise IlsegError(f"{step_checkpoint(run_dir, step)} records no metrics; delete it and resume to train "
                             f"step {step} again")
        if isinstance(metrics, dict):
            row = rows.get(step)
            rebuilt.append(row if row is not None and _same_scores(row, metrics) else dict(metrics))
    changed = [s["step"] for s in rebuilt] != sorted(rows) or any(r is not rows.get(r["step"]) for r in rebuilt)
    results["steps"] = rebuilt
    return changed


def _same_scores(row: Mapping[str, Any], metrics: Mapping[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in metrics.items())


def checkpoint_identity(cfg: RunConfig, step: int, method: Method | None = None) -> dict[str, Any]:
    """Every setting that shaped the weights of a step-``step`` model, as flat ``section.key`` entries.

    Step 0 depends on the dataset, the task's order and step sizes, every
    setting of role :data:`~ilseg.config.MODEL` or :data:`~ilseg.config.TRAINING`
    (the config declares each setting's role) and the method's step-0 fields
    (for the built-in methods, the CE reduction and joint training).  Later
    steps depend on the :data:`~ilseg.config.LATER_STEPS` settings and all of
    the method's fields too.  Evaluation and placement settings (where the
    data comes from, loader workers, caches) are left out.
    """
    method = method or build_method(cfg.method)
    task = method.training_task(cfg.build_task())
    identity: dict[str, Any] = {
        "dataset": task.dataset, "order": list(task.order), "step_sizes": list(task.step_sizes), "step": step,
    }
    flat = _flatten(cfg.to_dict())
    roles = (MODEL, TRAINING) if step == 0 else (MODEL, TRAINING, LATER_STEPS)
    identity |= {s.key: flat[s.key] for s in settings_of(*roles)}
    identity |= {f"method.{k}": v for k, v in _plain(method.identity(step)).items()}
    return identity


def same_eval_protocol(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two config dicts score a model the same way (``data.unseen``, ...)."""
    return not eval_protocol_differences(a, b)


def eval_protocol_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The evaluation settings (role :data:`~ilseg.config.EVALUATION`) in which two config dicts differ,
    as ``key: a-value vs b-value``."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    return [f"{s.key}: {flat_a.get(s.key)!r} vs {flat_b.get(s.key)!r}" for s in settings_of(EVALUATION)
            if flat_a.get(s.key) != flat_b.get(s.key)]


def model_from_config(cfg: RunConfig, classes_per_step: Sequence[int], *, pretrained: bool) -> IncrementalSegmenter:
    """The segmenter of ``cfg.model`` with these classifiers (ImageNet body weights only if ``pretrained``),
    shaped by the method (:meth:`~ilseg.methods.Method.adapt_model`): every model a run builds comes from here."""
    m = cfg.model
    model = build_segmenter(backbone=m.backbone, output_stride=m.output_stride, head_channels=m.head_channels,
                           backbone_width=m.width, classes_per_step=classes_per_step,
                           pretrained=m.pretrained if pretrained else None, head=m.head, frozen_bn=m.frozen_bn,
                           frozen_bn_affine=m.frozen_bn_affine,
                           stride_on=m.stride_on, activation=m.activation)
    build_method(cfg.method).adapt_model(model)
    return model


def load_weights(model: nn.Module, state: Mapping[str, Any], path: Path) -> None:
    """Load ``state["model"]`` strictly, or say which file does not fit."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise IlsegError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None


def load_step_model(cfg: RunConfig, path: Path, step: int | None = None, *,
                    for_inference: bool = False) -> tuple[IncrementalSegmenter, dict[str, Any]]:
    """The model saved in ``path`` as step ``step`` (default: the step it records) of a ``cfg`` run.

    The checkpoint's identity is checked against ``cfg`` first; ``for_inference``
    (evaluation, prediction) leaves out how the weights were optimised
    (``optim.*``), which a resumed run may have changed since that step.
    Returns the model and the whole checkpoint state.
    """
    state = load_checkpoint(path)
    if step is None:
        step = state.get("step")
        if not isinstance(step, int):
            raise IlsegError(f"checkpoint {path} does not record its step; pass --step")
    method = build_method(cfg.method)
    expected = checkpoint_identity(cfg, step, method)
    if for_inference:
        expected = {k: v for k, v in expected.items() if not k.startswith("optim.")}
    check_compatible(state, expected, path)
    model = model_from_config(cfg, method.training_task(cfg.build_task()).classifier_sizes(step), pretrained=False)
    load_weights(model, state, path)
    return model, state


def training_task(cfg: RunConfig) -> Task:
    """The task ``cfg``'s method trains (one step of all classes for joint training)."""
    return build_method(cfg.method).training_task(cfg.build_task())


def load_config_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """A config from a saved dict (the history), with ``--set`` overrides."""
    merged = dict(data)
    for section, values in parse_overrides(overrides).items():
        merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    return config_from_dict(merged)


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


def config_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """``"key: old -> new"`` for every setting that differs, in config order."""
    return _differences(_flatten(old.to_dict()), _flatten(new.to_dict()))


def _differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in dict.fromkeys([*before, *after])
            if before.get(k) != after.get(k)]

