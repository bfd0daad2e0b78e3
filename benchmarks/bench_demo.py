"""Wall-clock time of ``ilseg demo`` from an empty folder, plus its table.

    python benchmarks/bench_demo.py --out /tmp/ilseg-demo-bench
    python benchmarks/bench_demo.py --seeds 0,1,2      # mean +- std over data and training seeds

Deletes ``--out`` first, runs the demo exactly as the README's first command
does (dataset generation included), and writes
``benchmarks/results/demo.json`` with the time, the machine and the final
old / new / all mIoU of every method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from ilseg.demo import run_demo
from ilseg.report import read_results


def demo_once(out: Path, seed: int) -> tuple[float, dict[str, dict[str, float]]]:
    """Run the demo from an empty ``out`` with ``seed``; its seconds and each method's scores."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run_demo(out, quiet=True, seed=seed)
    seconds = time.perf_counter() - start
    methods = {}
    for run in sorted((out / "runs").iterdir()):
        res = read_results(run)
        assert res is not None, f"{run} has no results"
        last = res["steps"][-1]
        methods[run.name] = {k: last[k] for k in ("miou_old", "miou_new", "miou_all")}
        methods[run.name]["step0_miou"] = res["steps"][0]["miou_all"]
    return seconds, methods


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/ilseg-demo-bench")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--seeds", default="0", help="comma list; several give mean +- std per method (demo-seeds.json)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    path = Path(args.results)
    path.mkdir(parents=True, exist_ok=True)
    base = {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    runs = {seed: demo_once(Path(args.out) / f"seed-{seed}", seed) for seed in seeds}
    if seeds == [0]:
        seconds, methods = runs[0]
        (path / "demo.json").write_text(json.dumps({"benchmark": "demo", **base, "seconds": round(seconds, 1),
                                                    "methods": methods}, indent=2) + "\n")
        print(f"demo took {seconds / 60:.1f} min; saved {path / 'demo.json'}")
        return
    summary: dict[str, dict[str, list[float]]] = {}
    for method in runs[seeds[0]][1]:
        summary[method] = {}
        for key in ("miou_old", "miou_new", "miou_all", "step0_miou"):
            values = [100 * runs[s][1][method][key] for s in seeds]
            summary[method][key] = [round(statistics.mean(values), 2), round(statistics.stdev(values), 2)]
    print(f"demo over seeds {seeds}: mIoU % after the last step, mean +- std")
    print(f"{'method':<12} {'old':>12} {'new':>12} {'all':>12} {'step 0':>12}")
    for method, row in summary.items():
        cells = [f"{row[k][0]:5.1f} +- {row[k][1]:4.1f}" for k in ("miou_old", "miou_new", "miou_all", "step0_miou")]
        print(f"{method:<12} " + " ".join(f"{c:>12}" for c in cells))
    record = {"benchmark": "demo-seeds", **base, "seeds": seeds,
              "seconds": {str(s): round(runs[s][0], 1) for s in seeds},
              "per_seed": {str(s): runs[s][1] for s in seeds}, "mean_std_percent": summary}
    (path / "demo-seeds.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {path / 'demo-seeds.json'}")


if __name__ == "__main__":
    main()
