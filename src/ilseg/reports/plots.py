"""The report's figures (PNG, matplotlib's Agg backend: no display needed).

Sized for a paper: ``COLUMN`` inches wide for one column, ``PAGE`` for the
full width, 8-9 pt text at 200 dpi.  Each method keeps its colour and marker
in every figure (:func:`ilseg.visual.style.method_style`: the Okabe-Ito set,
which stays distinguishable for the common colour-vision deficiencies, plus
a marker per line), whatever the order of the runs; a second experiment of
one method gets another line style (and hatched bars).  IoU maps use
viridis (ordered in lightness, readable in grey), with "not learnt yet" and
"absent from the test masks" drawn apart from any value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ilseg.fileio import atomic_write_bytes
from ilseg.reports.collect import Group
from ilseg.visual.style import REPEAT_DASHES, MethodStyle, method_style

COLUMN, PAGE = 3.5, 7.0
DPI = 200
MAX_BARS = 20  # forgetting: the classes with the largest mean forgetting when there are more (VOC: all 20)
MAX_WIDTH = 9.0  # inches: the widest figure, still readable when a page of 1100 CSS pixels shows it
MAX_HEATMAP_ROWS = 40  # more classes (ADE20k): the heatmap shows the best and the worst HEATMAP_SHOWN of them
HEATMAP_SHOWN = 20
NOT_LEARNT = "#d9d9d9"  # a class not learnt yet at that step: flat grey
ABSENT = "white"  # a class absent from the test masks: white, hatched grey
HATCH_COLOUR = "#8c8c8c"
BAND_ALPHA = 0.18
REPEAT_HATCHES = ("//", "..", "xx")


def group_styles(groups: Sequence[Group]) -> dict[str, MethodStyle]:
    """Each group's style by label: its method's; a second (third, ...) group of one method gets another
    line style (joint keeps its dashed line)."""
    seen: dict[str, int] = {}
    styles = {}
    for g in groups:
        style = method_style(g.runs[0].method)
        repeat = seen.get(g.runs[0].method, 0)
        seen[g.runs[0].method] = repeat + 1
        if repeat and not g.joint:
            style = style._replace(dashes=REPEAT_DASHES[(repeat - 1) % len(REPEAT_DASHES)])
        styles[g.label] = style
    return styles


def _hatch(groups: Sequence[Group], group: Group) -> str | None:
    """Bars of a second (third, ...) experiment of one method are hatched (their colour is the method's)."""
    same = [g for g in groups if g.runs[0].method == group.runs[0].method]
    index = next(i for i, g in enumerate(same) if g is group)
    return REPEAT_HATCHES[(index - 1) % len(REPEAT_HATCHES)] if index else None


def _figure(width: float, height: float) -> Figure:
    """A figure of its own (no pyplot state); font sizes are set on each artist."""
    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig: Figure, path: Path) -> Path:
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.03))
    return path


def _pct(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100 * v for v in values], dtype=float)


def miou_by_step(groups: Sequence[Group], path: Path) -> Path:
    """All / old / new mIoU (%) against the step, one line per group, a band of +- 1 std for seed groups
    (named in the legend)."""
    fig = _figure(PAGE, 2.3)
    axes = fig.subplots(1, 3, sharex=True)
    keys = (("miou_all", "all classes"), ("miou_old", "old classes (step 0)"), ("miou_new", "new classes"))
    steps = max((g.steps for g in groups), key=len)
    styles = group_styles(groups)
    for ax, (key, title) in zip(axes, keys):
        for g in groups:
            style = styles[g.label]
            stats = [g.at_step(key, t) for t in g.steps]
            mean = _pct([s.mean for s in stats])
            std = _pct([s.std if s.std is not None else 0.0 for s in stats])
            label = g.label + (f" ({len(g.runs)} seeds)" if len(g.runs) > 1 else "")
            xs = g.steps
            if g.joint:  # one model for all classes: a level line across the steps, the upper bound
                xs, mean, std = [steps[0], steps[-1]], np.repeat(mean, 2), np.repeat(std, 2)
                label += ", all classes at once"
            ax.plot(xs, mean, color=style.colour, marker=None if g.joint else style.marker, markersize=3.5,
                    linewidth=1.3, linestyle=style.dashes, label=label)
            if len(g.runs) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=style.colour, alpha=BAND_ALPHA, linewidth=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_xticks(steps)
        ax.set_ylim(0, 100)
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("mIoU (%)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    if any(len(g.runs) > 1 for g in groups):
        handles.append(Patch(facecolor="#555555", alpha=BAND_ALPHA * 2, linewidth=0))
        labels.append("band: mean ± 1 std over seeds")
    rows = (len(labels) - 1) // 4
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.07 * rows))
    fig.subplots_adjust(bottom=0.3 + 0.08 * rows, wspace=0.25)
    return _save(fig, path)


