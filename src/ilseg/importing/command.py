"""``ilseg import``: every file checked and converted, then one run folder written, then (optionally) evaluated.

:func:`import_run` is the command.  Nothing is written until every file has been read, mapped and
checked; a failure while writing removes what this import wrote.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ilseg.config import RunConfig
from ilseg.errors import IlsegError
from ilseg.importing.convert import (
    ImportedStep,
    check_architecture,
    convert_checkpoint,
    convert_weights,
    read_tool_checkpoint,
)
from ilseg.importing.names import FORMATS, check_named_task, step_hint
from ilseg.methods import build_method
from ilseg.metrics import mean_over_steps
from ilseg.runs.checkpoint import save_checkpoint
from ilseg.runs.folder import (
    CONFIG_FILE,
    LOCK_FILE,
    RunLock,
    checkpoint_identity,
    create_run_dir,
    step_checkpoint,
    training_task,
)
from ilseg.runs.results import write_results


def _check_steps(steps: Sequence[int], paths: Sequence[Path]) -> None:
    """The steps of the files must be 0..k-1, each once (a run is imported from its step 0 on)."""
    seen: dict[int, Path] = {}
    for step, path in zip(steps, paths, strict=True):
        if step in seen:
            raise IlsegError(f"{seen[step]} and {path} are both step {step}; give one file per step, in step order")
        seen[step] = path
    gaps = [s for s in range(max(steps) + 1) if s not in seen]
    if gaps:
        raise IlsegError(f"no file for {'step' if len(gaps) == 1 else 'steps'} {', '.join(map(str, gaps))}: a run is imported from its step 0 on, "
                         "with every step up to the last one given")


# -- the whole import ---------------------------------------------------------------------------
def import_run(cfg: RunConfig, files: Sequence[Path], out: Path, *, fmt: str, evaluate: bool = False,
               device: str | None = None, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Convert ``files`` (one per step) into the run folder ``out``; return a summary.

    Every file is read, converted and checked before ``out`` is created; ``out`` must be a
    new or empty folder.  With ``evaluate``, each step is then scored with ilseg's protocol
    (the test split of ``cfg.data``) and ``results.json`` written, as a trained run has it.
    Returns ``{"steps": [{"step", "source", "class_order"}...], "results": dict or None}``.
    """
    if fmt not in FORMATS:
        raise IlsegError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not files:
        raise IlsegError("give the checkpoint file of each step to import")
    paths = [Path(f) for f in files]
    _check_out(out)
    check_architecture(cfg, fmt)
    task = training_task(cfg)
    orders = [check_named_task(p, fmt, task) for p in paths]
    steps = []
    for position, path in enumerate(paths):  # every file read and checked before anything is written
        weights, info = read_tool_checkpoint(path, fmt)
        hint = step_hint(path, fmt) if fmt != "cssegmentation" else _task_id(info)
        step = position if hint is None else hint
        if step >= task.num_steps:
            raise IlsegError(f"{path} is step {step}, but the config's task {task.dataset} {task.name} has steps "
                             f"0..{task.num_steps - 1}: choose the --config of the file's task")
        convert_weights(weights, info, path, fmt, cfg, step)
        steps.append(step)
    _check_steps(steps, paths)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out):
            try:
                written = write_imported_steps(cfg, out, fmt, paths, steps, orders, log)
            except BaseException:  # a full disk, a file changed since it was checked, Ctrl-C: leave no half run
                for leftover in out.iterdir():
                    if leftover.name != LOCK_FILE:
                        leftover.unlink()
                raise
            results = evaluate_imported(cfg, out, fmt, written, device=device, log=log) if evaluate else None
    except BaseException:
        if created and not any(p.name != LOCK_FILE for p in out.iterdir()):
            shutil.rmtree(out)
        raise
    return {"steps": written, "results": results}


