"""``ilseg report``: report.md, report.html (self-contained), report.json and the figures.

The tables are built once as rows of cells and written twice, as Markdown
and as HTML, so the two pages always show the same numbers; report.json
holds those numbers unrounded.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

import ilseg
from ilseg.errors import IlsegError
from ilseg.fileio import atomic_write_text
from ilseg.reports import plots
from ilseg.reports.collect import BEST_ON_TEST_NOTE, Group, Stat, collect


def fmt(stat: Stat | None, digits: int = 1) -> str:
    """``38.6 ± 2.4`` (percent; ± one sample std over seeds), ``38.6`` for one run, ``-`` for none."""
    if stat is None or stat.mean is None:
        return "-"
    text = f"{100 * stat.mean:.{digits}f}"
    return text + (f" ± {100 * stat.std:.{digits}f}" if stat.std is not None else "")


FOLDED_ROWS = 40  # a longer table (ADE20k's 151 classes) is folded in the HTML page


@dataclass
class Table:
    title: str
    note: str
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.note, ""] if self.note else [f"## {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|---|" + "---:|" * (len(self.header) - 1))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        """The table in a box that scrolls sideways on a narrow window; one of more than
        :data:`FOLDED_ROWS` rows is folded (``<details>``, opened with a click, no script)."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f"<p class=note>{html.escape(self.note)}</p>" if self.note else ""
        table = f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"
        if len(self.rows) > FOLDED_ROWS:
            table = f"<details><summary>{len(self.rows)} rows: show</summary>{table}</details>"
        return f"<h2>{html.escape(self.title)}</h2>{note}{table}"


def seeds_cell(g: Group) -> str:
    return str(len(g.runs)) + (f" ({', '.join(map(str, g.seeds))})" if len(g.runs) > 1 else f" (seed {g.seeds[0]})")


def tables(groups: Sequence[Group]) -> list[Table]:
    main = Table(
        "After the last step",
        "mIoU in %; old = the step-0 classes (background included), new = the classes added since; hIoU = the "
        "harmonic mean of old and new; forgetting = IoU points an old class lost between the step that introduced "
        "it and the last step, averaged over those classes.  Seed groups show mean ± sample standard deviation.",
        ["method", "seeds", "old", "new", "all", "hIoU", "mean all over steps", "mean forgetting"],
        [[g.label, seeds_cell(g), fmt(g.final("miou_old")), fmt(g.final("miou_new")), fmt(g.final("miou_all")),
          fmt(g.final("hiou")), "-" if g.joint else fmt(g.final("mean_miou_over_steps")),
          "-" if g.joint else fmt(g.final("mean_forgetting"))] for g in groups])
    per_step = Table(
        "Per step", "mIoU in % after each step.",
        ["method", "step", "old", "new", "all", "hIoU"],
        [[g.label, "all at once" if g.joint else str(t), fmt(g.at_step("miou_old", t)),
          fmt(g.at_step("miou_new", t)), fmt(g.at_step("miou_all", t)), fmt(g.at_step("hiou", t))]
         for g in groups for t in g.steps])
    incremental = [g for g in groups if not g.joint]
    forgot = [g.forgetting() for g in incremental]
    classes = list(dict.fromkeys(c for f in forgot for c in f))
    forgetting = Table(
        "Forgetting per old class",
        "IoU points lost: IoU after the step that introduced the class minus IoU after the last step "
        "(negative: the class improved).  Joint training has one step and is left out.",
        ["class", *[g.label for g in incremental]],
        [[name, *[fmt(f.get(name)) for f in forgot]] for name in classes])
    out = [main, per_step, forgetting]
    for g in groups:
        out.append(Table(
            f"Per-class IoU: {g.label}", "IoU in % after each step; empty before the class is learnt; - where the "
            f"class is absent from the test masks (the same as {class_table_name(g)}, in fractions).",
            ["class", *["joint" if g.joint else f"step {t}" for t in g.steps]],
            [[name, *["" if (s := g.class_iou(name, t)) is None else fmt(s) for t in g.steps]]
             for name in g.classes()]))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def class_table_name(g: Group) -> str:
    return f"classes_{_slug(g.label)}.csv"


