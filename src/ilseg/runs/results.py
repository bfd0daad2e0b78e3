"""Results files of a run (json / csv / md) and comparison tables.

Scores are stored as fractions (0..1) in ``results.json`` and shown as
percentages in the tables.  ``None`` (JSON ``null``) marks a class absent from
the ground truth or a mean over no class; tables show it as ``-``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ilseg.fileio import atomic_write_text

CSV_FIELDS = (
    "step", "classes_seen", "miou_all", "miou_old", "miou_old_fg", "miou_new",
    "pixel_accuracy", "mean_class_accuracy", "num_train_images", "epochs", "train_seconds",
)


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def summary_table(results: Mapping[str, Any]) -> str:
    """Title, old / new / all after each step, and the mean over steps (Markdown)."""
    out = io.StringIO()
    title = f"{results.get('method')} on {results.get('dataset')} {results.get('task')}"
    title += " (overlapped)" if results.get("overlap") else " (disjoint)"
    out.write(f"# {title}\n\nmIoU in %; old = step-0 classes (incl. background), new = classes added since.\n\n")
    out.write("| step | classes | old | old w/o bg | new | all | pixel acc | mean acc |\n")
    out.write("|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for s in results.get("steps", []):
        out.write(
            f"| {s['step']} | {s['classes_seen']} | {pct(s['miou_old'])} | {pct(s.get('miou_old_fg'))} | "
            f"{pct(s['miou_new'])} | {pct(s['miou_all'])} | {pct(s.get('pixel_accuracy'))} | "
            f"{pct(s.get('mean_class_accuracy'))} |\n"
        )
    if results.get("mean_miou_over_steps") is not None:
        out.write(f"\nMean of all-class mIoU over steps: {pct(results['mean_miou_over_steps'])}\n")
    return out.getvalue()


def per_class_table(results: Mapping[str, Any]) -> str:
    """IoU of every class after each step (Markdown; empty before a class is seen)."""
    steps = results.get("steps", [])
    if not steps:
        return ""
    names = list(steps[-1]["iou_per_class"])
    lines = ["## Per-class IoU (%)", "", "| class | " + " | ".join(f"step {s['step']}" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    for name in names:
        row = [pct(s["iou_per_class"].get(name)) if name in s["iou_per_class"] else "" for s in steps]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The paper-style table (:func:`summary_table`), then per-class IoU (:func:`per_class_table`)."""
    per_class = per_class_table(results)
    return summary_table(results) + (f"\n{per_class}" if per_class else "")


def results_csv(results: Mapping[str, Any]) -> str:
    """One row per step: the scores of :data:`CSV_FIELDS`, then ``iou_<class>`` for every class of the
    last step (a class's IoU per step, as in PLOP's per-step CSV): empty before the class is learnt,
    ``nan`` when it is absent from the test masks.  Fractions, like ``results.json``."""
    steps = results.get("steps", [])
    classes = list(steps[-1]["iou_per_class"]) if steps else []
    fields = [*CSV_FIELDS, *[f"iou_{name}" for name in classes]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for s in steps:
        ious = s.get("iou_per_class", {})
        per_class = {f"iou_{name}": ("nan" if ious[name] is None else ious[name]) if name in ious else ""
                     for name in classes}
        writer.writerow({k: s.get(k) for k in CSV_FIELDS} | per_class)
    return buf.getvalue()


def write_results(run_dir: Path, results: Mapping[str, Any]) -> None:
    """Write results.json, results.csv and results.md atomically."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(run_dir / "results.csv", results_csv(results))
    atomic_write_text(run_dir / "results.md", results_markdown(results))


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """``results.json`` of a run, or ``None`` if it is missing or unreadable (the engine rebuilds it
    from the step checkpoints, which hold the metrics)."""
    path = Path(run_dir) / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # missing, a folder, not JSON, not UTF-8, nested without end
        return None
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("step"), int) for s in steps):
        return None
    return data


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per run: old / new / all mIoU after the last step (Markdown)."""
    lines = ["| method | task | training labels | old | new | all | mean over steps |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        last = r["steps"][-1] if r.get("steps") else {}
        task = f"{r.get('task')}{' ov' if r.get('overlap') else ''}"
        lines.append(
            f"| {r.get('label', r.get('method'))} | {task} | {r.get('labels', '-')} | {pct(last.get('miou_old'))} | "
            f"{pct(last.get('miou_new'))} | {pct(last.get('miou_all'))} | {pct(r.get('mean_miou_over_steps'))} |"
        )
    return "\n".join(lines)
