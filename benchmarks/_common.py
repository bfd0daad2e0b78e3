"""What ``bench_data.py`` and ``bench_eval.py`` share: options, config and data, timing, table, JSON."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision

from ilseg.config import RunConfig, load_config, resolve_config_path
from ilseg.data.synth import generate_synth


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="synth-demo", help="bundled preset name or YAML path (default synth-demo)")
    p.add_argument("--data", default=None,
                   help="dataset root; default: the config's root, or for the synthetic dataset a new one "
                        "generated in a temporary folder")
    p.add_argument("--num-images", type=int, default=600, help="images of the generated synthetic dataset")
    p.add_argument("--size", type=int, default=64, help="side in pixels of the generated synthetic images")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set data.crop_size=512 (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (auto: CUDA when there is one)")
    p.add_argument("--out", default="benchmarks/results", help="folder of the JSON result")


def bench_config(args: argparse.Namespace, tmp: Path) -> RunConfig:
    """The config of ``--config``/``--set`` with its data root resolved (synthetic data generated if needed)
    and the split cache in ``tmp`` (nothing is written to the user's cache)."""
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    root = args.data
    if root is None and cfg.data.dataset == "synth":
        root = str(tmp / "synth")
        start = time.perf_counter()
        generate_synth(root, seed=0, num_images=args.num_images, size=args.size)
        print(f"generated {args.num_images} synthetic images of {args.size} px in {root} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    data = dataclasses.replace(cfg.data, root=root or cfg.data.root, cache_dir=str(tmp / "cache"))
    return dataclasses.replace(cfg, data=data)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Wall-clock seconds of one call of ``fn`` (the device synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_rate(fn: Callable[[Any], object], items: Sequence[Any], repeat: int,
              device: torch.device = torch.device("cpu")) -> float:
    """Items per second of ``fn`` over ``items``: one warm-up pass, then the best of ``repeat`` passes."""
    def run() -> None:
        for item in items:
            fn(item)

    run()
    return len(items) / min(seconds(run, device) for _ in range(max(1, repeat)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: Sequence[int] = (0,)) -> None:
    """Columns padded to their widest cell; the columns ``left`` left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(padded).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def save_record(args: argparse.Namespace, cfg: RunConfig, benchmark: str, device: torch.device,
                results: dict[str, Any]) -> Path:
    """Write ``<out>/<benchmark>-<device type>.json`` with the date, machine, versions, options and results."""
    record = {"benchmark": benchmark, "date": datetime.date.today().isoformat(), "device": device_name(device),
              "torch": torch.__version__, "torchvision": torchvision.__version__,
              "threads": torch.get_num_threads(),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "run_config": cfg.to_dict(),
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}-{device.type}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