def class_csv(g: Group) -> str:
    """Every class's IoU after each step (fractions, the mean over the seeds): ``not learnt`` before the
    class is learnt, empty where it is absent from the test masks; beside the report as
    :func:`class_table_name`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", *["joint" if g.joint else f"step {t}" for t in g.steps]])
    for name in g.classes():
        stats = [g.class_iou(name, t) for t in g.steps]
        writer.writerow([name, *["not learnt" if s is None else "" if s.mean is None else f"{s.mean:.6g}"
                                 for s in stats]])
    return buffer.getvalue()


def figures(groups: Sequence[Group], out: Path) -> list[tuple[str, Path]]:
    """(caption, path) of every figure, written into ``out``, with each group's per-class table as CSV."""
    made = [("mIoU of all, old and new classes after each step", plots.miou_by_step(groups, out / "miou_by_step.png")),
            ("Forgetting per old class", plots.forgetting_bars(groups, out / "forgetting.png"))]
    for g in groups:
        table = class_table_name(g)
        atomic_write_text(out / table, class_csv(g))
        made.append((f"Per-class IoU after each step: {g.label} (every class: {table})",
                     plots.class_heatmap(g, out / f"classes_{_slug(g.label)}.png", table=table)))
    return made


def previews(groups: Sequence[Group], out: Path) -> list[tuple[str, Path]]:
    """The runs' ``preview/step{t}.png`` (``runtime.preview_images``), copied next to the report."""
    found = []
    for g in groups:
        run = g.runs[0]
        for t in g.steps:
            source = run.path / "preview" / f"step{t}.png"
            if source.is_file():
                target = out / "previews" / f"{_slug(g.label)}-step{t}.png"
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, target)
                found.append((f"{g.label} after step {t} (seed {run.seed}): image, ground truth, prediction", target))
    return found


MIN_FIGURE_WIDTH = 560  # CSS pixels: on a narrower window a figure keeps this width and scrolls sideways


def _img(path: Path, scale: float = 1.0) -> str:
    """The PNG embedded; ``scale`` < 1 shows a figure drawn at :data:`plots.DPI` at a readable size
    (``width`` in CSS pixels, never more than the page's width, never less than
    :data:`MIN_FIGURE_WIDTH` or its own: on a narrow window the figure's box scrolls sideways)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    size = ""
    if scale != 1.0:
        with Image.open(path) as image:
            width = round(image.width * scale)
        size = f' width="{width}" style="min-width:{min(width, MIN_FIGURE_WIDTH)}px"'
    return f'<img alt="{html.escape(path.stem)}"{size} src="data:image/png;base64,{data}">'


STYLE = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.9em}figure{margin:1em 0;overflow-x:auto}img{max-width:100%;height:auto}
figcaption{font-size:.9em;color:#444}
.scroll{overflow-x:auto;max-width:100%}.scroll table{margin:0}
details{margin:.6em 0}summary{cursor:pointer;color:#0b5394}
.maps{display:flex;flex-wrap:wrap;gap:1em 2em;align-items:flex-start}.maps figure{margin:0;max-width:100%}
@media (max-width:600px){body{margin:1em auto;padding:0 .5em}}
"""


def title_of(groups: Sequence[Group]) -> str:
    r = groups[0].runs[0].results
    return f"{r.get('dataset')} {r.get('task')} ({'overlapped' if r.get('overlap') else 'disjoint'})"


