"""Wall-clock time of ``ilseg demo`` from an empty folder, plus its table.

    python benchmarks/bench_demo.py --out /tmp/ilseg-demo-bench

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
import time
from pathlib import Path

import torch

from ilseg.demo import run_demo
from ilseg.report import read_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/ilseg-demo-bench")
    p.add_argument("--results", default="benchmarks/results")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run_demo(out, quiet=True)
    seconds = time.perf_counter() - start
    methods = {}
    for run in sorted((out / "runs").iterdir()):
        res = read_results(run)
        last = res["steps"][-1]
        methods[run.name] = {k: last[k] for k in ("miou_old", "miou_new", "miou_all")}
        methods[run.name]["step0_miou"] = res["steps"][0]["miou_all"]
    record = {"benchmark": "demo", "date": datetime.date.today().isoformat(), "seconds": round(seconds, 1),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "methods": methods}
    path = Path(args.results)
    path.mkdir(parents=True, exist_ok=True)
    (path / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"demo took {seconds / 60:.1f} min; saved {path / 'demo.json'}")


if __name__ == "__main__":
    main()
