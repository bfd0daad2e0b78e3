"""One training iteration, method against method and fast against plain, side by side.

Variants: fine-tuning and ILT (teacher forward, student forward and backward,
every loss term, optimiser step), each done

* ``plain``: fp32 (on CUDA strictly: no TF32, unless ``--plain-tf32``),
  contiguous, teacher under ``no_grad`` with its BNs, the textbook losses,
  per-parameter SGD (:mod:`plain`);
* ``fast``: what ``ilseg train`` runs: ``runtime`` "auto" placement and
  memory format (bf16 + channels_last on CUDA, fp32 on the CPU), the teacher
  under ``inference_mode`` with its BNs folded into its convolutions, the
  methods' losses, fused SGD.

Times are interleaved (every variant once per round, median over rounds), so
their ratios come from one run.  Also printed: model FLOPs per image
(``torch.utils.flop_counter``: student forward + backward, plus the teacher's
forward for ILT) and the achieved fraction of the device's measured matmul
throughput (bf16 on CUDA, fp32 on the CPU); peak memory per variant
(``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak resident
memory of a fresh subprocess per variant, ``--memory``); and the projected
wall time of the full VOC 15-1 and ADE20k 100-50 ILT recipes at the measured
rates (meaningful when run at the recipe's model and crop).

    python benchmarks/bench_train_step.py --device cpu --backbone resnet18 --width 32 --head 64 --size 64 --batch 8 --memory
    python benchmarks/bench_train_step.py --device cuda --backbone resnet101 --size 512 --batch 12 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from plain import has_plain_twin, plain_iteration, plain_sgd
from torch.utils.flop_counter import FlopCounterMode

from ilseg.config import RuntimeConfig
from ilseg.engine.loop import train_one_epoch
from ilseg.engine.optim import build_optimizer, poly_schedule
from ilseg.engine.step import CompiledOrEager
from ilseg.methods import METHOD_PRESETS, Method, build_method
from ilseg.models import IncrementalSegmenter, build_segmenter, copy_for_teacher, fold_batchnorm
from ilseg.placement import Placement
from ilseg.tasks import get_task

OLD_CLASSES, NEW_CLASSES = 16, 1  # VOC 15-1 at step 1
# Training images per step of the recipes (VOC 15-1 overlapped: MiB's published counts; ADE20k 100-50:
# not published, so an upper bound: all 20,210 training images at every step) and epochs per step.
PROTOCOLS = {
    "VOC 15-1 ov (30 epochs/step)": ([9568, 487, 299, 491, 500, 548], 30),
    "ADE20k 100-50 (60 epochs/step, <= 20,210 images/step)": ([20210, 20210], 60),
}
RECIPE_BATCH = 24


def make_variant(args: argparse.Namespace, method: str, mode: str) -> Callable[[int], None]:
    """A function that runs ``n`` iterations of ``method`` done the ``mode`` way.

    ``mode`` is ``plain``, ``fast`` or ``compiled`` (``fast`` with the student
    under ``torch.compile``, as ``runtime.compile: true`` trains it).
    """
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = METHOD_PRESETS[method]
    model = build_segmenter(backbone=args.backbone, output_stride=args.output_stride, head_channels=args.head,
                            backbone_width=args.width, classes_per_step=[OLD_CLASSES])
    teacher = copy_for_teacher(model) if build_method(cfg).needs_teacher else None
    model.add_step(NEW_CLASSES)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    target = torch.randint(0, OLD_CLASSES + NEW_CLASSES, (args.batch, args.size, args.size), generator=g).to(device)
    if mode == "plain":
        model.to(device)
        if teacher is not None:
            teacher.to(device)
        plain_opt = plain_sgd(list(model.parameters()), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)

        def run_plain(n: int) -> None:
            with strict_fp32(device.type == "cuda" and not args.plain_tf32):
                for _ in range(n):
                    plain_iteration(model, teacher, cfg, images, target, plain_opt, 1)
        return run_plain
    placement = Placement.for_runtime(RuntimeConfig(), device)
    method_obj = build_method(cfg)
    model, teacher = method_step_one(method_obj, args, images, target)  # the method's own model, teacher, taps
    if teacher is not None:
        fold_batchnorm(teacher)
    for m in (model, teacher):
        if m is not None:
            m.to(device)
            if placement.channels_last:
                m.to(memory_format=torch.channels_last)
    if method_obj.prepares_previous(1) or method_obj.prepares(1):  # the passes of the teacher before training
        assert teacher is not None  # (REMINDER's prototypes, PLOP's thresholds ...), over the one batch
        with torch.no_grad():
            out = teacher(images)
        batch = {**out, "logits": out["logits"].float()}
        if method_obj.prepares_previous(1):
            method_obj.prepare_previous([(batch, target.clamp_max(OLD_CLASSES - 1))], 1)
        if method_obj.prepares(1):
            method_obj.prepare([(batch, target)], 1)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], kind="sgd", lr=1e-3, momentum=0.9,
                          nesterov=True, weight_decay=1e-4)
    sched = poly_schedule(opt, 10**9, 0.9)
    train_model: torch.nn.Module = model
    if mode == "compiled":
        train_model = CompiledOrEager(model, log=lambda line: print(f"{method}:{mode}: {line}", flush=True))

    def run(n: int) -> None:
        train_one_epoch(model=train_model, teacher=teacher, method=method_obj, loader=[(images, target)] * n,
                        optimizer=opt, scheduler=sched, scaler=None, placement=placement, step=1)
    return run


def method_step_one(method: Method, args: argparse.Namespace, images: torch.Tensor,
                    target: torch.Tensor) -> tuple[IncrementalSegmenter, IncrementalSegmenter | None]:
    """Step 1 of VOC 15-1 (16 old outputs, 1 new) as ``method`` sets it up: its model (``adapt_model``), one
    step-0 batch through the method (the state it keeps from step 0: SDR's prototypes), then the previous model
    as teacher and the maps it taps (``start_step``), in the same random state for every method."""
    torch.manual_seed(0)
    task = get_task("voc", "15-1")
    model = build_segmenter(backbone=args.backbone, output_stride=args.output_stride, head_channels=args.head,
                            backbone_width=args.width, classes_per_step=[OLD_CLASSES])
    method.adapt_model(model)
    step0 = method.start_step(model, task, 0).student
    with torch.no_grad():
        method(step0(images.cpu()), None, target.cpu().clamp_max(OLD_CLASSES - 1), 0)
    setup = method.start_step(step0, task, 1)
    return setup.student, setup.teacher


@contextlib.contextmanager
def strict_fp32(on: bool) -> Iterator[None]:
    """Full fp32 convolutions and matmuls on CUDA (no TF32) while the plain variant runs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if on:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """Median seconds per iteration of each variant, measured round-robin.

    On CUDA each variant is built and warmed up (cuDNN autotuning, allocator,
    compilation) in turn, so its memory is everything it allocated itself:
    ``max_memory_allocated`` over one iteration after the warm-up minus what
    was allocated before it was built (weights, gradients, optimiser state, teacher and
    activations; the other variants' weights are excluded).
    """
    cuda = args.device.startswith("cuda")
    runs: dict[str, Callable[[int], None]] = {}
    memory: dict[str, float] = {}
    warmup_s: dict[str, float] = {}
    for name in names:
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        runs[name] = make_variant(args, *name.split(":"))
        runs[name](args.warmup)
        synchronize(args.device)
        warmup_s[name] = time.perf_counter() - start
        if cuda:  # one more iteration after the warm-up: cuDNN's autotuning workspaces are not counted
            torch.cuda.reset_peak_memory_stats()
            runs[name](1)
            torch.cuda.synchronize()
            memory[name] = (torch.cuda.max_memory_allocated() - before) / 2**30
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, run in runs.items():
            synchronize(args.device)
            start = time.perf_counter()
            run(args.iters)
            synchronize(args.device)
            samples[name].append((time.perf_counter() - start) / args.iters)
    out = {}
    for name in names:
        seconds = statistics.median(samples[name])
        out[name] = {"seconds_per_iter": seconds, "images_per_second": args.batch / seconds,
                     "rounds": [round(s, 5) for s in samples[name]], "build_and_warmup_s": warmup_s[name]}
        if name in memory:
            out[name]["peak_memory_gib"] = memory[name]
    return out


def flops_per_image(args: argparse.Namespace, method: str) -> float:
    """Model FLOPs of one iteration (forward, backward, teacher forward) per image: the plain one, or the
    method's own for a method with no plain twin (PLOP and the methods of issue 23)."""
    run = make_variant(args, method, "plain" if has_plain_twin(METHOD_PRESETS[method]) else "fast")
    counter = FlopCounterMode(display=False)
    with counter:
        run(1)
    return counter.get_total_flops() / args.batch


def matmul_peak(device: str) -> tuple[float, str]:
    """Measured matmul throughput of this device (FLOP/s): bf16 on CUDA, fp32 on the CPU."""
    n, dtype, label = (8192, torch.bfloat16, "bf16 matmul") if device.startswith("cuda") else \
        (2048, torch.float32, "fp32 matmul")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    reps = 20 if device.startswith("cuda") else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start), label


