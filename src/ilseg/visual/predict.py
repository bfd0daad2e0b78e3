"""Predict masks for arbitrary images with saved steps of one or more runs, and show them side by side.

One run at one step writes ``<stem>_mask.png`` (palette, dataset class ids)
and ``<stem>_overlay.png`` per image.  Given ground truth, several runs, or
several steps of a run (``steps="all"``: how forgetting is seen), it also
writes ``<stem>_panel.png``: the image, the ground truth and each prediction
side by side in the dataset's palette, with a legend (:mod:`ilseg.visual.panels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ilseg.config import RunConfig
from ilseg.data.io import (
    PHOTO_FIX,
    dataset_colours,
    image_size,
    overlay,
    read_image,
    read_mask,
    write_mask_png,
)
from ilseg.data.transforms import eval_transform
from ilseg.errors import IlsegError
from ilseg.fileio import atomic_write_bytes
from ilseg.methods import build_method
from ilseg.models import IncrementalSegmenter
from ilseg.placement import resolve_device
from ilseg.runs.folder import (
    finished_steps,
    load_step_model,
    read_run_config,
    step_checkpoint,
    training_task,
)
from ilseg.visual.panels import render_panels
from ilseg.visual.style import MethodStyle, method_style, step_title
from ilseg.visual.preview import channel_to_dataset_ids

Steps = Literal["all"] | Sequence[int]


@dataclasses.dataclass(frozen=True)
class PredictionColumn:
    """A saved step of a run whose predictions form one column of the panels."""

    title: str  # e.g. "ilt step 2", "joint, all classes at once"
    run_dir: Path
    step: int
    cfg: RunConfig  # the settings that step was trained with

    @property
    def style(self) -> MethodStyle:
        """The method's colour and marker, as reports draw it."""
        return method_style(self.cfg.method.name)


def predict_images(runs: str | Path | Sequence[str | Path], images: Sequence[str | Path], out_dir: Path, *,
                   step: int | None = None, steps: Steps | None = None,
                   ground_truth: Sequence[str | Path] = (), ground_truth_dir: str | Path | None = None,
                   panel: bool = False, device: str | None = None) -> list[Path]:
    """Segment ``images`` with each run (at ``step``, each of ``steps``, or its last finished step).

    Images are segmented at their full resolution.  Output channel k is
    mapped back to the dataset's class id ``order[k]``, so masks and panels
    use the dataset's palette whatever the class order.

    Args:
        runs: one run folder or several, all of one dataset.
        images: the photos; their file names (without extension) must differ.
        out_dir: the folder for the outputs.
        step: the step of every run (default: each run's last finished step).
        steps: ``"all"`` (every finished step) or a list of steps, for each
            run; not with ``step``.
        ground_truth: masks (dataset class ids, 255 = ignore) matched to
            ``images`` by file name without extension, one per image.
        ground_truth_dir: a folder holding ``<stem>.png`` for each image
            (instead of ``ground_truth``).
        panel: write ``<stem>_panel.png`` even for one prediction and no
            ground truth.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (default: each run's).

    Writes ``<stem>_mask.png`` and ``<stem>_overlay.png`` when there is one
    prediction per image, and ``<stem>_panel.png`` when there is ground
    truth, more than one prediction, or ``panel``.  Every input is read and
    checked before anything is written.  Returns the files written.
    """
    run_dirs = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    columns = prediction_columns(run_dirs, step=step, steps=steps)
    out_dir = Path(out_dir)
    photos = checked_photos(images, out_dir)
    truth = match_ground_truth(photos, [Path(m) for m in ground_truth],
                               Path(ground_truth_dir) if ground_truth_dir is not None else None)
    class_names = training_task(columns[0].cfg).class_names
    colours = dataset_colours(columns[0].cfg.data.dataset)
    for path in photos:  # every input is decoded once before anything is written
        rgb = read_image(path, fix=PHOTO_FIX)
        if path in truth:
            read_truth(truth[path], path, rgb.shape[:2], len(class_names))
    predictions = predict_columns(columns, photos, device)
    written = []
    for path in photos:
        rgb = read_image(path, fix=PHOTO_FIX)
        shown = [(column.title, mask) for column, mask in zip(columns, predictions[path])]
        marks: list[MethodStyle | None] = [column.style for column in columns]
        if len(shown) == 1:
            written += write_mask_and_overlay(out_dir / path.stem, rgb, shown[0][1], colours)
        if path in truth or len(shown) > 1 or panel:
            if path in truth:
                shown.insert(0, ("ground truth", read_truth(truth[path], path, rgb.shape[:2], len(class_names))))
                marks.insert(0, None)
            panel_path = out_dir / f"{path.stem}_panel.png"
            render_panels(rgb, shown, class_names, panel_path, colours=colours, marks=marks)
            written.append(panel_path)
    return written


