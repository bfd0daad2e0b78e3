"""Side-by-side panels (``ilseg.visual.panels``), ``ilseg predict``'s comparisons and ``runtime.preview_images``.

Colours are checked against the VOC palette pixel by pixel in the written
PNGs; panel boxes come from the figure's axes and are checked against the
pixels (white outside, the expected colours inside).  The end-to-end tests
train the tiny synthetic run of ``tests/tiny.py`` (seconds on a CPU).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_config

from ilseg.cli import main
from ilseg.config import dump_config, load_config, preset_dir
from ilseg.data.datasets import build_dataset
from ilseg.data.io import dataset_colours, palette, read_mask, write_mask_png
from ilseg.engine.loaders import eval_dataset
from ilseg.engine.run import run_training
from ilseg.errors import IlsegError
from ilseg.placement import Placement
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.runs.folder import load_step_model, training_task
from ilseg.tasks import get_task
from ilseg.visual.panels import (
    GAP,
    MARGIN,
    PANEL_WIDTH,
    TITLE_BAND,
    figure_png,
    panel_figure,
    render_panels,
)
from ilseg.visual.preview import write_preview

PALETTE = np.array(palette(), dtype=np.uint8).reshape(256, 3)
WHITE = (255, 255, 255)
VOC_NAMES = get_task("voc", "15-1").class_names


def decode(png: bytes | Path) -> np.ndarray:
    data = png.read_bytes() if isinstance(png, Path) else png
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def panel_boxes(figure, height: int) -> list[tuple[int, int, int, int]]:
    """``(left, top, right, bottom)`` PNG pixel box of every axes (matplotlib counts y from the bottom)."""
    boxes = []
    for ax in figure.axes:
        b = ax.get_window_extent()
        boxes.append((round(b.x0), round(height - b.y1), round(b.x1), round(height - b.y0)))
    return boxes


def colours_of(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in pixels.reshape(-1, 3)}


def rgb(value: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in PALETTE[value])


def halves(height: int = 30, width: int = 50, split: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """An image blue left of column ``split``, yellow right of it, and its mask: class 1 left, class 2 right."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :split] = (0, 0, 255)
    image[:, split:] = (255, 255, 0)
    mask = np.ones((height, width), np.uint8)
    mask[:, split:] = 2
    return image, mask


