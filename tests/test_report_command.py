"""``ilseg report``: tables, seed statistics, hIoU, forgetting, figures and pages from hand-written runs."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ilseg.cli import main
from ilseg.config import dump_config, load_config, preset_dir
from ilseg.errors import IlsegError
from ilseg.reports import collect, forgetting, hiou, write_report

CLASSES = ["background", "disc", "square", "triangle", "ring", "cross", "bar", "diamond", "star", "crescent",
           "checker"]


def _step(step: int, old: float, new: float | None, ious: dict[str, float | None]) -> dict:
    seen = {0: 7, 1: 9, 2: 11}[step]
    return {"step": step, "classes_seen": seen, "miou_old": old, "miou_new": new,
            "miou_all": sum(v for v in ious.values() if v is not None) / len(ious), "miou_old_fg": old,
            "pixel_accuracy": 0.9, "mean_class_accuracy": 0.5, "iou_per_class": ious}


def make_run(path: Path, method: str, seed: int, finals: tuple[float, float], disc: tuple[float, float],
             *, task: str = "6-2-2", steps: int = 3) -> Path:
    """A finished run folder: config.yaml as ilseg writes it, results.json with the given numbers.

    ``finals`` = (old, new) mIoU after the last step; ``disc`` = the IoU of the class "disc" after
    step 0 and after the last step (the other classes keep a constant IoU of 0.5).
    """
    cfg = load_config(preset_dir() / "synth-demo.yaml",
                      [f"method.name={method}", f"runtime.seed={seed}", f"data.task={task}", f"data.root={path}"])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(cfg))
    rows = []
    for t in range(steps):
        ious: dict[str, float | None] = {name: 0.5 for name in CLASSES[:{0: 7, 1: 9, 2: 11}[t]]}
        ious["disc"] = disc[0] if t == 0 else disc[1]
        ious["square"] = None if t == 0 else 0.5  # absent from the test masks after step 0
        last = t == steps - 1
        rows.append(_step(t, finals[0] if last else 0.6, finals[1] if last else (None if t == 0 else 0.3), ious))
    results = {"method": method, "dataset": "synth", "task": task, "overlap": False, "order": list(range(11)),
               "step_sizes": [7, 2, 2], "labels": "current step", "steps": rows}
    (path / "results.json").write_text(json.dumps(results))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path / "ilt-s0", "ilt", 0, (0.40, 0.10), (0.60, 0.20)),
        make_run(tmp_path / "ilt-s1", "ilt", 1, (0.50, 0.20), (0.70, 0.40)),
        make_run(tmp_path / "ilt-s2", "ilt", 2, (0.30, 0.30), (0.80, 0.40)),
        make_run(tmp_path / "ft", "finetune", 0, (0.10, 0.40), (0.60, 0.05)),
    ]


def test_hiou_and_forgetting_by_hand():
    assert hiou(0.4, 0.1) == pytest.approx(2 * 0.4 * 0.1 / 0.5)  # 0.16
    assert hiou(0.4, None) is None and hiou(0.0, 0.0) == 0.0
    results = {"steps": [
        {"step": 0, "iou_per_class": {"background": 0.9, "disc": 0.6, "square": None}},
        {"step": 1, "iou_per_class": {"background": 0.8, "disc": 0.7, "square": 0.4, "star": 0.5}},
        {"step": 2, "iou_per_class": {"background": 0.85, "disc": 0.2, "square": 0.3, "star": 0.1, "ring": 0.3}},
    ]}
    forgot = forgetting(results)
    assert forgot["square"] is None  # absent from the masks when it was learnt
    assert {k: v for k, v in forgot.items() if k != "square"} == pytest.approx(
        {"background": 0.05, "disc": 0.4, "star": 0.4}, abs=1e-12)
    assert "ring" not in forgot  # learnt at the last step: nothing to forget yet


def test_seed_group_tables_hold_mean_and_std(runs, tmp_path):
    written = write_report(runs, tmp_path / "report")
    md = written["markdown"].read_text()
    old, new = [0.40, 0.50, 0.30], [0.10, 0.20, 0.30]
    h = [2 * o * n / (o + n) for o, n in zip(old, new)]

    def cell(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    forgot = [0.60 - 0.20, 0.70 - 0.40, 0.80 - 0.40]  # disc; every other class keeps 0.5
    mean_forgetting = [statistics.mean([f, *[0.0] * 7]) for f in forgot]  # 8 old classes, square absent at intro
    row = f"| ilt | 3 (0, 1, 2) | {cell(old)} | {cell(new)} |"
    assert row in md
    line = next(line for line in md.splitlines() if line.startswith(row))
    assert f"| {cell(h)} |" in line and line.endswith(f"| {cell(mean_forgetting)} |")
    ft = next(line for line in md.splitlines() if line.startswith("| finetune |"))
    assert ft.startswith("| finetune | 1 (seed 0) | 10.0 | 40.0 |") and "| 16.0 |" in ft  # hIoU of 0.1 and 0.4
    assert f"| disc | {cell(forgot)} | 55.0 |" in md  # forgetting per class: ilt group, then finetune
    data = json.loads(written["json"].read_text())
    ilt = next(g for g in data["groups"] if g["label"] == "ilt")
    assert ilt["seeds"] == [0, 1, 2]
    assert ilt["final"]["miou_old"]["mean"] == pytest.approx(statistics.mean(old))
    assert ilt["final"]["miou_old"]["std"] == pytest.approx(statistics.stdev(old))
    assert ilt["forgetting"]["disc"]["mean"] == pytest.approx(statistics.mean(forgot))
    assert ilt["iou_per_class"]["diamond"]["0"] is None  # not learnt at step 0
    assert ilt["iou_per_class"]["square"]["0"] == {"mean": None, "std": None, "n": 0}  # absent from the masks


def test_every_figure_decodes_and_the_page_is_self_contained(runs, tmp_path):
    out = tmp_path / "report"
    written = write_report(runs, out)
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"miou_by_step.png", "forgetting.png", "classes_ilt.png",
                                      "classes_finetune.png"}
    for png in pngs:
        with Image.open(png) as im:
            im.load()
            assert 400 <= im.width <= 3000 and 200 <= im.height <= 3000, (png.name, im.size)
    page = written["html"].read_text()
    assert page.count("<img ") == len(pngs)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert not re.search(r"https?://|<script|<link|url\(", page)
    assert "40.0 ± 10.0" in page  # the same numbers as report.md
    for figure in json.loads(written["json"].read_text())["figures"]:
        assert (out / figure).is_file()


def test_joint_is_the_level_line_not_an_incremental_run(runs, tmp_path):
    joint = make_run(tmp_path / "joint", "joint", 0, (0.7, 0.6), (0.9, 0.9), steps=1)
    written = write_report([*runs, joint], tmp_path / "report")
    md = written["markdown"].read_text()
    assert "| joint | all at once | 70.0 | 60.0 |" in md
    forgetting_header = next(line for line in md.splitlines() if line.startswith("| class | ilt"))
    assert "joint" not in forgetting_header


def test_runs_of_different_tasks_or_unfinished_are_refused(runs, tmp_path):
    other = make_run(tmp_path / "other", "ilt", 0, (0.4, 0.1), (0.6, 0.2), task="6-4", steps=2)
    with pytest.raises(IlsegError, match=r"different task.*'6-2-2'.*'6-4'"):
        collect([runs[0], other])
    partial = make_run(tmp_path / "partial", "ilt", 3, (0.4, 0.1), (0.6, 0.2), steps=2)
    with pytest.raises(IlsegError, match=r"partial finished steps \[0, 1\] of 0\.\.2.*--resume"):
        collect([runs[0], partial])
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "results.json").write_text("{}")
    with pytest.raises(IlsegError, match="stray has no config.yaml, so it is not an ilseg run folder"):
        collect([runs[0], stray])


def test_a_folder_of_runs_stands_for_them_and_the_cli_writes_the_report(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert sorted(len(g["runs"]) for g in data["groups"]) == [1, 3]
    assert main(["report", str(runs[0]), "--out", str(runs[0] / "config.yaml")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_an_imported_run_is_not_a_seed_of_ilsegs_own(runs, tmp_path):
    imported = make_run(tmp_path / "mib-import", "ilt", 0, (0.4, 0.1), (0.6, 0.2))
    results = json.loads((imported / "results.json").read_text())
    (imported / "results.json").write_text(json.dumps(results | {"imported": {"format": "mib"}}))
    groups = collect([runs[0], imported])
    assert [g.label for g in groups] == ["ilt", "ilt (mib, imported)"]


def _drawn_axes(monkeypatch, plots) -> list:
    """The axes every figure of ``plots`` draws from now on (Figure.subplots recorded)."""
    drawn: list = []
    original = plots.Figure.subplots

    def spy(self, *args, **kwargs):
        axes = original(self, *args, **kwargs)
        drawn.append(axes)
        return axes

    monkeypatch.setattr(plots.Figure, "subplots", spy)
    return drawn


def test_a_method_keeps_its_colour_and_marker_whatever_the_order_of_the_runs(runs, tmp_path, monkeypatch):
    """Colours follow the method (a fixed table for the presets, a stable hash for others), not the order of
    the arguments; joint training has no forgetting bars and takes no colour from the others there."""
    from matplotlib.colors import to_rgba

    from ilseg.reports import plots
    from ilseg.visual.style import METHOD_STYLES, method_style

    joint = make_run(tmp_path / "joint", "joint", 0, (0.7, 0.6), (0.9, 0.9), steps=1)
    mine = make_run(tmp_path / "mine", "mib", 0, (0.5, 0.5), (0.6, 0.3))  # a method of another name, as
    results = json.loads((mine / "results.json").read_text())  # a registered method of one's own writes it
    (mine / "results.json").write_text(json.dumps(results | {"method": "my-method"}))
    seen = {}
    for order in ([joint, runs[3], runs[0], mine], [mine, runs[0], runs[3], joint]):
        drawn = _drawn_axes(monkeypatch, plots)
        groups = collect(order)
        plots.miou_by_step(groups, tmp_path / "m.png")
        plots.forgetting_bars(groups, tmp_path / "f.png")
        lines = {line.get_label().split(" (")[0].split(",")[0]: (line.get_color(), line.get_marker())
                 for line in drawn[0][0].get_lines()}
        bars = {c.get_label().split(" (")[0]: c.patches[0].get_facecolor() for c in drawn[1].containers}
        seen[len(seen)] = (lines, bars)
        assert lines["finetune"] == (METHOD_STYLES["finetune"].colour, METHOD_STYLES["finetune"].marker)
        assert lines["ilt"] == (METHOD_STYLES["ilt"].colour, METHOD_STYLES["ilt"].marker)
        assert lines["joint"][0] == METHOD_STYLES["joint"].colour and "joint" not in bars
        assert bars["finetune"] == to_rgba(METHOD_STYLES["finetune"].colour)
        assert bars["my-method"] == to_rgba(method_style("my-method").colour)
    assert seen[0] == seen[1]
    # the built-in presets all differ from one another; the six of the README's figures even in colour
    distinct = {name: style for name, style in METHOD_STYLES.items() if not name.endswith("-ade")}
    assert len(set(distinct.values())) == len(distinct)
    assert all(style == METHOD_STYLES[name.removesuffix("-ade")] for name, style in METHOD_STYLES.items()
               if name.endswith("-ade"))  # a method's ADE20k preset is drawn as the method
    readme = ["finetune", "ilt", "ilt-kd-out", "joint", "mib", "plop"]
    assert len({METHOD_STYLES[m].colour for m in readme}) == len(readme)
    from ilseg.methods import METHOD_PRESETS
    assert set(METHOD_PRESETS) <= set(METHOD_STYLES)
    assert method_style("my-method") == method_style("my-method") and method_style("x").colour.startswith("#")


def test_two_experiments_of_one_method_share_its_colour_with_another_line_style(runs, tmp_path, monkeypatch):
    from ilseg.reports import plots

    other = make_run(tmp_path / "ilt-lr", "ilt", 0, (0.2, 0.2), (0.6, 0.3))
    config = (other / "config.yaml").read_text().replace("lr: 0.004", "lr: 0.005")
    (other / "config.yaml").write_text(config)
    groups = collect([runs[0], other])
    assert len(groups) == 2
    styles = plots.group_styles(groups)
    first, second = (styles[g.label] for g in groups)
    assert first.colour == second.colour and first.marker == second.marker and first.dashes != second.dashes


def test_heatmaps_at_real_sizes_keep_not_learnt_and_absent_apart(tmp_path):
    """VOC 15-1 (21 classes x 6 steps): every class a row.  ADE20k 100-5 (151 x 11): the 20 best and 20 worst
    classes after the last step, every class in classes_<run>.csv beside the report."""
    from report_runs import make_task_run

    from ilseg.reports import plots

    voc = collect([make_task_run(tmp_path / "voc", "voc-15-1-ov-ilt", "ilt", 0)])[0]
    classes, iou, not_learnt = plots.class_grid(voc)
    assert iou.shape == (21, 6) and plots.shown_rows(classes, iou) == (list(range(21)), None)
    assert not_learnt[classes.index("tvmonitor")].tolist() == [True] * 5 + [False]  # learnt at step 5
    absent = np.isnan(iou) & ~not_learnt
    assert absent.any() and not (absent & not_learnt).any()

    out = tmp_path / "ade-report"
    written = write_report([make_task_run(tmp_path / "ade", "ade-100-5-ov-ilt", "ilt", 0, quality=0.35)], out)
    ade = collect([tmp_path / "ade"])[0]
    classes, iou, not_learnt = plots.class_grid(ade)
    assert iou.shape == (151, 11)
    rows, gap = plots.shown_rows(classes, iou)
    assert len(rows) == 40 and gap == 20 and len(set(rows)) == 40
    final = iou[rows, -1]
    assert list(final) == sorted(final, reverse=True)  # best first, the worst last
    assert min(final[:20]) >= np.nanmax(np.delete(iou[:, -1], rows))  # no better class left out at the top
    table = list(csv.reader((out / "classes_ilt.csv").open()))
    assert table[0] == ["class", *[f"step {t}" for t in range(11)]] and len(table) == 152
    row = dict(zip(table[0], next(r for r in table if r[0] == classes[-1])))  # learnt at the last step
    assert row["step 0"] == "not learnt" and float(row["step 10"]) >= 0
    assert any("" in r[1:] for r in table[1:])  # absent from the test masks: empty
    with Image.open(out / "classes_ilt.png") as im:
        assert im.height < 3000 and im.width < 2000
    page = written["html"].read_text()
    assert "every class: classes_ilt.csv" in page and "151 rows: show" in page


def test_the_page_reads_on_a_narrow_window(runs, tmp_path):
    page = write_report(runs, tmp_path / "report")["html"].read_text()
    assert '<meta name=viewport content="width=device-width, initial-scale=1">' in page
    assert page.count("<table>") == page.count("<div class=scroll><table>")  # every table scrolls in its box
    assert ".scroll{overflow-x:auto" in page
    widths = re.findall(r'<img alt="[^"]*" width="(\d+)" style="min-width:(\d+)px"', page)
    assert len(widths) == page.count("<img ") and all(int(m) <= 560 for _, m in widths)


def test_the_seed_band_is_named_in_the_legend(runs, tmp_path, monkeypatch):
    from ilseg.reports import plots

    drawn = _drawn_axes(monkeypatch, plots)
    legends = []
    original = plots.Figure.legend
    monkeypatch.setattr(plots.Figure, "legend", lambda self, *a, **k: legends.append(a[1]) or original(self, *a, **k))
    plots.miou_by_step(collect(runs), tmp_path / "m.png")
    assert "band: mean ± 1 std over seeds" in legends[0] and drawn
    legends.clear()
    plots.miou_by_step(collect([runs[3]]), tmp_path / "one.png")  # one seed: no band, nothing to name
    assert not any("band" in label for label in legends[0])


def test_a_diverged_run_is_refused_with_its_own_advice(runs, tmp_path, capsys):
    partial = make_run(tmp_path / "nan", "ilt", 5, (0.4, 0.1), (0.6, 0.2), steps=2)
    results = json.loads((partial / "results.json").read_text())
    advice = (f"Lower the learning rate and train step 2 again, keeping the finished steps: ilseg train --resume "
              f"{partial} --set optim.lr_next=0.0004")
    results["diverged"] = {"step": 2, "epoch": 3, "error": "the training loss became non-finite at step 2",
                           "advice": advice}
    (partial / "results.json").write_text(json.dumps(results))
    assert main(["report", str(runs[0]), str(partial), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "stopped in step 2, epoch 3: the training loss became non-finite" in err
    assert "--set optim.lr_next=0.0004" in err and f"`ilseg train --resume {partial}`" not in err
