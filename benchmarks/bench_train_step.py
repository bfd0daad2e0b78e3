"""Training-iteration speed (and CUDA peak memory) of an ILT step, side by side.

Measures one incremental step's iteration (teacher forward under
inference_mode + student forward/backward with the ILT loss + SGD step) for
several variants in the same process, so their ratios are comparable:
memory format (contiguous vs channels_last) and precision (fp32 vs bf16
autocast).  Prints a table and writes JSON.

    python benchmarks/bench_train_step.py --device cpu --backbone resnet18 --width 32 --size 64 --batch 8
    python benchmarks/bench_train_step.py --device cuda --backbone resnet101 --size 512 --batch 12
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from ilseg.engine.loop import Precision, build_optimizer, poly_schedule, train_one_epoch
from ilseg.methods import METHOD_PRESETS, build_method
from ilseg.models import build_segmenter, copy_for_teacher


def measure(args: argparse.Namespace, amp: str, channels_last: bool) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    teacher_src = build_segmenter(backbone=args.backbone, output_stride=args.output_stride,
                                  head_channels=args.head, backbone_width=args.width, classes_per_step=[16])
    teacher = copy_for_teacher(teacher_src).to(device)
    model = teacher_src
    model.add_step(1)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    method = build_method(METHOD_PRESETS["ilt"])
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 17, (args.batch, args.size, args.size))
    batches = [(x, y)] * (args.warmup + args.iters)
    opt = build_optimizer(model.parameters(), kind="sgd", lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = poly_schedule(opt, len(batches), 0.9)
    precision = Precision(device, amp, channels_last)
    times: list[float] = []

    def tick(values, lr):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    train_one_epoch(model=model, teacher=teacher, method=method, loader=batches, optimizer=opt, scheduler=sched,
                    scaler=None, precision=precision, step=1, on_iteration=tick)
    timed = times[args.warmup:]
    per_iter = (timed[-1] - times[args.warmup - 1]) / len(timed) if args.warmup else (timed[-1] - start) / len(timed)
    out = {"amp": amp, "channels_last": channels_last, "seconds_per_iter": per_iter,
           "images_per_second": args.batch / per_iter}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--head", type=int, default=256)
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="fp32,fp32-cl,bf16,bf16-cl")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    rows = []
    for v in args.variants.split(","):
        amp = "bf16" if v.startswith("bf16") else "none"
        rows.append(measure(args, amp, v.endswith("-cl")))
        r = rows[-1]
        mem = f", peak {r['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in r else ""
        print(f"{v:<8} {r['images_per_second']:8.1f} img/s  {1000 * r['seconds_per_iter']:8.1f} ms/iter{mem}",
              flush=True)
    base = rows[0]["images_per_second"]
    for v, r in zip(args.variants.split(","), rows):
        r["variant"] = v
        r["speed_vs_first"] = r["images_per_second"] / base
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    record = {"benchmark": "train_step", "date": datetime.date.today().isoformat(), "device": device_name,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_step-{args.device}-{args.backbone}-{args.size}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
