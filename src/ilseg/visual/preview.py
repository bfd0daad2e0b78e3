"""``RUN_DIR/preview/step{t}.png``: what the model sees and predicts after a step (``runtime.preview_images``).

After each step's evaluation, the first N images of the test split (in the
split's order: the same images after every step) are drawn one per row:
the image, its ground truth as the evaluation after that step labels it
(classes not seen yet are ignored or background, as ``data.unseen`` says),
and the model's prediction, in the dataset's palette (:mod:`ilseg.visual.panels`).
Looking at ``step0.png``, ``step1.png``, ... shows forgetting as it happens.

It costs one forward pass per image.  It changes nothing that training
uses: the model's train/eval mode and every random number generator are
restored, and the images go through the deterministic test transform.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ilseg.config import RunConfig
from ilseg.data.datasets import SegmentationDataset
from ilseg.data.io import dataset_colours
from ilseg.data.transforms import denormalize
from ilseg.fileio import atomic_write_bytes
from ilseg.methods import build_method
from ilseg.placement import Placement
from ilseg.tasks import IGNORE_INDEX, Task
from ilseg.visual.panels import Column, figure_png, panel_figure
from ilseg.visual.style import method_style, step_title

PREVIEW_DIR = "preview"


def preview_path(run_dir: Path, step: int) -> Path:
    """``RUN_DIR/preview/step{step}.png``."""
    return Path(run_dir) / PREVIEW_DIR / f"step{step}.png"


def write_preview(cfg: RunConfig, task: Task, model: nn.Module, step: int, run_dir: Path,
                  placement: Placement, dataset: SegmentationDataset) -> Path | None:
    """Draw the first ``cfg.runtime.preview_images`` test images after ``step``; return the file (None if off).

    Args:
        cfg: the run's config.
        task: the task the model is trained on (its channels are
            ``task.seen_classes(step)``).
        model: the model after ``step``, on ``placement.device``.
        step: the step just evaluated.
        run_dir: the run folder.
        placement: the device, autocast and memory format of the evaluation.
        dataset: the test split after ``step`` (its first images are drawn).
    """
    count = cfg.runtime.preview_images
    if count <= 0:
        return None
    to_dataset_ids = channel_to_dataset_ids(task, step)
    title = step_title(cfg.method.name, step, all_at_once=build_method(cfg.method).all_classes_at_once)
    rows: list[list[Column]] = []
    with unchanged_rng(placement.device), evaluation_mode(model), torch.inference_mode():
        for index in range(min(count, len(dataset))):
            x, target = dataset[index]
            with placement.autocast():
                logits = model(placement.images(x.unsqueeze(0)))["logits"]
            prediction = logits.argmax(1)[0].cpu().numpy()
            rows.append([("image", to_uint8_image(x, cfg.data.normalize)), (f"ground truth (step {step})", to_dataset_ids[target.numpy()]),
                         (title, to_dataset_ids[prediction])])
    if not rows:
        return None
    png = figure_png(panel_figure(rows, task.class_names, colours=dataset_colours(cfg.data.dataset),
                                  marks=[None, None, method_style(cfg.method.name)]))
    path = preview_path(run_dir, step)
    atomic_write_bytes(path, lambda f: f.write(png))
    return path


def channel_to_dataset_ids(task: Task, step: int) -> np.ndarray:
    """A 256-entry table: output channel / target value ``k`` -> dataset class id (255 stays 255).

    >>> from ilseg.tasks import get_task
    >>> channel_to_dataset_ids(get_task("voc", "15-1"), 0)[[0, 15, 255]].tolist()
    [0, 15, 255]
    """
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    seen = task.seen_classes(step)
    table[: len(seen)] = seen
    return table


def to_uint8_image(x: torch.Tensor, normalize: str = "imagenet") -> np.ndarray:
    """A normalised ``3xHxW`` float image (``data.normalize``) back to ``HxWx3`` ``uint8`` RGB."""
    rgb = denormalize(x.float().cpu(), normalize) * 255
    return rgb.round().to(torch.uint8).permute(1, 2, 0).numpy()


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside, in its previous train/eval mode (module by module) after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


@contextlib.contextmanager
def unchanged_rng(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's random states (CUDA's too on a CUDA device) as they were before."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
