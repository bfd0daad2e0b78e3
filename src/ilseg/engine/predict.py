"""Predict masks for arbitrary images with a saved step of a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ilseg.data.io import PHOTO_FIX, overlay, read_image, write_mask_png
from ilseg.data.transforms import eval_transform
from ilseg.engine.loop import resolve_device
from ilseg.engine.rundir import last_finished_step, load_step_model, read_run_config, step_checkpoint, training_task
from ilseg.errors import IlsegError
from ilseg.fileio import atomic_write_bytes


def predict_images(run_dir: Path, images: Sequence[str | Path], out_dir: Path, *, step: int | None = None,
                   device: str | None = None) -> list[Path]:
    """Write ``<stem>_mask.png`` (palette, dataset class ids) and ``<stem>_overlay.png`` per image.

    Images are segmented at their full resolution.  Output channel k is
    mapped back to the dataset's class id ``order[k]``, so the masks use the
    dataset's palette whatever the class order.
    """
    run_dir = Path(run_dir)
    read_run_config(run_dir)  # one clear error if it is not a run folder
    if step is None:
        step = last_finished_step(run_dir)
    cfg = read_run_config(run_dir, step=step)  # the settings that step was trained with
    task = training_task(cfg)
    model, _ = load_step_model(cfg, step_checkpoint(run_dir, step), step)
    dev = resolve_device(device or cfg.runtime.device)
    model.to(dev).eval()
    to_dataset_ids = np.array(task.seen_classes(step), dtype=np.uint8)
    transform = eval_transform(None, crop=False)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise IlsegError(f"--out {out_dir} is a file, not a folder; give a folder for the masks and overlays")
    photos = [Path(p) for p in images]
    stems = [p.stem for p in photos]
    clashes = sorted({str(p) for p in photos if stems.count(p.stem) > 1})
    if clashes:
        raise IlsegError(f"images {', '.join(clashes)} share a file name, so their masks would overwrite each "
                         "other in --out; predict them in separate runs (or rename them)")
    for path in photos:  # every input is decoded once before anything is written
        read_image(path, fix=PHOTO_FIX)
    written = []
    for path in photos:
        rgb = read_image(path, fix=PHOTO_FIX)
        x, _ = transform(rgb, np.zeros(rgb.shape[:2], dtype=np.uint8))
        with torch.inference_mode():
            logits = model(x.unsqueeze(0).to(dev))["logits"]
        pred = to_dataset_ids[logits.argmax(1)[0].cpu().numpy()]
        mask_path = out_dir / f"{path.stem}_mask.png"
        atomic_write_bytes(mask_path, lambda f: write_mask_png(f, pred))
        blend = Image.fromarray(overlay(rgb, pred))
        atomic_write_bytes(out_dir / f"{path.stem}_overlay.png", lambda f: blend.save(f, format="PNG"))
        written.append(mask_path)
    return written