def predict_columns(columns: Sequence[PredictionColumn], photos: Sequence[Path],
                    device: str | None) -> dict[Path, list[np.ndarray]]:
    """``{photo: [its mask of dataset class ids, one per column]}``.

    One model is in memory at a time (``--steps all`` of a long run would
    otherwise hold every step's model at once): loaded, run on every photo,
    freed; each photo is decoded again for each model.  Every checkpoint is
    loaded here, before anything is written.
    """
    transform = eval_transform(None, crop=False)
    predictions: dict[Path, list[np.ndarray]] = {path: [] for path in photos}
    for column in columns:
        model, to_ids = column_model(column, device)
        for path in photos:
            rgb = read_image(path, fix=PHOTO_FIX)
            x, _ = transform(rgb, np.zeros(rgb.shape[:2], dtype=np.uint8))
            predictions[path].append(predict_one(model, to_ids, x))
        on_gpu = next(model.parameters()).device.type == "cuda"
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    return predictions


def checked_photos(images: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """``images`` as paths, refusing a file as ``--out``, folders among the images and clashing file names."""
    if out_dir.exists() and not out_dir.is_dir():
        raise IlsegError(f"--out {out_dir} is a file, not a folder; give a folder for the masks and overlays")
    photos = [Path(p) for p in images]
    folders = [str(p) for p in photos if p.is_dir()]
    if folders:
        raise IlsegError(f"{', '.join(folders)} {'is a folder' if len(folders) == 1 else 'are folders'}: give "
                         f"image files, e.g. {folders[0]}/*.jpg")
    stems = [p.stem for p in photos]
    clashes = sorted({str(p) for p in photos if stems.count(p.stem) > 1})
    if clashes:
        raise IlsegError(f"images {', '.join(clashes)} share a file name, so their masks would overwrite each "
                         "other in --out; predict them in separate runs (or rename them)")
    return photos


def write_mask_and_overlay(prefix: Path, rgb: np.ndarray, pred: np.ndarray,
                           colours: np.ndarray | None = None) -> list[Path]:
    """``<prefix>_mask.png`` (palette PNG of dataset ids, VOC's palette) and ``<prefix>_overlay.png`` (in
    ``colours``, default VOC's); returns both paths."""
    mask_path = prefix.with_name(f"{prefix.name}_mask.png")
    atomic_write_bytes(mask_path, lambda f: write_mask_png(f, pred))
    blend = Image.fromarray(overlay(rgb, pred, colours=colours))
    overlay_path = prefix.with_name(f"{prefix.name}_overlay.png")
    atomic_write_bytes(overlay_path, lambda f: blend.save(f, format="PNG"))
    return [mask_path, overlay_path]


def prediction_columns(run_dirs: Sequence[Path], *, step: int | None = None,
                       steps: Steps | None = None) -> list[PredictionColumn]:
    """The (run, step) pairs to predict with, in the order given; refuses runs of different datasets.

    Titles are "<method> step <t>" ("joint, all classes at once" for a method
    trained on every class in one step, as reports name it); when two runs
    share a method, their folder names (or, if those are the same too, their
    paths) name them.
    """
    if not run_dirs:
        raise IlsegError("predict needs at least one --run RUN_DIR")
    if step is not None and steps is not None:
        raise IlsegError("give --step N (one step of each run) or --steps LIST (several), not both")
    configs = [read_run_config(run_dir) for run_dir in run_dirs]  # one clear error if one is not a run folder
    first = configs[0].data.dataset
    for run_dir, cfg in zip(run_dirs, configs):
        if cfg.data.dataset != first:
            raise IlsegError(f"runs {run_dirs[0]} (dataset {first}) and {run_dir} (dataset {cfg.data.dataset}) "
                             "are of different datasets, whose class ids mean different classes; predict runs of "
                             "one dataset together")
    columns = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs, configs)):
        for t in chosen_steps(run_dir, step, steps):
            cfg = read_run_config(run_dir, step=t)
            title = step_title(label, t, all_at_once=build_method(cfg.method).all_classes_at_once)
            columns.append(PredictionColumn(title, run_dir, t, cfg))
    return columns