def class_grid(group: Group) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every class of ``group``, its mean IoU (%) after each step and where it was not learnt yet.

    Returns ``(classes, iou, not_learnt)``: ``iou`` is ``classes x steps``,
    NaN where there is no value (not learnt yet, or absent from the test
    masks); ``not_learnt`` is True where the class was not learnt yet (the
    other NaNs are classes absent from the test masks).
    """
    classes, steps = group.classes(), group.steps
    iou = np.full((len(classes), len(steps)), np.nan)
    not_learnt = np.zeros((len(classes), len(steps)), dtype=bool)
    for r, name in enumerate(classes):
        for c, t in enumerate(steps):
            stat = group.class_iou(name, t)
            if stat is None:
                not_learnt[r, c] = True
            elif stat.mean is not None:
                iou[r, c] = 100 * stat.mean
    return classes, iou, not_learnt


def shown_rows(classes: Sequence[str], iou: np.ndarray) -> tuple[list[int], int | None]:
    """The rows a heatmap shows: every class up to :data:`MAX_HEATMAP_ROWS`; with more, the
    :data:`HEATMAP_SHOWN` best and the :data:`HEATMAP_SHOWN` worst by IoU after the last step (classes
    absent from the test masks last), best first.  Returns the rows and the position of the gap between
    the two parts (``None`` when every class is shown)."""
    if len(classes) <= MAX_HEATMAP_ROWS:
        return list(range(len(classes))), None
    final = iou[:, -1]
    scored = sorted((r for r in range(len(classes)) if not np.isnan(final[r])), key=lambda r: -final[r])
    best, worst = scored[:HEATMAP_SHOWN], scored[-HEATMAP_SHOWN:]
    return best + [r for r in worst if r not in best], len(best)


def class_heatmap(group: Group, path: Path, *, table: str | None = None) -> Path:
    """IoU (%) of the classes (rows) after every step (columns), with a legend for the cells without a value.

    Grey: not learnt yet at that step; white, hatched: absent from the test
    masks.  Up to :data:`MAX_HEATMAP_ROWS` classes every class is a row,
    with its value written in the cell; with more (ADE20k's 151) the best
    and the worst :data:`HEATMAP_SHOWN` by IoU after the last step are
    shown, and the title names ``table``, the file with every class.
    """
    classes, iou, not_learnt = class_grid(group)
    steps = group.steps
    rows, gap = shown_rows(classes, iou)
    grid, unseen = iou[rows], not_learnt[rows]
    names = [classes[r] for r in rows]
    height = 1.3 + 0.17 * len(rows)
    fig = _figure(min(PAGE, max(COLUMN, 2.2 + 0.5 * len(steps))), height)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=ABSENT)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=100,
                      interpolation="nearest")
    for r, c in zip(*np.nonzero(unseen)):
        ax.add_patch(matplotlib.patches.Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=NOT_LEARNT, linewidth=0))
    for r, c in zip(*np.nonzero(np.isnan(grid) & ~unseen)):
        ax.add_patch(matplotlib.patches.Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=ABSENT, hatch="////",
                                                  edgecolor=HATCH_COLOUR, linewidth=0))
    for r in range(len(rows)):
        for c in range(len(steps)):
            if not np.isnan(grid[r, c]):
                ax.text(c, r, f"{grid[r, c]:.0f}", ha="center", va="center", fontsize=6,
                        color="black" if grid[r, c] > 55 else "white")
    if gap is not None:
        ax.axhline(gap - 0.5, color="white", linewidth=3)
        ax.axhline(gap - 0.5, color="black", linewidth=0.8, linestyle=(0, (2, 2)))
    ax.set_xticks(range(len(steps)), ["joint"] if group.joint else [str(t) for t in steps], fontsize=7)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel("all classes at once" if group.joint else "after step", fontsize=8)
    seeds = f", mean of {len(group.runs)} seeds" if len(group.runs) > 1 else ""
    title = f"{group.label}: IoU (%) per class{seeds}"
    if gap is not None:
        title += (f"\nthe {gap} best and {len(rows) - gap} worst of {len(classes)} classes after the last step"
                  + (f"; every class: {table}" if table else ""))
    ax.set_title(title, fontsize=8)
    bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
    bar.set_label("IoU (%)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    keys = [] if group.joint else [Patch(facecolor=NOT_LEARNT, edgecolor="#666666", linewidth=0.5,
                                         label="not learnt yet")]
    if not group.joint or (np.isnan(grid) & ~unseen).any():
        keys.append(Patch(facecolor=ABSENT, edgecolor=HATCH_COLOUR, hatch="////", linewidth=0.5,
                          label="absent from the test masks"))
    if keys:
        below = 0.5 / (height * (fig.subplotpars.top - fig.subplotpars.bottom))  # 0.5 in under the axes
        ax.legend(handles=keys, loc="upper center", bbox_to_anchor=(0.5, -below), ncol=len(keys),
                  fontsize=7, frameon=False, handlelength=1.4, handleheight=1.2)
    return _save(fig, path)


def forgetting_bars(groups: Sequence[Group], path: Path) -> Path:
    """Forgetting (IoU points lost since the class was learnt) per old class, groups side by side."""
    styles = group_styles(groups)  # each group keeps its colour of the other figures
    everyone = list(groups)
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
    fig = _figure(min(max(COLUMN, 1.0 + 0.32 * len(classes) * max(1, len(groups)) ** 0.5), MAX_WIDTH), 2.6)
    ax = fig.subplots()
    width = 0.8 / len(groups)
    x = np.arange(len(classes))
    for i, (g, s) in enumerate(zip(groups, stats)):
        mean = _pct([s[c].mean if c in s else None for c in classes])
        err = _pct([s[c].std if c in s and s[c].std is not None else 0.0 for c in classes])
        label = g.label + (f" ({len(g.runs)} seeds)" if len(g.runs) > 1 else "")
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, mean, width, color=styles[g.label].colour, label=label,
               hatch=_hatch(everyone, g), edgecolor="white" if _hatch(everyone, g) else None, linewidth=0,
               yerr=err if len(g.runs) > 1 else None, error_kw={"elinewidth": 0.7, "capsize": 1.5})
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center",
                  fontsize=7)
    ax.set_ylabel("IoU lost (points)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(axis="y", labelsize=7)
    handles, labels = ax.get_legend_handles_labels()
    if any(len(g.runs) > 1 for g in groups):
        handles.append(Line2D([], [], color="black", linewidth=0.7, marker="_", markersize=6))
        labels.append("± 1 std over seeds")
    ax.legend(handles, labels, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)
