"""``ilseg demo``: joint vs fine-tuning vs ILT on the synthetic benchmark, on the CPU.

It generates the synthetic dataset (if missing), trains step 0 once, then
every method's later steps from that shared step-0 model (as papers do), plus
joint training on all classes, and prints one table: old / new / all mIoU
after the last step, then writes the report of ``ilseg report`` for its runs
(``report/report.html``).  The recipe is the ``synth-demo`` preset; its
comments say how and why it differs from the paper recipe.

The methods train side by side, each in its own process with one thread
(``processes``): a small model on a CPU of a few cores gets more done this
way than one process using every core for one method at a time (1.4x on 2
cores, BENCHMARKS.md), and runs with one thread give the same numbers on
any machine with the same kind of CPU.  ``processes=1`` trains one method
after another in this process, with progress bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from ilseg.config import PLACEMENT, RunConfig, load_config, preset_dir, settings_of
from ilseg.data.synth import META_FILE, generate_synth, synth_matches
from ilseg.engine.run import run_training
from ilseg.errors import IlsegError, Interrupted, one_line, plural
from ilseg.fileio import atomic_write_text, check_output_folder
from ilseg.methods import METHOD_PRESETS, build_method
from ilseg.reports import write_report
from ilseg.runs.folder import config_differences
from ilseg.runs.results import comparison_table

DEMO_METHODS: tuple[str, ...] = ("joint", "finetune", "ilt", "ilt-kd-out")
# Methods whose step 0 is the same training (Method.identity(0): plain cross-entropy with the same
# reduction on the step-0 classes) share it; the others (joint, MiB's CE over all pixels) train their own.
SHARED_STEP0_FROM = "finetune"
# The demo's synthetic set: 64 px images, enough for a small CNN to learn shapes in minutes.
DEMO_IMAGES, DEMO_SIZE = 1800, 64
# Joint training sees every training image each epoch (about 3x step 0's share
# under 6-2-2 disjoint), so it gets fewer epochs for about as many iterations.
JOINT_EPOCHS = 5


@dataclasses.dataclass(frozen=True)
class DemoJob:
    """One call of :func:`run_training`: a method's run folder, the steps it trains, the job it waits for."""

    method: str
    cfg: RunConfig
    run_dir: Path
    steps: str | None = None  # None: every step not finished yet
    init_from: Path | None = None
    after: str | None = None  # the key of the job whose step-0 model this one starts from

    @property
    def key(self) -> str:
        return self.method if self.steps is None else f"{self.method} (step {self.steps})"


def demo_config(root: Path, *, quick: bool = False, seed: int = 0) -> RunConfig:
    overrides = [f"data.root={root}", f"runtime.seed={seed}"]
    if quick:
        overrides += ["optim.epochs=1", "optim.epochs_next=1"]
    return load_config(preset_dir() / "synth-demo.yaml", overrides)


def default_processes() -> int:
    """Train side by side where there are at least two cores; in this process otherwise."""
    return 1 if (os.cpu_count() or 1) < 2 else len(DEMO_METHODS)


def run_demo(out: Path, *, quick: bool = False, quiet: bool = False, methods: Sequence[str] | None = None,
             seed: int = 0, processes: int | None = None) -> str:
    """Run the demo into ``out``; return (and print) the comparison table.

    ``seed`` draws both the synthetic data and the training (initialisation,
    crops, order): the published table is seed 0; other seeds show how much
    of a difference between methods is noise (``benchmarks/bench_demo.py --seeds``).
    ``processes``: how many methods train at once, each in its own process
    with one thread (default: :func:`default_processes`); 1 trains them one
    after another in this process.  Running the demo again continues
    unfinished runs and reuses finished ones.
    """
    methods = tuple(methods or DEMO_METHODS)
    unknown = [m for m in methods if m not in METHOD_PRESETS]
    if unknown:
        raise IlsegError(f"unknown demo {'method' if len(unknown) == 1 else 'methods'} {unknown}; choose from {', '.join(METHOD_PRESETS)}")
    processes = default_processes() if processes is None else processes
    if processes < 1:
        raise IlsegError(f"the demo needs at least 1 process, got {processes}")
    out = Path(out)
    check_output_folder(out, option="--out", what="an ilseg demo folder", ours=demo_entry)
    start = time.perf_counter()
    base = demo_config(out / "data" / "synth", quick=quick, seed=seed)
    runs = out / ("runs-quick" if quick else "runs")
    jobs = plan_jobs(base, methods, runs, quick=quick)
    refuse_stale_runs(jobs, Path(base.data.root), seed)
    if not synth_matches(Path(base.data.root), seed=seed, num_images=DEMO_IMAGES, size=DEMO_SIZE):
        print(f"generating the synthetic dataset in {base.data.root} ...", flush=True)
        generate_synth(Path(base.data.root), seed=seed, num_images=DEMO_IMAGES, size=DEMO_SIZE)
    if processes == 1:
        results = run_in_turn(jobs, quiet=quiet)
    else:
        print(f"training {plural(len(methods), 'method')} side by side, each in its own process with one thread "
              f"(logs: {runs}/<method>/train.log)", flush=True)
        results = run_side_by_side(jobs, processes, start)
    rows = [{**results[method], "label": method} for method in sorted(methods, key=lambda m: m == "joint")]
    table = comparison_table(rows)
    minutes = (time.perf_counter() - start) / 60
    text = (f"ilseg demo: synthetic {base.data.task} ({'overlapped' if base.data.overlap else 'disjoint'}), "
            f"{base.model.backbone}, mIoU % after the last step ({minutes:.1f} min)\n\n{table}\n")
    atomic_write_text(out / ("comparison-quick.md" if quick else "comparison.md"), text)
    report = write_report([runs / name for name in methods], out / ("report-quick" if quick else "report"))
    print("\n" + text)
    print(f"report with figures: {report['html']} (open it in a browser; report.md beside it)")
    return text


