"""The report's figures (PNG, matplotlib's Agg backend: no display needed).

Sized for a paper: ``COLUMN`` inches wide for one column, ``PAGE`` for the
full width, 8-9 pt text at 200 dpi.  Colours are the Okabe-Ito set, which
stays distinguishable for the common colour-vision deficiencies, and every
line also has its own marker; IoU maps use viridis (ordered in lightness,
readable in grey).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ilseg.fileio import atomic_write_bytes
from ilseg.reports.collect import Group

COLUMN, PAGE = 3.5, 7.0
DPI = 200
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MAX_BARS = 30  # forgetting: the classes with the largest mean forgetting when there are more


def colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _figure(width: float, height: float) -> Figure:
    """A figure of its own (no pyplot state); font sizes are set on each artist."""
    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig: Figure, path: Path) -> Path:
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.03))
    return path


def _pct(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100 * v for v in values], dtype=float)


def miou_by_step(groups: Sequence[Group], path: Path) -> Path:
    """All / old / new mIoU (%) against the step, one line per group, a band of +- 1 std for seed groups."""
    fig = _figure(PAGE, 2.3)
    axes = fig.subplots(1, 3, sharex=True)
    keys = (("miou_all", "all classes"), ("miou_old", "old classes (step 0)"), ("miou_new", "new classes"))
    steps = max((g.steps for g in groups), key=len)
    for ax, (key, title) in zip(axes, keys):
        for i, g in enumerate(groups):
            stats = [g.at_step(key, t) for t in g.steps]
            mean = _pct([s.mean for s in stats])
            std = _pct([s.std if s.std is not None else 0.0 for s in stats])
            label = g.label + (f" ({len(g.runs)} seeds)" if len(g.runs) > 1 else "")
            xs = g.steps
            if g.joint:  # one model for all classes: a level line across the steps, the upper bound
                xs, mean, std = [steps[0], steps[-1]], np.repeat(mean, 2), np.repeat(std, 2)
                label += ", all classes at once"
            ax.plot(xs, mean, color=colour(i), marker=None if g.joint else MARKERS[i % len(MARKERS)],
                    markersize=3.5, linewidth=1.3, linestyle="--" if g.joint else "-", label=label)
            if len(g.runs) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=colour(i), alpha=0.18, linewidth=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_xticks(steps)
        ax.set_ylim(0, 100)
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("mIoU (%)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.07 * ((len(labels) - 1) // 4)))
    fig.subplots_adjust(bottom=0.3 + 0.08 * ((len(labels) - 1) // 4), wspace=0.25)
    return _save(fig, path)


def class_heatmap(group: Group, path: Path) -> Path:
    """IoU (%) of every class (rows) after every step (columns); blank before a class is seen."""
    classes, steps = group.classes(), group.steps
    grid = np.full((len(classes), len(steps)), np.nan)
    for r, name in enumerate(classes):
        for c, t in enumerate(steps):
            stat = group.class_iou(name, t)
            if stat is not None and stat.mean is not None:
                grid[r, c] = 100 * stat.mean
    many = len(classes) > 40
    height = min(0.9 + (0.09 if many else 0.19) * len(classes), 22.0)
    fig = _figure(max(COLUMN * 0.75, 1.6 + 0.45 * len(steps)), height)
    ax = fig.subplots()
    masked = np.ma.masked_invalid(grid)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(len(steps)), ["joint"] if group.joint else [str(t) for t in steps], fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=5 if many else 7)
    ax.set_xlabel("all classes at once" if group.joint else "step", fontsize=8)
    seeds = f", mean of {len(group.runs)} seeds" if len(group.runs) > 1 else ""
    ax.set_title(f"{group.label}: IoU (%) per class{seeds}", fontsize=8)
    if not many:
        for r in range(len(classes)):
            for c in range(len(steps)):
                if not np.isnan(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if grid[r, c] > 55 else "white")
    bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
    bar.set_label("IoU (%)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return _save(fig, path)


def forgetting_bars(groups: Sequence[Group], path: Path) -> Path:
    """Forgetting (IoU points lost since the class was learnt) per old class, groups side by side."""
    index = {g.label: i for i, g in enumerate(groups)}  # each group keeps its colour of the other figures
    groups = [g for g in groups if not g.joint]  # joint training forgets nothing: it has one step
    stats = [g.forgetting() for g in groups]
    classes = list(dict.fromkeys(c for s in stats for c in s))
    if not classes:
        fig = _figure(COLUMN, 1.0)
        fig.text(0.5, 0.5, "no incremental run: nothing to forget", ha="center", va="center", fontsize=8)
        return _save(fig, path)
    title = "forgetting per old class"
    if len(classes) > MAX_BARS:
        total = len(classes)
        worst = sorted(classes, key=lambda c: -max((s[c].mean or 0.0) for s in stats if c in s))[:MAX_BARS]
        classes = [c for c in classes if c in worst]
        title += f" (the {MAX_BARS} most forgotten of {total})"
    fig = _figure(min(max(COLUMN, 1.0 + 0.32 * len(classes) * max(1, len(groups)) ** 0.5), 12.0), 2.6)
    ax = fig.subplots()
    width = 0.8 / len(groups)
    x = np.arange(len(classes))
    for i, (g, s) in enumerate(zip(groups, stats)):
        mean = _pct([s[c].mean if c in s else None for c in classes])
        err = _pct([s[c].std if c in s and s[c].std is not None else 0.0 for c in classes])
        label = g.label + (f" ({len(g.runs)} seeds)" if len(g.runs) > 1 else "")
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, mean, width, color=colour(index[g.label]), label=label,
               yerr=err if len(g.runs) > 1 else None, error_kw={"elinewidth": 0.7, "capsize": 1.5})
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center",
                  fontsize=7)
    ax.set_ylabel("IoU lost (points)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)
