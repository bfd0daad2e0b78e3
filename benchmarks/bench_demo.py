"""Wall-clock time of ``ilseg demo`` from an empty folder, plus its table.

    python benchmarks/bench_demo.py --out /tmp/ilseg-demo-bench
    python benchmarks/bench_demo.py --seeds 0,1,2      # mean +- std over data and training seeds
    git worktree add /tmp/ilseg-old 4e9aebc            # then, side by side with an older version:
    python benchmarks/bench_demo.py --baseline /tmp/ilseg-old --rounds 2

Deletes ``--out`` first and runs the demo exactly as the README's first
command does (dataset generation included), in a fresh process, and writes
``benchmarks/results/demo.json`` with the time, the machine and the final
old / new / all mIoU of every method.  ``--baseline SRC_TREE`` times the demo
of another checkout (its ``src`` first on ``PYTHONPATH``) and this one in
turn, ``--rounds`` times each, and writes ``demo-vs-baseline.json`` with
both medians and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ilseg.runs.results import read_results

HERE = Path(__file__).resolve().parent.parent


def time_demo(out: Path, seed: int, *, src: Path, methods: list[str] | None = None,
              processes: int | None = None) -> float:
    """Seconds of ``python -m ilseg demo`` from an empty ``out``, run from the checkout whose sources are ``src``."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ilseg", "demo", "--quiet", "--out", str(out)]
    if seed != 0:
        cmd += ["--seed", str(seed)]
    if methods:
        cmd += ["--methods", *methods]
    if processes is not None:
        cmd += ["--processes", str(processes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def scores(out: Path) -> dict[str, dict[str, float]]:
    """Each method's old / new / all mIoU after the last step and its step-0 mIoU."""
    methods = {}
    for run in sorted((out / "runs").iterdir()):
        res = read_results(run)
        assert res is not None, f"{run} has no results"
        last = res["steps"][-1]
        methods[run.name] = {k: last[k] for k in ("miou_old", "miou_new", "miou_all")}
        methods[run.name]["step0_miou"] = res["steps"][0]["miou_all"]
    return methods


def machine() -> dict[str, object]:
    return {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__}


def side_by_side(args: argparse.Namespace, path: Path) -> None:
    """This checkout's demo and ``--baseline``'s, in turn, ``--rounds`` times each."""
    baseline = Path(args.baseline).resolve()
    if not (baseline / "src" / "ilseg").is_dir():
        raise SystemExit(f"--baseline {baseline}: no src/ilseg there; give the root of an ilseg checkout")
    times: dict[str, list[float]] = {"current": [], "baseline": []}
    for r in range(args.rounds):
        for name, src in (("baseline", baseline / "src"), ("current", HERE / "src")):
            seconds = time_demo(Path(args.out) / name, 0, src=src)
            times[name].append(round(seconds, 1))
            print(f"round {r + 1}: {name} demo {seconds:.1f} s", flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["current"] / medians["baseline"]
    commit = subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    record = {"benchmark": "demo-vs-baseline", **machine(), "baseline": commit or str(baseline), "seconds": times,
              "median_seconds": medians, "ratio_current_to_baseline": round(ratio, 3),
              "current_methods": scores(Path(args.out) / "current")}
    (path / "demo-vs-baseline.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"demo: {medians['current']:.1f} s against {medians['baseline']:.1f} s for {record['baseline']} "
          f"(median of {args.rounds}): {ratio:.2f}x the time; saved {path / 'demo-vs-baseline.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/ilseg-demo-bench")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--seeds", default="0", help="comma list; several give mean +- std per method (demo-seeds.json)")
    p.add_argument("--methods", nargs="+", help="the demo's --methods (default: its four)")
    p.add_argument("--processes", type=int, help="the demo's --processes")
    p.add_argument("--baseline", help="root of another ilseg checkout to time side by side (see above)")
    p.add_argument("--rounds", type=int, default=2, help="with --baseline: runs of each, alternating")
    args = p.parse_args()
    path = Path(args.results)
    path.mkdir(parents=True, exist_ok=True)
    if args.baseline:
        side_by_side(args, path)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    base = {**machine(), "threads": torch.get_num_threads(), "processes": args.processes}
    runs = {}
    for seed in seeds:
        out = Path(args.out) / f"seed-{seed}"
        seconds = time_demo(out, seed, src=HERE / "src", methods=args.methods, processes=args.processes)
        runs[seed] = seconds, scores(out)
        print(f"seed {seed}: {seconds:.1f} s", flush=True)
    if seeds == [0] and not args.methods:
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
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][key] = [round(statistics.mean(values), 2), round(spread, 2)]
    print(f"demo over seeds {seeds}: mIoU % after the last step, mean +- std")
    print(f"{'method':<12} {'old':>12} {'new':>12} {'all':>12} {'step 0':>12}")
    for method, row in summary.items():
        cells = [f"{row[k][0]:5.1f} +- {row[k][1]:4.1f}" for k in ("miou_old", "miou_new", "miou_all", "step0_miou")]
        print(f"{method:<12} " + " ".join(f"{c:>12}" for c in cells))
    name = "demo-seeds.json" if not args.methods else f"demo-seeds-{'-'.join(args.methods)}.json"
    record = {"benchmark": "demo-seeds", **base, "seeds": seeds, "methods": args.methods,
              "seconds": {str(s): round(runs[s][0], 1) for s in seeds},
              "per_seed": {str(s): runs[s][1] for s in seeds}, "mean_std_percent": summary}
    (path / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {path / name}")


if __name__ == "__main__":
    main()