def write_imported_steps(cfg: RunConfig, out: Path, fmt: str, paths: Sequence[Path], steps: Sequence[int],
                         orders: Sequence[Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``config.yaml`` and each step's ``step{t}.pth`` in the locked, empty ``out``."""
    create_run_dir(cfg, out, overwrite=False)
    written = []
    for path, step, order in sorted(zip(paths, steps, orders, strict=True), key=lambda item: item[1]):
        imported = convert_checkpoint(path, fmt, cfg, step)
        imported.record["class_order"] = order
        save_checkpoint(step_checkpoint(out, step), imported_state(cfg, imported))
        written.append({"step": step, "source": str(path), "class_order": order})
        log(f"step {step}: {path} -> {step_checkpoint(out, step)}; class order: {order}")
    return written


def imported_state(cfg: RunConfig, imported: ImportedStep) -> dict[str, Any]:
    """The ``step{t}.pth`` of an imported step: ilseg's layout, with what is unknown left empty.

    Like :func:`~ilseg.runs.checkpoint.training_state`, whose identity lets ``eval``,
    ``predict``, ``--resume`` and ``--init-from`` accept it; no optimiser, scheduler or scaler
    state (a next step starts its own), no epochs or training time, and no scores (they are
    added by :func:`evaluate_imported`).
    """
    step = imported.step
    return {
        "model": imported.model, "optimizer": None, "scheduler": None, "scaler": None,
        "step": step, "epoch": None, "epochs": None, "train_seconds": None,
        "identity": checkpoint_identity(cfg, step), "config": cfg.to_dict(),
        "imported": dict(imported.record),
    }


def evaluate_imported(cfg: RunConfig, out: Path, fmt: str, written: Sequence[Mapping[str, Any]], *,
                      device: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Score every imported step as ``ilseg eval`` does, store the scores in its checkpoint, write the results."""
    from ilseg.engine.run import evaluate_checkpoint, new_results
    from ilseg.runs.checkpoint import load_checkpoint

    method = build_method(cfg.method)
    task = method.training_task(cfg.build_task())
    rows = []
    for item in written:
        step, path = int(item["step"]), step_checkpoint(out, int(item["step"]))
        try:
            scores = evaluate_checkpoint(cfg, path, step=step, device=device)
        except IlsegError as exc:
            raise IlsegError(f"{exc} (the imported run {out} is complete without scores: evaluate it with "
                             f"ilseg eval --run {out} once the data are there)") from None
        row = {
            "step": step, "classes_seen": task.num_outputs(step),
            "new_classes": [task.class_names[c] for c in task.new_classes(step)],
            **{k: v for k, v in scores.items() if k not in ("confusion_matrix", "step", "classes_seen")},
            "num_train_images": None, "epochs": None, "train_seconds": None, "imported_from": item["source"],
        }
        state = load_checkpoint(path)
        save_checkpoint(path, {k: v for k, v in state.items() if k != "format_version"}
                        | {"metrics": row, "confusion_matrix": scores["confusion_matrix"]})
        rows.append(row)
        log(f"step {step}: mIoU all {100 * row['miou_all']:.1f}" if row.get("miou_all") is not None
            else f"step {step}: evaluated")
    results = new_results(cfg, method) | {"steps": rows, "imported": {"format": fmt}}
    results["mean_miou_over_steps"] = mean_over_steps([r["miou_all"] for r in rows])
    write_results(out, results)
    return results


def _task_id(info: Mapping[str, Any]) -> int | None:
    """cssegmentation's ``task_id`` entry (its step), or ``None`` if absent."""
    task_id = info["entries"].get("task_id")
    return task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise IlsegError(f"--out {out} is a file, not a folder; choose a new folder for the imported run")
    if out.is_dir():
        if (out / CONFIG_FILE).is_file():
            raise IlsegError(f"--out {out} already holds a run; choose a new folder for the imported run")
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise IlsegError(f"--out {out} exists and is not empty; choose a new or empty folder")