def demo_entry(entry: Path) -> bool:
    """Whether ``entry`` of the demo's ``--out`` folder is one the demo writes (:func:`run_demo` refuses a
    folder holding anything else): ``data/`` of the synthetic set, ``runs[-quick]/`` of method run folders,
    ``report[-quick]/`` of a report, ``comparison[-quick].md`` as the demo writes it."""
    name = entry.name
    if name in ("comparison.md", "comparison-quick.md"):
        try:
            with open(entry, "rb") as f:
                return f.read(len(b"ilseg demo:")) == b"ilseg demo:"
        except OSError:
            return False
    if not entry.is_dir() or entry.is_symlink():
        return False
    inside = [p for p in entry.iterdir() if not p.name.startswith(".")]
    if name == "data":
        return all(p.name == "synth" for p in inside)
    if name in ("runs", "runs-quick"):
        return all(p.name in METHOD_PRESETS for p in inside)
    if name in ("report", "report-quick"):
        return all(p.name in ("report.md", "report.html", "report.json", "previews") or p.suffix in (".png", ".csv")
                   for p in inside)
    return False


def method_config(base: RunConfig, name: str, *, quick: bool) -> RunConfig:
    cfg = dataclasses.replace(base, name=f"demo-{name}", method=METHOD_PRESETS[name])
    if build_method(cfg.method).all_classes_at_once and not quick:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=JOINT_EPOCHS))
    return cfg


def plan_jobs(base: RunConfig, methods: Sequence[str], runs: Path, *, quick: bool) -> list[DemoJob]:
    """The demo's training calls in a workable order.

    The first method whose step 0 is fine-tuning's trains it as a job of its
    own; every other such method starts from that model (``init_from``) once
    it exists, and the first method's later steps are a second job.
    """
    reference = build_method(METHOD_PRESETS[SHARED_STEP0_FROM]).identity(0)
    order = sorted(methods, key=lambda m: (m != SHARED_STEP0_FROM, m == "joint"))
    sharing = [m for m in order if build_method(METHOD_PRESETS[m]).identity(0) == reference]
    jobs: list[DemoJob] = []
    owner = sharing[0] if len(sharing) > 1 else None
    for name in order:
        cfg = method_config(base, name, quick=quick)
        if name == owner:
            first = DemoJob(name, cfg, runs / name, steps="0")
            jobs += [first, DemoJob(name, cfg, runs / name, after=first.key)]
        elif owner is not None and name in sharing:
            jobs.append(DemoJob(name, cfg, runs / name, init_from=runs / owner, after=f"{owner} (step 0)"))
        else:
            jobs.append(DemoJob(name, cfg, runs / name))
    return jobs


def refuse_stale_runs(jobs: Sequence[DemoJob], synth_root: Path, seed: int) -> None:
    """Refuse run folders an earlier version of the demo made, before anything is generated or trained.

    A run made with another recipe, or on a synthetic set of another version
    (about to be generated anew), would otherwise be continued or shown as if
    it were this demo's.  Nothing is deleted: the message says what to move.
    """
    stale = []
    placement = tuple(s.key for s in settings_of(PLACEMENT))  # where and how a run executes: a reused run may differ
    data_changed = (synth_root / META_FILE).is_file() and not synth_matches(
        synth_root, seed=seed, num_images=DEMO_IMAGES, size=DEMO_SIZE)
    for run_dir in dict.fromkeys(job.run_dir for job in jobs):
        if not (run_dir / "config.yaml").is_file():
            continue
        cfg = next(job.cfg for job in jobs if job.run_dir == run_dir)
        try:
            differences = [d for d in config_differences(load_config(run_dir / "config.yaml"), cfg)
                           if not d.startswith(placement)]
        except IlsegError as exc:
            differences = [one_line(exc)]
        if data_changed:
            differences.append(f"the synthetic set in {synth_root} is of another version or seed")
        if differences:
            stale.append(f"{run_dir.name} ({'; '.join(differences[:3])}{'; ...' if len(differences) > 3 else ''})")
    if stale:
        runs = jobs[0].run_dir.parent
        raise IlsegError(f"{runs} holds runs of an earlier demo, made with other settings or data: "
                         f"{', '.join(stale)}; nothing was changed. Move or delete {runs} (and its report) to run "
                         "this demo there, or choose another --out")


