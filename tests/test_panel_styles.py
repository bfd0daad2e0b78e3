"""Predict panels look like the reports: each method's marker in its colour before its title, joint training
named as the report names it, and the synthetic classes in colours apart from the background."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from PIL import Image

from ilseg.config import dump_config, load_config, preset_dir
from ilseg.data.io import dataset_colours
from ilseg.tasks import SYNTH_CLASSES
from ilseg.visual.panels import figure_png, panel_figure
from ilseg.visual.predict import prediction_columns
from ilseg.visual.style import METHOD_STYLES, method_style


def _masks() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((20, 20, 3), 90, dtype=np.uint8)
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:15, 5:15] = SYNTH_CLASSES.index("star")
    return image, mask


def test_a_methods_marker_and_colour_stand_before_its_titles():
    image, mask = _masks()
    rows = [[("image", image), ("ground truth", mask), ("ilt step 2", mask), ("joint, all classes at once", mask)]]
    figure = panel_figure(rows * 2, SYNTH_CLASSES, colours=dataset_colours("synth"),
                          marks=[None, None, method_style("ilt"), method_style("joint")])
    marks = [a for a in figure.artists if isinstance(a, Line2D)]
    assert [(to_hex(m.get_color()).upper(), m.get_marker()) for m in marks] == [
        (METHOD_STYLES["ilt"].colour, "s"), (METHOD_STYLES["joint"].colour, "D")] * 2  # both rows
    renderer = figure.canvas.get_renderer()
    for mark, ax in zip(marks, [figure.axes[2], figure.axes[3], figure.axes[6], figure.axes[7]]):
        title = ax.title.get_window_extent(renderer)
        box = mark.get_window_extent(renderer)
        assert box.x1 < title.x0 and title.y0 <= (box.y0 + box.y1) / 2 <= title.y1  # left of the title
        assert box.x0 > ax.get_window_extent(renderer).x0 - 10  # above its own panel, not the one before
    png = np.asarray(Image.open(io.BytesIO(figure_png(figure))).convert("RGB"))
    assert (np.abs(png.reshape(-1, 3).astype(int) - [0xE6, 0x9F, 0x00]).sum(1) < 10).sum() > 20  # drawn


def test_synthetic_star_is_drawn_apart_from_the_background_in_panels():
    image, mask = _masks()
    figure = panel_figure([[("image", image), ("ground truth", mask)]], SYNTH_CLASSES,
                          colours=dataset_colours("synth"))
    (legend,) = figure.legends
    patches = {t.get_text(): tuple(round(255 * v) for v in h.get_facecolor()[:3])
               for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert patches["star"] == (255, 160, 0) and patches["background"] == (0, 0, 0)


def test_joint_is_titled_as_the_report_names_it(tmp_path: Path):
    runs = []
    for method in ("joint", "ilt"):
        run = tmp_path / method
        run.mkdir()
        cfg = load_config(preset_dir() / "synth-demo.yaml", [f"method.name={method}", f"data.root={tmp_path}"])
        (run / "config.yaml").write_text(dump_config(cfg))
        for step in range(1 if method == "joint" else 3):
            (run / f"step{step}.pth").write_bytes(b"")  # only the names are read here
        runs.append(run)
    columns = prediction_columns(runs)
    assert [c.title for c in columns] == ["joint, all classes at once", "ilt step 2"]
    assert [c.style for c in columns] == [METHOD_STYLES["joint"], METHOD_STYLES["ilt"]]
