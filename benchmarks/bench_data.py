"""Data pipeline speed, side by side in one process: decoding, augmentation + DataLoader, split indexing.

1. Decoding alone (images/s, best of ``--repeat`` passes over the same
   files): JPEG images with PIL (``ilseg.data.io.read_image``) vs
   torchvision's ``decode_jpeg`` / ``decode_image``; palette-PNG masks with
   PIL (``np.array(Image.open(p))``, and ilseg's checked ``read_mask``) vs
   ``torchvision.io.decode_png(..., ImageReadMode.UNCHANGED)``.  It checks
   (and prints) whether torchvision gives the palette *indices* (the labels)
   like PIL, or colours, and how far its JPEG pixels are from PIL's.
2. Decode + training augmentation (``train_transform`` at the configured
   crop) through the engine's DataLoader of one step's ``SeededItems``
   training set (``ilseg.engine.loaders.training_data``), at each of
   ``--workers``, images/s over the whole run and after the first batch
   (the workers' start-up; the engine keeps them between epochs, so a long
   epoch runs at the second rate).  Next to it the rate one training iteration of the
   config's model and method consumes images (``train_one_epoch`` on random
   tensors, median iteration; or ``--consume-ips``), and whether the
   pipeline would be the bottleneck.
3. Split indexing: ``class_presence`` over the training masks with an empty
   cache folder and again cached, and ``step_image_indices`` for every step
   of the task, cold and cached.

    python benchmarks/bench_data.py                                   # synth-demo, 600 generated images of 64 px
    python benchmarks/bench_data.py --workers 0,1,2 --consume-ips 40
    python benchmarks/bench_data.py --config voc-15-1-disjoint-ilt --data data/VOCdevkit --device cuda --workers 0,4,8

Writes ``benchmarks/results/data-<device>.json``.  "Cold" means an empty ilseg
cache folder, not an empty OS page cache: the files were read before.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_common_options,
    bench_config,
    best_rate,
    print_table,
    save_record,
    seconds,
    sync,
)
from PIL import Image
from torchvision.io import (
    ImageReadMode,
    decode_image,
    decode_jpeg,
    decode_png,
    read_file,
)

from ilseg.config import RunConfig
from ilseg.data import io
from ilseg.data.datasets import SegmentationDataset, build_dataset
from ilseg.data.splits import class_presence, step_image_indices
from ilseg.engine.distributed import DistInfo
from ilseg.engine.loaders import training_data
from ilseg.engine.loop import train_one_epoch
from ilseg.engine.optim import build_optimizer, poly_schedule
from ilseg.methods import build_method
from ilseg.models import fold_batchnorm
from ilseg.placement import Placement, resolve_device
from ilseg.runs.folder import model_from_config, training_task
from ilseg.tasks import Mode, Task, train_lut


# -- 1. decoding -----------------------------------------------------------------------
def pil_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def pil_mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def tv_jpeg(path: Path) -> torch.Tensor:
    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def tv_png(path: Path) -> torch.Tensor:
    return decode_png(read_file(str(path)), ImageReadMode.UNCHANGED)


def same_labels(tv: torch.Tensor, pil: np.ndarray) -> bool:
    """torchvision's ``1xHxW`` output holds exactly PIL's ``HxW`` values (a colour decode has 3 channels)."""
    return tv.shape[0] == 1 and np.array_equal(tv[0].numpy(), pil)


def check_decoders(images: list[Path], masks: list[Path]) -> dict[str, Any]:
    """How torchvision's output compares with PIL's on these files (JPEG pixels, mask labels)."""
    diffs = [np.abs(io.read_image(p).astype(np.int16) - tv_jpeg(p).permute(1, 2, 0).numpy().astype(np.int16))
             for p in images]
    modes = sorted({pil_mode(p) for p in masks})
    same = sum(1 for p in masks if same_labels(tv_png(p), pil_mask(p)))
    if same == len(masks) and "P" in modes:
        verdict = (f"torchvision decode_png(UNCHANGED) returns the palette indices (the labels), not colours: "
                   f"identical to PIL on all {len(masks)} masks (PIL modes {modes}); the PNG comparison is valid")
    elif same == len(masks):
        verdict = (f"the masks have no palette (PIL modes {modes}), so palette handling was not checked; "
                   f"torchvision decode_png(UNCHANGED) gives PIL's values on all {len(masks)}: the comparison is valid")
    else:
        verdict = (f"torchvision decode_png(UNCHANGED) differs from PIL's labels on {len(masks) - same} of "
                   f"{len(masks)} masks (modes {modes}): the PNG comparison is NOT valid")
    return {"mask_modes": modes, "masks_identical": same, "masks_checked": len(masks),
            "png_indices_ok": same == len(masks), "png_verdict": verdict,
            "jpeg_max_abs_diff": int(max(d.max() for d in diffs)),
            "jpeg_mean_abs_diff": float(np.mean([d.mean() for d in diffs]))}


def decode_rates(images: list[Path], masks: list[Path], num_classes: int, repeat: int,
                 device: torch.device) -> list[dict[str, Any]]:
    rows: list[tuple[str, str, Callable[[Path], object], list[Path]]] = [
        ("image", "PIL (ilseg read_image)", io.read_image, images),
        ("image", "torchvision decode_jpeg(read_file)", tv_jpeg, images),
        ("image", "torchvision decode_image(path)", lambda p: decode_image(str(p), mode=ImageReadMode.RGB), images),
        ("mask", "PIL np.array(Image.open)", pil_mask, masks),
        ("mask", "ilseg read_mask (checks + counts)", lambda p: io.read_mask_and_counts(p, num_classes), masks),
        ("mask", "torchvision decode_png(UNCHANGED)", tv_png, masks),
    ]
    out = [{"kind": kind, "decoder": name, "images_per_second": best_rate(fn, files, repeat)}
           for kind, name, fn, files in rows]
    if device.type == "cuda":  # nvjpeg, one batched call (files read on the CPU inside the timing)
        def gpu() -> None:
            decode_jpeg([read_file(str(p)) for p in images], mode=ImageReadMode.RGB, device=device)
        try:
            gpu()
            best = min(seconds(gpu, device) for _ in range(max(1, repeat)))
            out.append({"kind": "image", "decoder": f"torchvision decode_jpeg(device={device.type}, batched)",
                        "images_per_second": len(images) / best})
        except RuntimeError as exc:
            print(f"GPU JPEG decoding failed, left out: {exc}")
    return out


# -- 2. pipeline vs training step ----------------------------------------------------------
def pipeline_rate(cfg: RunConfig, task: Task, step: int, lut: np.ndarray, workers: int,
                  min_images: int) -> dict[str, Any]:
    """Images/s of the engine's training loader over whole epochs (its workers kept between epochs) until
    ``min_images`` images were delivered; also the seconds to the first batch (the workers' start) and
    the rate after it (the steady state a long epoch sees)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=workers))
    data = training_data(cfg, task, step, lut, dist=DistInfo(), progress=False)
    delivered, epoch, first, first_images = 0, 0, math.nan, 0
    t0 = time.perf_counter()
    while delivered < min_images:
        data.set_epoch(epoch)
        for images, _ in data.loader:
            if math.isnan(first):
                first, first_images = time.perf_counter() - t0, images.shape[0]
            delivered += images.shape[0]
        epoch += 1
    total = time.perf_counter() - t0
    return {"workers": workers, "images": delivered, "epochs": epoch, "epoch_images": len(data.dataset),
            "first_batch_s": first, "images_per_second": delivered / total,
            "steady_images_per_second": (delivered - first_images) / max(total - first, 1e-9)}