# -- the renderer ------------------------------------------------------------------------------
def test_panel_colours_are_the_palette_and_columns_are_aligned(tmp_path):
    image, gt = halves()  # 50x30, boundary at 20/50 = 40% of the width (not a whole scale factor)
    gt[:3] = 255  # an ignored band along the top
    pred = gt.copy()
    pred[:3] = 2
    pred[10:20, 5:15] = 15  # a "person" square
    figure = render_panels(image, [("ground truth", gt), ("ilt step 1", pred)], VOC_NAMES, tmp_path / "p.png")
    png = decode(tmp_path / "p.png")
    assert [ax.get_title() for ax in figure.axes] == ["image", "ground truth", "ilt step 1"]
    boxes = panel_boxes(figure, png.shape[0])
    # same size, same row, whole pixels; white just outside every panel
    assert len({(r - l, b - t) for l, t, r, b in boxes}) == 1 and len({(t, b) for _, t, _, b in boxes}) == 1
    width, height = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
    assert width == PANEL_WIDTH and height == round(PANEL_WIDTH * 30 / 50)
    for left, top, right, bottom in boxes:
        assert colours_of(png[top:bottom, left - 1]) == {WHITE} and colours_of(png[top:bottom, right]) == {WHITE}
    crops = [png[t:b, l:r] for l, t, r, b in boxes]
    # masks: nothing but the palette's colours of their labels (no blending at edges or boundaries)
    assert colours_of(crops[1]) == {rgb(1), rgb(2), rgb(255)}
    assert colours_of(crops[2]) == {rgb(1), rgb(2), rgb(15)}
    y = height // 2
    assert tuple(crops[1][y, width // 5]) == rgb(1) and tuple(crops[1][y, 4 * width // 5]) == rgb(2)
    assert tuple(crops[1][1, width // 2]) == rgb(255)
    assert tuple(crops[2][round(15 / 30 * height), round(10 / 50 * width)]) == rgb(15)
    # the class boundary is at the same x in the image and in both masks: 40% of the panel
    row = [crop[round(25 / 30 * height)] for crop in crops]
    first_right = [int(np.argmax((r == (255, 255, 0)).all(1))) for r in row[:1]]
    first_right += [int(np.argmax((r == rgb(2)).all(1))) for r in row[1:]]
    assert len(set(first_right)) == 1 and abs(first_right[0] - 0.4 * width) <= 1


def test_legend_names_every_class_shown_below_the_panels():
    image, gt = halves()
    gt[0, 0] = 255
    pred = gt.copy()
    pred[5:9, 5:9] = 15
    figure = panel_figure([[("image", image), ("ground truth", gt), ("ilt step 1", pred)]], VOC_NAMES)
    png = decode(figure_png(figure))
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["aeroplane", "bicycle", "person", "ignore"]
    patches = [tuple(round(255 * v) for v in h.get_facecolor()[:3]) for h in legend.legend_handles]
    assert patches == [rgb(1), rgb(2), rgb(15), rgb(255)]
    # below every panel, inside the figure
    box = legend.get_window_extent()
    assert box.y1 < min(ax.get_window_extent().y0 for ax in figure.axes) and box.y0 > 0
    assert box.x0 > 0 and box.x1 < png.shape[1]
    # the legend's colour patches are drawn in the PNG
    top, bottom = round(png.shape[0] - box.y1), round(png.shape[0] - box.y0)
    assert {rgb(1), rgb(2), rgb(15), rgb(255)} <= colours_of(png[top:bottom])


def test_rows_of_different_sizes_align_their_columns():
    wide, wide_gt = halves(30, 50, 20)
    tall, tall_gt = halves(60, 40, 10)
    figure = panel_figure([[("image", wide), ("gt", wide_gt)], [("image", tall), ("gt", tall_gt)]], VOC_NAMES)
    png = decode(figure_png(figure))
    boxes = panel_boxes(figure, png.shape[0])
    assert [b[0] for b in boxes[:2]] == [b[0] for b in boxes[2:]]  # columns share their x
    assert boxes[2][3] - boxes[2][1] == round(PANEL_WIDTH * 60 / 40)
    assert boxes[2][1] >= boxes[0][3] + TITLE_BAND  # the second row's titles fit between the rows
    with pytest.raises(ValueError, match="share their size"):
        panel_figure([[("image", wide), ("gt", tall_gt)]], VOC_NAMES)


# -- predict and previews on tiny trained runs ---------------------------------------------------
def tiny(root: Path, *extra: str):
    return tiny_config(root, *extra, cache_dir=root.parent / "cache")


@pytest.fixture(scope="module")
def runs(synth_root, tmp_path_factory) -> dict[str, Path]:
    """An ILT run, the same with previews of 2 test images, and fine-tuning from the ILT run's step 0."""
    folder = tmp_path_factory.mktemp("runs")
    run_training(tiny(synth_root), folder / "ilt", quiet=True)
    run_training(tiny(synth_root, "runtime.preview_images=2"), folder / "ilt-preview", quiet=True)
    run_training(tiny(synth_root, "method.name=finetune"), folder / "ft", quiet=True, init_from=folder / "ilt")
    return {"ilt": folder / "ilt", "preview": folder / "ilt-preview", "finetune": folder / "ft"}


def val_photo(root: Path, index: int = 0) -> tuple[Path, Path]:
    ds = build_dataset("synth", root, "val")
    return ds.images[index], ds.masks[index]


def panel_labels(png: np.ndarray, column: int, row: int = 0, size: int = 32) -> np.ndarray:
    """The labels drawn in panel ``(row, column)`` of a grid of square ``size``-pixel images, read back
    through the palette at the centre of each image pixel."""
    scale = PANEL_WIDTH // size
    left = MARGIN + column * (PANEL_WIDTH + GAP)
    top = MARGIN + (row + 1) * TITLE_BAND + row * PANEL_WIDTH
    centres = png[top + scale // 2: top + PANEL_WIDTH: scale, left + scale // 2: left + PANEL_WIDTH: scale]
    lookup = {tuple(int(c) for c in colour): v for v, colour in enumerate(dataset_colours("synth"))}
    return np.array([[lookup[tuple(int(c) for c in p)] for p in line] for line in centres], dtype=np.uint8)


def test_steps_all_shows_each_step_of_a_run_side_by_side(runs, synth_root, tmp_path, capsys):
    photo, _ = val_photo(synth_root)
    one_by_one = []
    for step in (0, 1, 2):
        assert main(["predict", "--run", str(runs["ilt"]), "--step", str(step), str(photo),
                     "--out", str(tmp_path / f"s{step}")]) == 0
        one_by_one.append(read_mask(tmp_path / f"s{step}" / f"{photo.stem}_mask.png", 256))
    out = tmp_path / "all"
    assert main(["predict", "--run", str(runs["ilt"]), "--steps", "all", str(photo), "--out", str(out)]) == 0
    assert "1 side-by-side panel " in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == [f"{photo.stem}_panel.png"]
    png = decode(out / f"{photo.stem}_panel.png")
    assert png.shape[1] == 2 * MARGIN + 4 * PANEL_WIDTH + 3 * GAP  # image + one column per step
    for step in (0, 1, 2):  # column 1 + step is exactly that step's prediction
        np.testing.assert_array_equal(panel_labels(png, 1 + step), one_by_one[step])
    assert main(["predict", "--run", str(runs["ilt"]), "--steps", "0,2", str(photo), "--out",
                 str(tmp_path / "two")]) == 0
    assert decode(tmp_path / "two" / f"{photo.stem}_panel.png").shape[1] == 2 * MARGIN + 3 * PANEL_WIDTH + 2 * GAP


def test_runs_and_ground_truth_side_by_side(runs, synth_root, tmp_path, capsys):
    photo, mask = val_photo(synth_root)
    out = tmp_path / "cmp"
    argv = ["predict", "--run", str(runs["ilt"]), "--run", str(runs["finetune"]), str(photo),
            "--gt-dir", str(mask.parent), "--out", str(out)]
    assert main(argv) == 0
    png = decode(out / f"{photo.stem}_panel.png")
    np.testing.assert_array_equal(panel_labels(png, 1), read_mask(mask, 11))  # the ground truth, raw ids
    for column, run in ((2, runs["ilt"]), (3, runs["finetune"])):
        assert main(["predict", "--run", str(run), str(photo), "--out", str(tmp_path / run.name)]) == 0
        np.testing.assert_array_equal(panel_labels(png, column),
                                      read_mask(tmp_path / run.name / f"{photo.stem}_mask.png", 256))
    # one run with ground truth: the usual mask and overlay, and the panel
    capsys.readouterr()
    assert main(["predict", "--run", str(runs["ilt"]), str(photo), "--gt", str(mask), "--out",
                 str(tmp_path / "one")]) == 0
    assert {p.name for p in (tmp_path / "one").iterdir()} == {
        f"{photo.stem}_mask.png", f"{photo.stem}_overlay.png", f"{photo.stem}_panel.png"}
    assert "1 mask and 1 overlay and 1 side-by-side panel " in capsys.readouterr().out
    # one run without ground truth: the panel only when asked for
    assert main(["predict", "--run", str(runs["ilt"]), str(photo), "--panel", "--out", str(tmp_path / "asked")]) == 0
    np.testing.assert_array_equal(panel_labels(decode(tmp_path / "asked" / f"{photo.stem}_panel.png"), 1),
                                  read_mask(tmp_path / "asked" / f"{photo.stem}_mask.png", 256))


def one_error(code: int, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ilseg: error") and "Traceback" not in err[0], err
    return err[0]


def test_predict_refuses_runs_of_different_datasets(runs, tmp_path, capsys):
    voc = tmp_path / "voc-run"
    shutil.copytree(runs["ilt"], voc)
    (voc / "config.yaml").write_text(dump_config(load_config(preset_dir() / "voc-15-1-disjoint-ilt.yaml")))
    photo = next((Path(load_config(runs["ilt"] / "config.yaml").data.root) / "JPEGImages").glob("*.jpg"))
    out = tmp_path / "out"
    line = one_error(main(["predict", "--run", str(runs["ilt"]), "--run", str(voc), str(photo),
                           "--out", str(out)]), capsys)
    assert "different datasets" in line and "synth" in line and "voc" in line and str(voc) in line
    assert not out.exists()


def test_predict_refuses_a_missing_ground_truth_mask(runs, synth_root, tmp_path, capsys):
    first, _ = val_photo(synth_root, 0)
    second, second_mask = val_photo(synth_root, 1)
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    shutil.copy(second_mask, gt_dir)
    out = tmp_path / "out"
    line = one_error(main(["predict", "--run", str(runs["ilt"]), str(first), str(second), "--gt-dir", str(gt_dir),
                           "--out", str(out)]), capsys)
    assert str(gt_dir / f"{first.stem}.png") in line and str(first) in line and not out.exists()
    line = one_error(main(["predict", "--run", str(runs["ilt"]), str(first), str(second), "--gt", str(second_mask),
                           "--out", str(out)]), capsys)
    assert f"no ground-truth mask for image {first}" in line and not out.exists()
    line = one_error(main(["predict", "--run", str(runs["ilt"]), str(first), "--gt", str(second_mask),
                           "--out", str(out)]), capsys)
    assert f"ground-truth mask {second_mask} matches no image" in line and not out.exists()
    small = tmp_path / "small" / f"{first.stem}.png"
    small.parent.mkdir()
    write_mask_png(small, np.zeros((8, 8), np.uint8))
    line = one_error(main(["predict", "--run", str(runs["ilt"]), str(first), "--gt", str(small),
                           "--out", str(out)]), capsys)
    assert str(small) in line and "8x8" in line and "32x32" in line and not out.exists()
    line = one_error(main(["predict", "--run", str(runs["ilt"]), "--step", "1", "--steps", "all", str(first),
                           "--out", str(out)]), capsys)
    assert "not both" in line


def test_preview_images_draw_each_step_and_change_no_result(runs, synth_root):
    preview = runs["preview"] / "preview"
    assert sorted(p.name for p in preview.iterdir()) == ["step0.png", "step1.png", "step2.png"]
    task = get_task("synth", "6-2-2")
    _, mask = val_photo(synth_root, 0)
    raw = read_mask(mask, 11)
    for step in (0, 1, 2):
        png = decode(preview / f"step{step}.png")
        assert png.shape[1] == 2 * MARGIN + 3 * PANEL_WIDTH + 2 * GAP  # image, ground truth, prediction
        assert png.shape[0] > 2 * (PANEL_WIDTH + TITLE_BAND)  # two rows, and the legend
        # the ground truth as the evaluation after that step sees it: classes not seen yet are ignored
        seen = np.isin(raw, task.seen_classes(step)) | (raw == 255)
        np.testing.assert_array_equal(panel_labels(png, 1), np.where(seen, raw, 255))
        assert set(np.unique(panel_labels(png, 2, row=1))) <= set(task.seen_classes(step))
    # the same results and weights as the run without previews
    with_preview = json.loads((runs["preview"] / "results.json").read_text())["steps"]
    without = json.loads((runs["ilt"] / "results.json").read_text())["steps"]
    assert ([{k: v for k, v in s.items() if k != "train_seconds"} for s in with_preview]
            == [{k: v for k, v in s.items() if k != "train_seconds"} for s in without])
    for step in (0, 1, 2):
        a, b = (load_checkpoint(r / f"step{step}.pth")["model"] for r in (runs["preview"], runs["ilt"]))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_preview_images_is_checked_and_may_change_on_resume(runs, synth_root, tmp_path, capsys):
    with pytest.raises(IlsegError, match="runtime.preview_images must be >= 0"):
        tiny(tmp_path, "runtime.preview_images=-1")
    run = tmp_path / "run"
    shutil.copytree(runs["ilt"], run)
    assert main(["train", "--resume", str(run), "--quiet", "--set", "runtime.preview_images=1"]) == 0
    assert load_config(run / "config.yaml").runtime.preview_images == 1
    # --overwrite removes the old run's previews with its other files
    again = tmp_path / "again"
    shutil.copytree(runs["preview"], again)
    run_training(tiny(synth_root), again, quiet=True, overwrite=True, steps="0")
    assert not (again / "preview").exists() or list((again / "preview").iterdir()) == []


def test_write_preview_restores_mode_weights_and_random_state(runs, tmp_path):
    cfg = load_config(runs["ilt"] / "config.yaml", ["runtime.preview_images=2"])
    model, _ = load_step_model(cfg, runs["ilt"] / "step2.pth", 2)
    model.train()
    model.head.eval()  # a mixed state, restored module by module
    modes = {name: m.training for name, m in model.named_modules()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    seen_training = []
    model.register_forward_hook(lambda module, args, out: seen_training.append(module.training))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    path = write_preview(cfg, training_task(cfg), model, 2, tmp_path, Placement(torch.device("cpu")),
                         eval_dataset(cfg, training_task(cfg), 2))
    assert path == tmp_path / "preview" / "step2.png" and decode(path).shape[1] == 2 * MARGIN + 3 * PANEL_WIDTH + 2 * GAP
    assert seen_training == [False, False]  # two images, each forward in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # BN statistics included
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
