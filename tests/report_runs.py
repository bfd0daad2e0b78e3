"""Finished run folders of published tasks at their real sizes, written by hand (no training), for reports.

``make_task_run(path, "voc-15-1-ov-ilt", "ilt", seed=0)`` writes what ``ilseg report`` reads of a finished
run (``config.yaml`` as ``ilseg train`` writes it, ``results.json`` with every step): VOC 15-1 is 21
classes x 6 steps, ADE20k 100-5 151 x 11.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ilseg.config import dump_config, load_config, preset_dir


def make_task_run(path: Path, preset: str, method: str, seed: int, *, quality: float = 0.6) -> Path:
    """A finished run of ``preset``'s task with seeded IoUs.

    Each class starts near ``quality`` when it is learnt and keeps 80 % of
    its IoU at every later step (forgetting); about one class in 30 is absent
    from the test masks at every other step.
    """
    cfg = load_config(preset_dir() / f"{preset}.yaml", [f"method.name={method}", f"runtime.seed={seed}",
                                                         f"data.root={path}"])
    task = cfg.build_task()
    rng = random.Random(f"{preset}-{method}-{seed}")
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(cfg))
    start = {c: min(0.95, max(0.02, rng.gauss(quality, 0.15))) for c in task.order}
    absent = set(random.Random(preset).sample(list(task.order[1:]), max(1, len(task.order) // 30)))
    learnt_at = {c: t for t in reversed(range(task.num_steps)) for c in task.order[:task.num_outputs(t)]}
    rows = []
    for t in range(task.num_steps):
        seen = task.order[:task.num_outputs(t)]
        ious = {task.class_names[c]: None if c in absent and t % 2 == 0 else
                max(0.0, start[c] * 0.8 ** (t - learnt_at[c]) + rng.uniform(-0.03, 0.03)) for c in seen}
        values = list(ious.values())
        old = [v for v in values[:task.step_sizes[0]] if v is not None]
        new = [v for v in values[task.step_sizes[0]:] if v is not None]
        kept = [v for v in values if v is not None]
        rows.append({"step": t, "classes_seen": len(seen), "miou_old": sum(old) / len(old),
                     "miou_new": sum(new) / len(new) if new else None, "miou_all": sum(kept) / len(kept),
                     "miou_old_fg": None, "pixel_accuracy": 0.8, "mean_class_accuracy": 0.6, "iou_per_class": ious})
    results = {"method": method, "dataset": task.dataset, "task": task.name, "overlap": cfg.data.overlap,
               "order": list(task.order), "step_sizes": list(task.step_sizes), "labels": "current step",
               "steps": rows}
    (path / "results.json").write_text(json.dumps(results))
    return path