def consume_rate(cfg: RunConfig, task: Task, step: int, device: torch.device, iters: int, warmup: int) -> float:
    """Images/s one training iteration of step ``step`` consumes: the config's model, method, optimiser,
    batch, crop and placement, placed as the engine places them, on random tensors (no data loading)."""
    torch.manual_seed(0)
    method = build_method(cfg.method)
    model = model_from_config(cfg, task.classifier_sizes(max(step - 1, 0)), pretrained=False)
    setup = method.start_step(model, task, step)
    placement = Placement.for_runtime(cfg.runtime, device)
    if setup.teacher is not None:
        fold_batchnorm(setup.teacher)  # as the engine's place_models does
    for m in (setup.student, setup.teacher):
        if m is not None:
            m.to(device)
            if placement.channels_last:
                m.to(memory_format=torch.channels_last)
    o, crop = cfg.optim, cfg.data.crop_size
    x = torch.randn(o.batch_size, 3, crop, crop)
    y = torch.randint(0, task.num_outputs(step), (o.batch_size, crop, crop))
    batches = [(x, y)] * (warmup + iters)
    opt = build_optimizer(setup.student.parameters(), kind=o.optimizer, lr=1e-4, momentum=o.momentum,
                          nesterov=o.nesterov, weight_decay=o.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if placement.amp == "fp16" and device.type == "cuda" else None
    times: list[float] = []

    def tick(values: dict[str, float], lr: float) -> None:
        sync(device)
        times.append(time.perf_counter())

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_one_epoch(model=setup.student, teacher=setup.teacher, method=method, loader=batches, optimizer=opt,
                    scheduler=poly_schedule(opt, len(batches), o.poly_power), scaler=scaler, placement=placement,
                    step=step, on_iteration=tick)
    durations = np.diff(times[warmup - 1:])  # the timed iterations; the median resists a busy machine's spikes
    return o.batch_size / float(np.median(durations))


def verdict(pipe: float, consume: float, workers: int) -> str:
    if workers == 0:  # loading and training alternate in one process: their times add up
        return f"serial: loading adds {100 * consume / pipe:.0f}% to each iteration"
    if pipe < consume:
        return f"BOTTLENECK: pipeline {consume / pipe:.1f}x too slow"
    return f"not the bottleneck ({pipe / consume:.1f}x headroom)"


# -- 3. split indexing -----------------------------------------------------------------------
def index_times(ds: SegmentationDataset, task: Task, mode: Mode, workers: int, tmp: Path) -> list[dict[str, Any]]:
    """Seconds of ``class_presence`` and of ``step_image_indices`` (all steps), each with an empty cache
    folder of its own and then again (cached)."""
    presence_dir = tempfile.mkdtemp(dir=tmp, prefix="presence-")
    steps_dir = tempfile.mkdtemp(dir=tmp, prefix="steps-")

    def presence() -> None:
        class_presence(ds, workers=workers, cache_dir=presence_dir, progress=False)

    def steps() -> None:
        for t in range(task.num_steps):
            step_image_indices(ds, task, t, mode, cache_dir=steps_dir, workers=workers, progress=False)

    rows = []
    for name, fn in (("class_presence", presence), (f"step_image_indices, all {task.num_steps} steps", steps)):
        cold = seconds(fn)
        rows.append({"what": name, "masks": len(ds), "workers": workers, "cold_s": cold, "cached_s": seconds(fn)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(p)
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to compare (comma list)")
    p.add_argument("--step", type=int, default=None,
                   help="the step whose training set is loaded and trained (default 1, or 0 for a one-step task)")
    p.add_argument("--decode-files", type=int, default=300, help="images and masks decoded in part 1")
    p.add_argument("--repeat", type=int, default=3, help="decoding passes; the best is kept")
    p.add_argument("--pipeline-images", type=int, default=512,
                   help="images each loader delivers (whole epochs, at least this many)")
    p.add_argument("--consume-ips", type=float, default=None,
                   help="images/s a training step consumes; default: measure it on random tensors")
    p.add_argument("--iters", type=int, default=5,
                   help="timed training iterations for the consumption rate (their median is used)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training iterations before them (>= 1)")
    p.add_argument("--index-masks", type=int, default=0, help="training masks indexed in part 3 (0: all)")
    p.add_argument("--index-workers", type=int, default=None, help="processes reading masks (default data.workers)")
    args = p.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="ilseg-bench-data-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = bench_config(args, tmp)
        task = training_task(cfg)
        step = args.step if args.step is not None else min(1, task.num_steps - 1)
        mode: Mode = "overlap" if cfg.data.overlap else "disjoint"
        train = build_dataset(cfg.data.dataset, cfg.data.root, "train")
        print(f"{cfg.name}: {cfg.data.dataset} {task.name} {mode}, {len(train)} training images in {cfg.data.root}; "
              f"step {step}, crop {cfg.data.crop_size}, batch {cfg.optim.batch_size}, model on {device}", flush=True)

        n = min(args.decode_files, len(train))
        images, masks = train.images[:n], train.masks[:n]
        check = check_decoders(images, masks)
        decode = decode_rates(images, masks, train.num_classes, args.repeat, device)
        print(f"\n1. decoding alone, {n} files, best of {args.repeat} passes")
        print_table(["file", "decoder", "files/s"],
                    [[r["kind"], r["decoder"], f"{r['images_per_second']:.0f}"] for r in decode], left=(0, 1))
        print(check["png_verdict"])
        print(f"JPEG: torchvision vs PIL pixels differ by at most {check['jpeg_max_abs_diff']} grey levels "
              f"(mean {check['jpeg_mean_abs_diff']:.3f})", flush=True)

        if args.consume_ips is not None:
            consume, how = args.consume_ips, "given with --consume-ips"
        else:
            consume = consume_rate(cfg, task, step, device, args.iters, max(1, args.warmup))
            how = (f"measured: {cfg.method.name} step {step}, median of {args.iters} iterations on random tensors, "
                   f"{device}")
        lut = train_lut(task, step, keep_old=cfg.method.keep_old_labels)
        index_workers = args.index_workers if args.index_workers is not None else cfg.data.workers
        # Fill the split cache the loaders' training_data reads (untimed here; part 3 times it).
        step_image_indices(train, task, step, mode, cache_dir=cfg.data.cache_dir, workers=index_workers,
                           progress=False)
        pipeline = []
        for w in [int(v) for v in args.workers.split(",")]:
            row = pipeline_rate(cfg, task, step, lut, w, args.pipeline_images)
            row["bottleneck"] = row["steady_images_per_second"] < consume
            row["verdict"] = verdict(row["steady_images_per_second"], consume, w)
            pipeline.append(row)
        print(f"\n2. decode + train_transform({cfg.data.crop_size}) through the step-{step} DataLoader "
              f"({pipeline[0]['epoch_images']} images per epoch, workers kept between epochs) "
              f"vs a training step consuming {consume:.1f} img/s ({how})")
        print_table(["workers", "img/s", "after 1st batch", "1st batch s", "vs training step"],
                    [[r["workers"], f"{r['images_per_second']:.0f}", f"{r['steady_images_per_second']:.0f}",
                      f"{r['first_batch_s']:.2f}", r["verdict"]] for r in pipeline], left=(0, 4))
        if device.type == "cpu":
            print("(CPU training: the loader's workers and the step share the same cores, so headroom is an "
                  "upper bound)")

        index_set = train.subset(range(args.index_masks)) if 0 < args.index_masks < len(train) else train
        index = index_times(index_set, task, mode, index_workers, tmp)
        print(f"\n3. split indexing ({len(index_set)} masks, {index_workers} workers; cold = empty cache folder)")
        print_table(["what", "cold s", "cached s", "cold / cached"],
                    [[r["what"], f"{r['cold_s']:.3f}", f"{r['cached_s']:.4f}", f"{r['cold_s'] / r['cached_s']:.0f}x"]
                     for r in index])

        results = {"step": step, "decode_files": n, "decode": decode, "decode_check": check,
                   "consume_images_per_second": consume, "consume_source": how, "pipeline": pipeline,
                   "indexing": index}
        path = save_record(args, cfg, "data", device, results)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
