"""Runs for a report: read, checked to be comparable, grouped by seed, summarised.

Every number here is a fraction (0..1), as in ``results.json``; the pages
show percentages.  ``None`` means "no value" (a class absent from the test
masks, no new class yet, an unseen class) and is left out of means.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilseg.errors import IlsegError
from ilseg.config import PLACEMENT, settings_of
from ilseg.runs.folder import eval_protocol_differences, read_run_config, training_task

# Settings that do not change what a run learns beyond its seed: runs that differ only in these (the
# placement settings, the run's name and its seed) are seeds of one experiment.
NOT_IDENTITY = {("name",), ("runtime", "seed")} | {tuple(s.key.split(".")) for s in settings_of(PLACEMENT)}
# What every run of one report must share, with the words used to name a difference.
SAME_TASK = (("dataset", "dataset"), ("task", "task"), ("overlap", "overlapped/disjoint setting"),
             ("order", "class order"))


@dataclass
class Run:
    """One finished run folder."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.config["runtime"]["seed"])

    @property
    def method(self) -> str:
        return str(self.results.get("method"))

    @property
    def imported(self) -> str | None:
        """The tool an imported run's weights come from (``ilseg import``), or ``None`` for ilseg's own."""
        record = self.results.get("imported")
        return str(record.get("format")) if isinstance(record, dict) else None

    def identity(self) -> str:
        """The run's settings without seed, paths and runtime, as a comparable string; an imported run is
        never a seed of an ilseg run (its weights came from another tool)."""
        return repr((_strip(self.config, ()), self.imported))


def _strip(value: Any, where: tuple[str, ...]) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip(v, (*where, k)) for k, v in sorted(value.items()) if (*where, k) not in NOT_IDENTITY}
    return value


def hiou(old: float | None, new: float | None) -> float | None:
    """Harmonic mean of old- and new-class mIoU (``None`` before any new class)."""
    if old is None or new is None:
        return None
    return 0.0 if old + new == 0 else 2 * old * new / (old + new)


def class_steps(results: Mapping[str, Any]) -> dict[str, int]:
    """The step that introduced each class (the first step whose scores list it)."""
    intro: dict[str, int] = {}
    for s in results["steps"]:
        for name in s["iou_per_class"]:
            intro.setdefault(name, int(s["step"]))
    return intro


def forgetting(results: Mapping[str, Any]) -> dict[str, float | None]:
    """Per class learnt before the last step: IoU after the step that introduced it minus IoU after the last.

    Positive values are IoU lost; ``None`` where either IoU is missing (the
    class is absent from the test masks).
    """
    steps = {int(s["step"]): s for s in results["steps"]}
    last = steps[max(steps)]
    out: dict[str, float | None] = {}
    for name, step in class_steps(results).items():
        if step == max(steps):
            continue
        first, final = steps[step]["iou_per_class"].get(name), last["iou_per_class"].get(name)
        out[name] = None if first is None or final is None else first - final
    return out


