"""Evaluation speed: images/s of ``ilseg.engine.loop.evaluate``, and the confusion-matrix update's share of it.

For the config's model after ``--step`` (default: the last step, all
classifiers; random weights, since speed does not depend on them) on the test
split, at each batch size of ``--batch`` (default: the batch the engine uses,
and ``eval.batch_size`` if that differs: the engine batches when the test
images share one size, ``ilseg.engine.loaders.eval_batch_size``), side by side:

* ``evaluate`` with the engine's loader (read + eval transform + forward +
  argmax + ``ConfusionMatrix.update``), images/s over the whole split;
* ``evaluate`` on the same batches already in memory (no data loading);
* forward + argmax alone, ms per image;
* ``ConfusionMatrix.update`` alone on random predictions and targets of the
  same shape and classes (5% of targets 255), ms per image, and as a
  percentage of the evaluation time per image.

Timings are the best of ``--repeat`` passes.

    python benchmarks/bench_eval.py                                   # synth-demo, 600 generated images of 64 px
    python benchmarks/bench_eval.py --batch 1,8,32
    python benchmarks/bench_eval.py --config voc-15-1-disjoint-ilt --data data/VOCdevkit --device cuda --max-images 500

Writes ``benchmarks/results/eval-<device>.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import add_common_options, bench_config, print_table, save_record, seconds
from torch import nn

from ilseg.config import RunConfig
from ilseg.data.datasets import SegmentationDataset
from ilseg.engine.loaders import eval_batch_size, eval_dataset, make_loader
from ilseg.engine.loop import evaluate
from ilseg.metrics import ConfusionMatrix
from ilseg.placement import Placement, resolve_device
from ilseg.runs.folder import model_from_config, training_task
from ilseg.tasks import IGNORE_INDEX

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def first_batches(loader: torch.utils.data.DataLoader, images: int) -> Batches:
    """The loader's first batches, at least ``images`` images (or all of them), kept in memory."""
    out: Batches = []
    for x, y in loader:
        out.append((x, y))
        if sum(b[0].shape[0] for b in out) >= images:
            break
    return out


def random_pairs(batches: Batches, num_classes: int, device: torch.device) -> Batches:
    """Random predictions and targets of the batches' target shapes on ``device`` (5% of targets 255)."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _, y in batches:
        pred = torch.randint(0, num_classes, y.shape, generator=g)
        target = torch.randint(0, num_classes, y.shape, generator=g)
        target[torch.rand(y.shape, generator=g) < 0.05] = IGNORE_INDEX
        pairs.append((pred.to(device), target.to(device)))
    return pairs


def measure(cfg: RunConfig, model: nn.Module, ds: SegmentationDataset, num_classes: int, placement: Placement,
            batch: int, memory_images: int, repeat: int) -> dict[str, Any]:
    device = placement.device
    loader = make_loader(ds, batch_size=batch, workers=cfg.data.workers)
    memory = first_batches(loader, memory_images)
    n_memory = sum(x.shape[0] for x, _ in memory)
    pairs = random_pairs(memory, num_classes, device)

    def forward() -> None:
        with torch.inference_mode(), placement.autocast():
            for x, _ in memory:
                model(placement.images(x))["logits"].argmax(1)

    def cm_update() -> None:
        cm = ConfusionMatrix(num_classes, device=device)
        for pred, target in pairs:
            cm.update(pred, target)

    def best(fn: Callable[[], object]) -> float:
        return min(seconds(fn, device) for _ in range(max(1, repeat)))

    evaluate(model, memory[:2], num_classes, placement)  # warm-up (allocator, cuDNN autotuning)
    per_image = {
        "evaluate_loader": best(lambda: evaluate(model, loader, num_classes, placement)) / len(ds),
        "evaluate_memory": best(lambda: evaluate(model, memory, num_classes, placement)) / n_memory,
        "forward_argmax": best(forward) / n_memory,
        "cm_update": best(cm_update) / n_memory,
    }
    return {"batch": batch, "images": len(ds), "memory_images": n_memory,
            "ms_per_image": {k: 1000 * v for k, v in per_image.items()},
            "evaluate_images_per_second": 1 / per_image["evaluate_loader"],
            "evaluate_memory_images_per_second": 1 / per_image["evaluate_memory"],
            "cm_percent_of_evaluate": 100 * per_image["cm_update"] / per_image["evaluate_loader"],
            "cm_percent_of_forward": 100 * per_image["cm_update"] / per_image["forward_argmax"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(p)
    p.add_argument("--step", type=int, default=None, help="evaluate the model after this step (default: the last)")
    p.add_argument("--batch", default=None,
                   help="eval batch sizes (comma list); default: the engine's and eval.batch_size")
    p.add_argument("--max-images", type=int, default=0, help="test images evaluated (0: the whole split)")
    p.add_argument("--memory-images", type=int, default=128,
                   help="images kept in memory for the forward / confusion-matrix timings")
    p.add_argument("--repeat", type=int, default=2, help="passes per timing; the best is kept")
    args = p.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="ilseg-bench-eval-") as tmp:
        cfg = bench_config(args, Path(tmp))
        task = training_task(cfg)
        step = args.step if args.step is not None else task.num_steps - 1
        num_classes = task.num_outputs(step)
        ds = eval_dataset(cfg, task, step)
        if 0 < args.max_images < len(ds):
            ds = ds.subset(range(args.max_images))
        placement = Placement.for_runtime(cfg.runtime, device)
        torch.manual_seed(0)
        model = model_from_config(cfg, task.classifier_sizes(step), pretrained=False).to(device)
        if placement.channels_last:
            model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the engine does
        default = sorted({eval_batch_size(cfg, ds), cfg.eval.batch_size})
        batches = [int(b) for b in args.batch.split(",")] if args.batch else default
        m = cfg.model
        print(f"{cfg.name}: {len(ds)} test images of {cfg.data.dataset} ({cfg.data.root}), test_size "
              f"{cfg.data.test_size}, crop {cfg.data.test_crop}; {m.backbone} width {m.width} OS {m.output_stride}, "
              f"{num_classes} classes after step {step}; {device}, amp {placement.amp}, channels_last "
              f"{placement.channels_last}; the engine evaluates at batch {eval_batch_size(cfg, ds)}", flush=True)
        rows = []
        for b in batches:
            try:
                rows.append(measure(cfg, model, ds, num_classes, placement, b, args.memory_images, args.repeat))
            except RuntimeError as exc:  # default_collate cannot stack images of different sizes
                print(f"batch {b}: skipped ({str(exc).splitlines()[0]})")
        print()
        print_table(["batch", "evaluate img/s", "in memory img/s", "forward ms/img", "CM update ms/img",
                     "CM % of evaluate"],
                    [[r["batch"], f"{r['evaluate_images_per_second']:.1f}",
                      f"{r['evaluate_memory_images_per_second']:.1f}", f"{r['ms_per_image']['forward_argmax']:.3f}",
                      f"{r['ms_per_image']['cm_update']:.4f}", f"{r['cm_percent_of_evaluate']:.2f}%"] for r in rows])
        results = {"step": step, "num_classes": num_classes, "engine_batch": eval_batch_size(cfg, ds),
                   "amp": placement.amp, "channels_last": placement.channels_last, "batches": rows}
        path = save_record(args, cfg, "eval", device, results)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