def write_report(paths: Sequence[str | Path], out: str | Path, *,
                 skipped: list[tuple[Path, str]] | None = None, selection: str = "final") -> dict[str, Path]:
    """Compare the runs of ``paths`` and write the report into ``out``; return the files written.

    ``skipped``: leave out the runs that cannot be read and append ``(run, why)`` there (``--skip-bad``);
    the report lists them too.  Without it such a run is refused.  ``selection``: ``"final"`` (each step's
    final model) or ``"best-on-test"`` (the best evaluation during each step, a selection on the test set,
    said at the top of every page).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IlsegError(f"--out {out} is a file; give a folder for the report")
    groups = collect(paths, skipped=skipped, selection=selection)
    left_out = [f"{path}: {why}" for path, why in skipped or []]
    out.mkdir(parents=True, exist_ok=True)
    title = f"ilseg report: {title_of(groups)}"
    n_runs = sum(len(g.runs) for g in groups)
    made = f"{n_runs} runs in {len(groups)} groups, ilseg {ilseg.__version__}, {datetime.date.today().isoformat()}"
    runs_list = [f"{g.label}: " + ", ".join(str(r.path) for r in g.runs) for g in groups]
    tabs = tables(groups)
    figs = figures(groups, out)
    shots = previews(groups, out)

    if selection == "best-on-test":
        title += " (best of evaluations, selected on the test set)"
    warning = [f"**{BEST_ON_TEST_NOTE}**", ""] if selection == "best-on-test" else []
    md = [f"# {title}", "", *warning, made, "", *[f"- {line}" for line in runs_list], ""]
    if left_out:
        md += ["Left out (--skip-bad), as they could not be read:", "", *[f"- {line}" for line in left_out], ""]
    md += [t.markdown() for t in tabs]
    md += ["## Figures", ""] + [f"![{cap}]({p.relative_to(out).as_posix()})\n\n*{cap}*\n" for cap, p in figs]
    if shots:
        md += ["## Predictions on fixed test images", ""]
        md += [f"![{cap}]({p.relative_to(out).as_posix()})\n\n*{cap}*\n" for cap, p in shots]
    atomic_write_text(out / "report.md", "\n".join(md))

    body = [f"<h1>{html.escape(title)}</h1>"
            + (f"<p><strong>{html.escape(BEST_ON_TEST_NOTE)}</strong></p>" if selection == "best-on-test" else "")
            + f"<p class=note>{html.escape(made)}</p><ul>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in runs_list) + "</ul>"]
    if left_out:
        body.append("<p class=note>Left out (--skip-bad), as they could not be read:</p><ul>"
                    + "".join(f"<li>{html.escape(line)}</li>" for line in left_out) + "</ul>")
    body += [tabs[0].html(), "<h2>Figures</h2>"]
    print_size = 130 / plots.DPI  # 130 CSS pixels per inch of figure: 7 pt text at about 12 px
    body += [f"<figure>{_img(p, print_size)}<figcaption>{html.escape(cap)}</figcaption></figure>"
             for cap, p in figs[:2]]
    body.append("<div class=maps>" + "".join(f"<figure>{_img(p, print_size)}<figcaption>{html.escape(cap)}"
                                             "</figcaption></figure>" for cap, p in figs[2:]) + "</div>")
    body += [t.html() for t in tabs[1:]]
    if shots:
        body.append("<h2>Predictions on fixed test images</h2>")
        body += [f"<figure>{_img(p)}<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, p in shots]
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    atomic_write_text(out / "report.html", page)

    record: dict[str, Any] = {"title": title, "created": made, "selection": selection, "dataset": groups[0].runs[0].results.get("dataset"),
                              "task": groups[0].runs[0].results.get("task"),
                              "overlap": groups[0].runs[0].results.get("overlap"),
                              "units": "fractions (0..1); the pages show percent",
                              "groups": [g.to_dict() for g in groups],
                              "figures": [p.relative_to(out).as_posix() for _, p in figs + shots],
                              "left_out": [{"run": str(path), "why": why} for path, why in skipped or []]}
    atomic_write_text(out / "report.json", json.dumps(record, indent=2) + "\n")
    return {"markdown": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