def mean_of(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass(frozen=True)
class Stat:
    """A number over the seeds of a group: mean, sample standard deviation (None for one seed), count."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        kept = [v for v in values if v is not None and not math.isnan(v)]
        if not kept:
            return cls(None, None, 0)
        return cls(sum(kept) / len(kept), statistics.stdev(kept) if len(kept) > 1 else None, len(kept))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


SCALARS = ("miou_old", "miou_new", "miou_all", "hiou", "mean_miou_over_steps", "mean_forgetting")
STEP_SCALARS = ("miou_old", "miou_new", "miou_all", "hiou")


def run_numbers(results: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a report shows of one run."""
    steps = sorted(results["steps"], key=lambda s: s["step"])
    last = steps[-1]
    forgot = forgetting(results)
    per_step = [{"step": s["step"], "classes_seen": s["classes_seen"], "miou_old": s["miou_old"],
                 "miou_new": s["miou_new"], "miou_all": s["miou_all"], "hiou": hiou(s["miou_old"], s["miou_new"])}
                for s in steps]
    return {
        "miou_old": last["miou_old"], "miou_new": last["miou_new"], "miou_all": last["miou_all"],
        "hiou": hiou(last["miou_old"], last["miou_new"]),
        "mean_miou_over_steps": mean_of(s["miou_all"] for s in steps),
        "forgetting": forgot, "mean_forgetting": mean_of(forgot.values()),
        "steps": per_step,
        "iou_per_class": {s["step"]: dict(s["iou_per_class"]) for s in steps},
    }


@dataclass
class Group:
    """Runs that differ only by seed, and their statistics."""

    label: str
    runs: list[Run]
    numbers: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.numbers = [run_numbers(r.results) for r in self.runs]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def steps(self) -> list[int]:
        return [s["step"] for s in self.numbers[0]["steps"]]

    @property
    def joint(self) -> bool:
        """Trained on every class at once (one step): the upper bound, not an incremental run."""
        return len(self.steps) == 1 and len(self.runs[0].results.get("step_sizes") or []) > 1

    def final(self, key: str) -> Stat:
        return Stat.of(n[key] for n in self.numbers)

    def at_step(self, key: str, step: int) -> Stat:
        return Stat.of(s[key] for n in self.numbers for s in n["steps"] if s["step"] == step)

    def classes(self) -> list[str]:
        """Every class in the order the last step lists them."""
        return list(self.numbers[0]["iou_per_class"][self.steps[-1]])

    def class_iou(self, name: str, step: int) -> Stat | None:
        """IoU of ``name`` after ``step`` over the seeds; ``None`` if the class was not seen yet."""
        per_run = self.numbers[0]["iou_per_class"][step]
        if name not in per_run:
            return None
        return Stat.of(n["iou_per_class"][step].get(name) for n in self.numbers)

    def forgetting(self) -> dict[str, Stat]:
        return {name: Stat.of(n["forgetting"].get(name) for n in self.numbers) for name in self.numbers[0]["forgetting"]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "method": self.runs[0].method, "seeds": self.seeds,
            "runs": [str(r.path) for r in self.runs],
            "final": {k: self.final(k).to_dict() for k in SCALARS},
            "steps": [{"step": t, **{k: self.at_step(k, t).to_dict() for k in STEP_SCALARS}} for t in self.steps],
            "iou_per_class": {name: {str(t): (s.to_dict() if (s := self.class_iou(name, t)) else None)
                                     for t in self.steps} for name in self.classes()},
            "forgetting": {name: s.to_dict() for name, s in self.forgetting().items()},
            "per_run": [{"run": str(r.path), "seed": r.seed, **{k: n[k] for k in SCALARS}}
                        for r, n in zip(self.runs, self.numbers)],
        }


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders from the arguments: a folder with ``results.json`` is a run; a folder without one
    stands for the run folders directly inside it (e.g. ``ilseg-demo/runs``)."""
    out: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise IlsegError(f"{path} is not a folder; give run folders (each with results.json and config.yaml)")
        if (path / "results.json").exists() or (path / "config.yaml").exists():
            out.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if p.is_dir() and (p / "results.json").exists())
        if not inner:
            raise IlsegError(f"{path} is neither a run folder (no results.json) nor a folder of runs")
        out.extend(inner)
    unique = list(dict.fromkeys(p.resolve() for p in out))
    return unique


class _Literal(str):
    """``NaN``, ``Infinity`` or ``-Infinity`` as read from a results file: no score (JSON itself has no such
    numbers; Python's json module reads them unless told not to)."""

    def __repr__(self) -> str:
        return str(self)


def read_scores(path: Path) -> dict[str, Any]:
    """``results.json`` of the run in ``path`` with every field a report reads checked.

    Raises:
        IlsegError: the file is missing, unreadable, not JSON, nested without end, or a field holds what is
            not a score (text, ``NaN``, a number outside 0..1, nothing); one line naming the file and the field.
    """
    file = Path(path) / "results.json"
    fix = (f"rebuild it from the step checkpoints with `ilseg train --resume {path}`, or leave the run out "
           "(ilseg report --skip-bad leaves out every run it cannot read)")
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise IlsegError(f"{file} {what}; {fix}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"), parse_constant=_Literal)
        problem = _results_problem(data)
    except UnicodeDecodeError as exc:
        problem = f"is not a text file (byte {exc.start} is not UTF-8)"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    except ValueError as exc:
        problem = f"is not valid JSON ({str(exc).splitlines()[0]})"
    except RecursionError:
        problem = "is nested too deeply to be a run's results"
    if problem:
        raise IlsegError(f"{file} {problem}; {fix}")
    return data


def _results_problem(data: Any) -> str | None:
    """What is wrong with the fields of a results file a report reads (``"steps[1].miou_all is 'abc', ..."``)."""
    if not isinstance(data, dict):
        return f"holds a {type(data).__name__}, not a run's results (a mapping with 'steps')"
    steps = data.get("steps")
    if not isinstance(steps, list):
        return f"field steps is {_shown(steps)}, expected the list of finished steps"
    score = "a score (a number from 0 to 1)"
    for i, row in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(row, dict):
            return f"field {where} is {_shown(row)}, expected a step's scores"
        for key, expected, ok in (
            ("step", "a step number", lambda v: _is_int(v) and v >= 0),
            ("classes_seen", "a number of classes", lambda v: _is_int(v) and v >= 1),
            ("miou_all", score, _is_score),
            ("miou_old", f"{score} or null", lambda v: v is None or _is_score(v)),
            ("miou_new", f"{score} or null", lambda v: v is None or _is_score(v)),
            ("iou_per_class", "a mapping of class names to scores",
             lambda v: isinstance(v, dict) and bool(v)),
        ):
            if key not in row:
                return f"field {where}.{key} is missing ({expected} belongs there)"
            if not ok(row[key]):
                return f"field {where}.{key} is {_shown(row[key])}, expected {expected}"
        for name, value in row["iou_per_class"].items():
            if not (value is None or _is_score(value)):
                return f"field {where}.iou_per_class.{name} is {_shown(value)}, expected {score} or null"
    sizes = data.get("step_sizes")
    if sizes is not None and not (isinstance(sizes, list) and all(_is_int(v) for v in sizes)):
        return f"field step_sizes is {_shown(sizes)}, expected a list of numbers of classes"
    literal = _first_literal(data, "")
    if literal is not None:
        return f"field {literal[0]} is {literal[1]}, which JSON does not allow and is no score"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_literal(value: Any, where: str) -> tuple[str, str] | None:
    """The first ``NaN`` / ``Infinity`` in ``value`` and where it is."""
    if isinstance(value, _Literal):
        return where, str(value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found = _first_literal(inner, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def load_run(path: Path) -> Run:
    cfg = read_run_config(path)  # one clear error if it is not a run folder
    results = read_scores(path)
    num_steps = training_task(cfg).num_steps  # 1 for joint training, which learns every class at once
    done = sorted(int(s["step"]) for s in results["steps"])
    diverged = results.get("diverged")
    if done != list(range(num_steps)) and isinstance(diverged, dict) and diverged.get("advice"):
        # resuming as it is would diverge again: repeat the advice the run itself printed
        raise IlsegError(f"{path} finished steps {done or 'none'} of 0..{num_steps - 1} and stopped in step "
                         f"{diverged.get('step')}, epoch {diverged.get('epoch')}: {diverged.get('error')}. "
                         f"{diverged['advice']}; a report compares finished runs, so finish it that way or leave "
                         "it out")
    if done != list(range(num_steps)):
        raise IlsegError(f"{path} finished steps {done or 'none'} of 0..{num_steps - 1}: a report compares "
                         f"finished runs; finish it with `ilseg train --resume {path}` or leave it out")
    return Run(path=path, results=results, config=cfg.to_dict())


def check_comparable(runs: Sequence[Run]) -> None:
    """Refuse runs of different datasets, tasks, settings, class orders or evaluation protocols, naming the
    difference (the evaluation settings are those of role :data:`~ilseg.config.EVALUATION`)."""
    first = runs[0]
    for run in runs[1:]:
        for key, words in SAME_TASK:
            if run.results.get(key) != first.results.get(key):
                raise IlsegError(f"runs of different {words} cannot be compared in one report: {first.path} has "
                                 f"{first.results.get(key)!r}, {run.path} has {run.results.get(key)!r}")
        scored = eval_protocol_differences(first.config, run.config)
        if scored:
            raise IlsegError(f"runs scored under different evaluation protocols cannot be compared in one report: "
                             f"{first.path} vs {run.path}: {'; '.join(scored)}; re-score one of them with "
                             f"`ilseg eval --checkpoint` and the other's settings, or report them apart")


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped when they differ only by seed (and paths, runtime), in the order first given."""
    buckets: dict[str, list[Run]] = {}
    for run in runs:
        buckets.setdefault(run.identity(), []).append(run)
    groups = [Group(label=rs[0].method + (f" ({rs[0].imported}, imported)" if rs[0].imported else ""), runs=rs)
              for rs in buckets.values()]
    labels = [g.label for g in groups]
    for g in groups:  # two experiments of one method: tell them apart by their folder names
        if labels.count(g.label) > 1:
            g.label = f"{g.label} ({g.runs[0].path.name})"
    return groups


# What the scores of a step are: its final model's (what the next step starts from, and what MiB and PLOP
# publish), or the best of the evaluations made during the step (``eval.every``), as cssegmentation publishes:
# a selection on the test set, shown only on request and labelled so.
SELECTIONS = ("final", "best-on-test")
BEST_ON_TEST_NOTE = ("Scores are the best of the evaluations made during each step (eval.every), chosen by "
                     "all-class mIoU on the test set itself, as cssegmentation publishes its results: a selection "
                     "on the test set, optimistic, and not the model the next step started from.")


def best_on_test(run: Run) -> Run:
    """``run`` with each step's scores replaced by its evaluation of highest all-class mIoU (``eval.every``).

    Raises:
        IlsegError: a step without evaluations (the run was not trained with ``eval.every``).
    """
    steps = []
    for row in run.results["steps"]:
        evaluations = row.get("evaluations")
        if not isinstance(evaluations, list) or not evaluations:
            raise IlsegError(f"{run.path} step {row.get('step')} has no evaluations during the step: "
                             "--selection best-on-test needs runs trained with eval.every (e.g. --set "
                             "eval.every=10, cssegmentation's)")
        best = max(evaluations, key=lambda e: (e["miou_all"], e["epoch"]))  # ties: the later, as cssegmentation
        steps.append({**row, **{k: v for k, v in best.items() if k != "epoch"}, "selected_epoch": best["epoch"]})
    return dataclasses.replace(run, results={**run.results, "steps": steps})


def collect(paths: Sequence[str | Path], *, skipped: list[tuple[Path, str]] | None = None,
            selection: str = "final") -> list[Group]:
    """Read, check and group the runs of ``paths``.

    A run that cannot be read (damaged results or config, unfinished) is
    refused, unless ``skipped`` is given (``ilseg report --skip-bad``): then
    it is left out and ``(run folder, why)`` appended there, for the caller
    to list.  Runs that can be read but not compared are refused either way.
    """
    runs = []
    for path in expand(paths):
        try:
            runs.append(load_run(path))
        except IlsegError as exc:
            if skipped is None:
                raise
            skipped.append((path, str(exc)))
    if not runs and skipped:
        raise IlsegError(f"no run left to report: every run given was left out ({skipped[0][1]}"
                         f"{f'; and {len(skipped) - 1} more' if len(skipped) > 1 else ''})")
    if not runs:
        raise IlsegError("no run folder given")
    if selection not in SELECTIONS:
        raise IlsegError(f"unknown selection {selection!r}; use one of {', '.join(SELECTIONS)}")
    if selection == "best-on-test":
        runs = [best_on_test(run) for run in runs]
    check_comparable(runs)
    return group_runs(runs)
