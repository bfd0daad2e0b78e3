"""``ilseg demo``: joint vs fine-tuning vs ILT on the synthetic benchmark, on the CPU.

It generates the synthetic dataset (if missing), trains step 0 once, then
every method's later steps from that shared step-0 model (as papers do), plus
joint training on all classes, and prints one table: old / new / all mIoU
after the last step, then writes the report of ``ilseg report`` for its runs
(``report/report.html``).  The recipe is the ``synth-demo`` preset; its
comments say how and why it differs from the paper recipe.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from ilseg.config import RunConfig, load_config, preset_dir
from ilseg.data.synth import generate_synth, synth_matches
from ilseg.fileio import atomic_write_text
from ilseg.engine.run import run_training
from ilseg.errors import IlsegError
from ilseg.methods import METHOD_PRESETS, Method
from ilseg.report import comparison_table
from ilseg.reports import write_report

DEMO_METHODS: tuple[str, ...] = ("joint", "finetune", "ilt", "ilt-kd-out")
# Methods whose step 0 is the same training (Method.identity(0): plain cross-entropy with the same
# reduction on the step-0 classes) share it; the others (joint, MiB's CE over all pixels) train their own.
SHARED_STEP0_FROM = "finetune"
# The demo's synthetic set: 64 px images, enough for a small CNN to learn shapes in minutes.
DEMO_IMAGES, DEMO_SIZE = 1800, 64
# Joint training sees every training image each epoch (about 3x step 0's share
# under 6-2-2 disjoint), so it gets fewer epochs for about as many iterations.
JOINT_EPOCHS = 4


def demo_config(root: Path, *, quick: bool = False, seed: int = 0) -> RunConfig:
    overrides = [f"data.root={root}", f"runtime.seed={seed}"]
    if quick:
        overrides += ["optim.epochs=1", "optim.epochs_next=1"]
    return load_config(preset_dir() / "synth-demo.yaml", overrides)


def run_demo(out: Path, *, quick: bool = False, quiet: bool = False, methods: Sequence[str] | None = None,
             seed: int = 0) -> str:
    """Run the demo into ``out``; return (and print) the comparison table.

    ``seed`` draws both the synthetic data and the training (initialisation,
    crops, order): the published table is seed 0; other seeds show how much
    of a difference between methods is noise (``benchmarks/bench_demo.py --seeds``).
    """
    methods = tuple(methods or DEMO_METHODS)
    unknown = [m for m in methods if m not in METHOD_PRESETS]
    if unknown:
        raise IlsegError(f"unknown demo method(s) {unknown}; choose from {', '.join(METHOD_PRESETS)}")
    out = Path(out)
    start = time.perf_counter()
    base = demo_config(out / "data" / "synth", quick=quick, seed=seed)
    synth = base.data
    if not synth_matches(Path(synth.root), seed=seed, num_images=DEMO_IMAGES, size=DEMO_SIZE):
        print(f"generating the synthetic dataset in {synth.root} ...", flush=True)
        generate_synth(Path(synth.root), seed=seed, num_images=DEMO_IMAGES, size=DEMO_SIZE)
    runs = out / ("runs-quick" if quick else "runs")
    results = []
    order = sorted(methods, key=lambda m: (m != SHARED_STEP0_FROM, m == "joint"))
    shared = runs / SHARED_STEP0_FROM
    for name in order:
        cfg = dataclasses.replace(base, name=f"demo-{name}", method=METHOD_PRESETS[name])
        if cfg.method.joint and not quick:
            cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=JOINT_EPOCHS))
        run_dir = runs / name
        same_step0 = Method(cfg.method).identity(0) == Method(METHOD_PRESETS[SHARED_STEP0_FROM]).identity(0)
        init = shared if (name != SHARED_STEP0_FROM and same_step0 and (shared / "step0.pth").is_file()) else None
        print(f"\n=== {name} ===", flush=True)
        resume = (run_dir / "config.yaml").is_file()
        res = run_training(cfg, run_dir, resume=resume, init_from=init, quiet=quiet)
        results.append({**res, "label": name})
    table = comparison_table(results)
    minutes = (time.perf_counter() - start) / 60
    text = (f"ilseg demo: synthetic {base.data.task} ({'overlapped' if base.data.overlap else 'disjoint'}), "
            f"{base.model.backbone}, mIoU % after the last step ({minutes:.1f} min)\n\n{table}\n")
    atomic_write_text(out / ("comparison-quick.md" if quick else "comparison.md"), text)
    report = write_report([runs / name for name in methods], out / ("report-quick" if quick else "report"))
    print("\n" + text)
    print(f"report with figures: {report['html']} (open it in a browser; report.md beside it)")
    return text