def train_job(job: DemoJob, *, quiet: bool) -> dict[str, Any]:
    resume = (job.run_dir / "config.yaml").is_file()
    return run_training(job.cfg, job.run_dir, steps=job.steps, resume=resume, init_from=job.init_from, quiet=quiet)


def run_in_turn(jobs: Sequence[DemoJob], *, quiet: bool) -> dict[str, dict[str, Any]]:
    """Train the jobs one after another in this process; each method's last results."""
    results = {}
    for job in jobs:
        print(f"\n=== {job.key} ===", flush=True)
        results[job.method] = train_job(job, quiet=quiet)
    return results


def _worker_setup() -> None:
    torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM):  # an idle worker ignores them; training handles them itself
        signal.signal(sig, signal.SIG_IGN)


def _train_in_worker(job: DemoJob) -> dict[str, Any]:
    """A job in a worker process: its results, or its error as plain data (exceptions may not unpickle)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            return {"results": train_job(job, quiet=True)}
        except IlsegError as exc:
            return {"error": one_line(exc), "signal": exc.signal_number if isinstance(exc, Interrupted) else None}


def run_side_by_side(jobs: Sequence[DemoJob], processes: int, start: float) -> dict[str, dict[str, Any]]:
    """Train every job whose step-0 model exists at once, each in a worker process; each method's last results.

    Ctrl-C (or SIGTERM) reaches the workers, which save and stop as ``ilseg
    train`` does; then this raises :class:`Interrupted`.  A job that fails
    stops the jobs that wait for it, the others finish, and one
    :class:`IlsegError` names every failure.
    """
    waiting, running = list(jobs), dict[Future, DemoJob]()
    done: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    stopped: int | None = None
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_worker_setup) as pool, \
            _sigterm_as_interrupt():
        while waiting or running:
            if stopped is None:
                ready = [j for j in waiting if j.after is None or j.after in done]
                waiting = [j for j in waiting if j not in ready]
                if ready:
                    _say(start, "started " + ", ".join(j.key for j in ready))
                for job in ready:
                    try:
                        running[pool.submit(_train_in_worker, job)] = job
                    except BrokenProcessPool:  # a worker died (killed, out of memory): its job says so below
                        failures.append(f"{job.key}: not started, a worker process of the demo died")
            if not running:
                break  # the rest wait for a job that failed
            try:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt as exc:
                stopped = getattr(exc, "signal_number", int(signal.SIGINT))
                _say(start, "stopping: each running method saves its state first ...")
                continue
            for future in finished:
                job = running.pop(future)
                outcome = _outcome(future)
                if "results" in outcome:
                    done[job.key] = outcome["results"]
                    _say(start, f"{job.key}: {_summary(outcome['results'])}")
                elif outcome.get("signal") is not None:
                    stopped = stopped or outcome["signal"]
                    _say(start, f"{job.key}: {outcome['error'].split(';')[0]}")
                else:
                    failures.append(f"{job.key}: {outcome['error']} (log: {job.run_dir / 'train.log'})")
                    _say(start, f"{job.key} failed: {outcome['error']}")
    if stopped is not None:
        raise Interrupted(f"demo stopped by {signal.Signals(stopped).name}; every method saved its state: "
                          "run the same command again to continue", stopped)
    if failures:
        raise IlsegError("the demo could not finish: " + "; ".join(failures))
    return {job.method: done[job.key] for job in jobs}  # a method's later job overwrites its step-0 job


def _outcome(future: Future) -> dict[str, Any]:
    try:
        return future.result()
    except Exception as exc:  # a worker that died (killed, out of memory) or a bug outside ilseg's errors
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}


class _Terminated(KeyboardInterrupt):
    signal_number = int(signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the demo's process is passed to its workers and then handled as Ctrl-C is."""
    def forward(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)  # type: ignore[arg-type]
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary(results: dict[str, Any]) -> str:
    last = results["steps"][-1]
    parts = [f"step {last['step']} mIoU all {100 * last['miou_all']:.1f}"]
    for key in ("old", "new"):
        value = last.get(f"miou_{key}")
        if value is not None and last["step"] > 0:
            parts.append(f"{key} {100 * value:.1f}")
    return " | ".join(parts)


def _say(start: float, text: str) -> None:
    seconds = int(time.perf_counter() - start)
    print(f"  {seconds // 60}:{seconds % 60:02d}  {text}", flush=True)
