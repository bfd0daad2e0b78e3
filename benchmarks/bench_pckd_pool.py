"""RCIL's spatial pooling (six box windows, 4..24) done directly and as a column then a row average, side by side.

Forward and backward of the six poolings on one map of the size of a ResNet's layer1 at a 512 crop (256 x 128 x
128), each way in turn, ``--rounds`` times; prints the times and the largest difference and saves JSON::

    python benchmarks/bench_pckd_pool.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ilseg.methods.rcil import PCKD_SCALES, box_average


def direct(x: torch.Tensor) -> list[torch.Tensor]:
    return [F.avg_pool2d(x, k, stride=1, padding=k // 2) for k in PCKD_SCALES]


def separable(x: torch.Tensor) -> list[torch.Tensor]:
    return [box_average(x, k) for k in PCKD_SCALES]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    x = torch.randn(1, args.channels, args.size, args.size, device=args.device, requires_grad=True)
    times: dict[str, list[float]] = {"direct": [], "separable": []}
    for _ in range(args.rounds):
        for name, fn in (("direct", direct), ("separable", separable)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sum(m.sum() for m in fn(x)).backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(direct(x), separable(x), strict=True))
    result = {"device": args.device, "map": [args.channels, args.size, args.size], "threads": torch.get_num_threads(),
              "median_s": {k: statistics.median(v) for k, v in times.items()}, "max_abs_difference": diff}
    result["speedup"] = result["median_s"]["direct"] / result["median_s"]["separable"]
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"pckd_pool-{args.device}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