def run_labels(run_dirs: Sequence[Path], configs: Sequence[RunConfig]) -> list[str]:
    """A distinct name per run: its method, else its folder's name, else its path."""
    for names in ([c.method.name for c in configs], [r.name for r in run_dirs]):
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in run_dirs]


def chosen_steps(run_dir: Path, step: int | None, steps: Steps | None) -> list[int]:
    """The finished steps of ``run_dir`` to predict with; a step that is not finished is refused."""
    done = finished_steps(run_dir)
    if not done:
        raise IlsegError(f"--run {run_dir} has no finished step (no step*.pth)")
    if steps == "all":
        return done
    wanted = list(steps) if steps is not None else [step] if step is not None else [done[-1]]
    missing = [t for t in wanted if t not in done]
    if missing:
        raise IlsegError(f"{run_dir} has no finished step {', '.join(map(str, missing))}; finished steps: "
                         f"{', '.join(map(str, done))}")
    return wanted


def parse_step_list(text: str) -> Steps:
    """``"all"`` or a comma-separated list of steps (``"0,1,2"``), as ``--steps`` takes them."""
    if text.strip() == "all":
        return "all"
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise IlsegError(f"--steps {text!r}: give 'all' or steps separated by commas, e.g. --steps 0,1,2") from None
    if any(t < 0 for t in steps):
        raise IlsegError(f"--steps {text!r}: steps are numbered from 0")
    return steps


def match_ground_truth(photos: Sequence[Path], masks: Sequence[Path],
                       folder: Path | None) -> dict[Path, Path]:
    """``{photo: its ground-truth mask}``, matched by file name without extension (empty without masks).

    ``masks`` must hold one mask per photo and none for another file;
    ``folder`` must hold ``<stem>.png`` for every photo.
    """
    if masks and folder is not None:
        raise IlsegError("give the ground truth as --gt MASK... or as --gt-dir DIR, not both")
    if folder is not None:
        if not folder.is_dir():
            raise IlsegError(f"--gt-dir {folder} is not a folder; give the folder of the ground-truth masks")
        truth = {photo: folder / f"{photo.stem}.png" for photo in photos}
        missing = [f"{mask} (for {photo})" for photo, mask in truth.items() if not mask.is_file()]
        if missing:
            raise IlsegError(f"no ground-truth mask {', '.join(missing)}; --gt-dir needs <image name>.png for "
                             "every image")
        return truth
    if not masks:
        return {}
    by_stem: dict[str, Path] = {}
    for mask in masks:
        if mask.stem in by_stem:
            raise IlsegError(f"ground-truth masks {by_stem[mask.stem]} and {mask} share a file name; masks are "
                             "matched to images by file name, give one per image")
        by_stem[mask.stem] = mask
    stems = {photo.stem for photo in photos}
    unmatched = [str(m) for m in masks if m.stem not in stems]
    if unmatched:
        raise IlsegError(f"ground-truth mask {', '.join(unmatched)} matches no image (masks are matched to images "
                         f"by file name without extension: {', '.join(sorted(stems))})")
    missing = [str(p) for p in photos if p.stem not in by_stem]
    if missing:
        raise IlsegError(f"no ground-truth mask for image {', '.join(missing)} among --gt; give one per image "
                         "(same file name, .png), or predict those images without --gt")
    return {photo: by_stem[photo.stem] for photo in photos}


def read_truth(mask: Path, photo: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """The ground-truth mask of ``photo`` (dataset class ids), which must be the photo's size."""
    height, width = image_size(mask, "mask", fix="give the ground truth as an 8-bit index PNG of class ids")
    if (height, width) != tuple(size):
        raise IlsegError(f"ground-truth mask {mask} is {width}x{height} (WxH) but image {photo} is "
                         f"{size[1]}x{size[0]}; give the mask of that image")
    return read_mask(mask, num_classes)


def column_model(column: PredictionColumn, device: str | None) -> tuple[IncrementalSegmenter, np.ndarray]:
    """The column's model (eval mode, on its device) and its channel -> dataset class id table."""
    model, _ = load_step_model(column.cfg, step_checkpoint(column.run_dir, column.step), column.step,
                               for_inference=True)
    model.to(resolve_device(device or column.cfg.runtime.device)).eval()
    return model, channel_to_dataset_ids(training_task(column.cfg), column.step)


def predict_one(model: IncrementalSegmenter, to_dataset_ids: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """``HxW`` dataset class ids predicted for the normalised ``3xHxW`` image ``x``."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(x.unsqueeze(0).to(device))["logits"]
    return to_dataset_ids[logits.argmax(1)[0].cpu().numpy()]
