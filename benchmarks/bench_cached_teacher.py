"""The teacher's outputs computed once per step (``runtime.cache_teacher``) against once per epoch.

With ``data.fixed_crops`` (the ILT paper's incremental steps) every epoch of a
step > 0 sees the same crops, so the teacher's forward pass of epochs 2..E
repeats the first one.  This trains step 0 once, then step 1 of the same
config twice from it, with and without the cache, in one process, one after
the other (``--rounds`` times, alternating), and prints and saves the wall
time of step 1 and the ratio.  Both runs train the same weights (checked).

Example::

    python benchmarks/bench_cached_teacher.py --set optim.epochs_next=4
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import add_common_options, bench_config, save_record
from ilseg.config import RunConfig
from ilseg.engine.run import run_training
from ilseg.runs.checkpoint import load_checkpoint

DEFAULTS = ["method.name=ilt", "data.fixed_crops=true", "optim.epochs=2", "optim.epochs_next=4", "data.workers=0"]


def step1_seconds(cfg: RunConfig, step0_run: Path, out: Path) -> float:
    """Wall seconds of ``ilseg train --steps 1`` from ``step0_run``'s step 0."""
    start = time.perf_counter()
    run_training(cfg, out, steps="0:2", init_from=step0_run, quiet=True)  # step 0 adopted, step 1 trained
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(p)
    p.add_argument("--rounds", type=int, default=2, help="timed pairs (online, cached), alternating")
    args = p.parse_args(argv)
    args.overrides = DEFAULTS + args.overrides
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = bench_config(args, tmp)
        online = cfg
        cached = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, cache_teacher=True))
        run_training(cfg, tmp / "step0", steps="0", quiet=True)
        times: dict[str, list[float]] = {"online": [], "cached": []}
        for r in range(args.rounds):
            for name, run_cfg in (("online", online), ("cached", cached)):
                out = tmp / f"{name}-{r}"
                times[name].append(step1_seconds(run_cfg, tmp / "step0", out))
                print(f"round {r + 1}: {name:<6} step 1 in {times[name][-1]:.1f} s", flush=True)
        a, b = load_checkpoint(tmp / "online-0" / "step1.pth"), load_checkpoint(tmp / "cached-0" / "step1.pth")
        same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    ratio = best["cached"] / best["online"]
    print(f"step 1 ({cfg.optim.epochs_next} epochs): online teacher {best['online']:.1f} s, cached "
          f"{best['cached']:.1f} s: {ratio:.2f}x; same weights: {same}")
    path = save_record(args, cfg, "cached_teacher", torch.device("cpu"),
                       {"seconds": times, "best": best, "ratio_cached_to_online": ratio, "same_weights": same})
    print(f"saved {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