def cpu_memory(args: argparse.Namespace, name: str) -> dict[str, float]:
    """Peak resident memory (MiB) of a fresh process that builds and runs only ``name``."""
    cmd = [sys.executable, __file__, "--only", name, *sys.argv[1:]]
    cmd = [c for c in cmd if c != "--memory"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def only(args: argparse.Namespace) -> None:
    """Child process of ``--memory``: build one variant, run it, print its resident memory."""
    run = make_variant(args, *args.only.split(":"))
    setup = _current_rss_mib()  # model, teacher, batch in memory; nothing run yet
    run(args.warmup + 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"setup_rss_mib": setup, "peak_rss_mib": peak, "iteration_rss_mib": max(0.0, peak - setup)}))


def _current_rss_mib() -> float:
    """Resident memory now (Linux ``/proc/self/statm``), not the peak so far."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def projections(rates: dict[str, float]) -> dict[str, float]:
    """Hours of training for each protocol at the fast rates (step 0 fine-tunes, later steps distil)."""
    hours = {}
    for name, (counts, epochs) in PROTOCOLS.items():
        seconds = 0.0
        for step, count in enumerate(counts):
            images = (count // RECIPE_BATCH) * RECIPE_BATCH * epochs
            seconds += images / rates["finetune:fast" if step == 0 else "ilt:fast"]
        hours[name] = seconds / 3600
    return hours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--head", type=int, default=256)
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="iterations per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="CPU: peak RSS of a fresh process per variant")
    p.add_argument("--compile", action="store_true",
                   help="also time fine-tuning and ILT with the student under torch.compile (runtime.compile)")
    p.add_argument("--variants", default="finetune:plain,finetune:fast,ilt:plain,ilt:fast",
                   help="comma list of METHOD:MODE (modes plain, fast, compiled)")
    p.add_argument("--plain-tf32", action="store_true",
                   help="CUDA: the plain variant with torch's default TF32 convolutions (default: strict fp32)")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.only:
        only(args)
        return
    names = args.variants.split(",")
    if args.compile:
        names += [f"{m}:compiled" for m in ("finetune", "ilt") if f"{m}:fast" in names]
    if args.device.startswith("cuda"):
        # What `ilseg train` sets on CUDA; a process-wide switch, so the plain variants get it too.
        torch.backends.cudnn.benchmark = True
    timed = time_variants(args, names)
    methods = sorted({name.split(":")[0] for name in names})
    flops = {m: flops_per_image(args, m) for m in methods}
    peak, peak_label = matmul_peak(args.device)
    for name, row in timed.items():
        method = name.split(":")[0]
        row["gflops_per_image"] = flops[method] / 1e9
        row["fraction_of_peak"] = flops[method] * row["images_per_second"] / peak
        if args.memory and not args.device.startswith("cuda"):
            row.update(cpu_memory(args, name))
    memory_key = "peak_memory_gib" if args.device.startswith("cuda") else "iteration_rss_mib"
    ratios = {}
    for mode in ("fast", "plain", "compiled"):
        a, b = timed.get(f"ilt:{mode}"), timed.get(f"finetune:{mode}")
        if a and b:
            ratios[f"ilt_vs_finetune_time ({mode})"] = a["seconds_per_iter"] / b["seconds_per_iter"]
            if a.get(memory_key) and b.get(memory_key):
                ratios[f"ilt_vs_finetune_memory ({mode})"] = a[memory_key] / b[memory_key]
    for method in methods:
        for mode in ("fast", "compiled"):
            a, b = timed.get(f"{method}:{mode}"), timed.get(f"{method}:{'plain' if mode == 'fast' else 'fast'}")
            if a and b:
                label = "fast_vs_plain_speed" if mode == "fast" else "compiled_vs_fast_speed"
                ratios[f"{label} ({method})"] = a["images_per_second"] / b["images_per_second"]
    if len(flops) == 2:
        ratios["ilt_vs_finetune_flops"] = flops["ilt"] / flops["finetune"]
    hours = projections({n: timed[n]["images_per_second"] for n in names}) if {"finetune:fast", "ilt:fast"} <= set(names) else {}

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "cpu")
    print(f"{device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.backbone} "
          f"(width {args.width}, head {args.head}, OS {args.output_stride}), {args.size}x{args.size}, batch {args.batch}")
    print(f"measured {peak_label}: {peak / 1e9:.1f} GFLOP/s (model FLOPs count every convolution directly; "
          "the CPU's oneDNN computes 3x3 convolutions with fewer (Winograd), so more than 100% is possible there)")
    for name, row in timed.items():
        mem = ""
        if "peak_memory_gib" in row:
            mem = f"  memory {row['peak_memory_gib']:.2f} GiB"
        elif "peak_rss_mib" in row:
            mem = f"  RSS peak {row['peak_rss_mib']:.0f} MiB (+{row['iteration_rss_mib']:.0f} over setup)"
        print(f"{name:<15} {row['images_per_second']:8.2f} img/s  {1000 * row['seconds_per_iter']:9.1f} ms/iter  "
              f"{row['gflops_per_image']:7.2f} GFLOP/img  {100 * row['fraction_of_peak']:5.1f}% of peak{mem}"
              f"  (built + warm-up {row['build_and_warmup_s']:.0f} s)")
    for k, v in ratios.items():
        print(f"{k:<32} {v:.3f}")
    for k, v in hours.items():
        print(f"projected {k}: {v:.1f} h at these rates")
    record = {"benchmark": "train_step", "date": datetime.date.today().isoformat(), "device": device_name,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "matmul_peak_flops": peak,
              "matmul_peak_kind": peak_label, "config": {k: v for k, v in vars(args).items() if k not in ("out", "only")},
              "results": timed, "ratios": ratios, "projected_hours": hours}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("-compile" if args.compile else "") + ("-plaintf32" if args.plain_tf32 else "")
    path = out / f"train_step-{args.device.split(':')[0]}-{args.backbone}-w{args.width}-{args.size}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
