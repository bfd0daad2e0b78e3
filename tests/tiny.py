"""The tiny synthetic run the end-to-end tests train (seconds on a CPU), and callbacks that stop or watch it.

:data:`TINY` is the ``--set`` list every such test starts from: a ResNet-18 of
width 8 with an 8-channel head, 32-pixel crops, batches of 4, two epochs at
step 0 and one after.  A test states what it does differently at its call
site, after these (a later override wins)::

    cfg = tiny_config(synth_root, "method.name=finetune", "optim.epochs=1")

:class:`InterruptAt` and :class:`Record` are :class:`~ilseg.engine.callbacks.Callbacks`
for ``run_training(..., callbacks=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ilseg.config import RunConfig, load_config, preset_dir
from ilseg.engine.callbacks import Callbacks
from ilseg.methods import StepSetup

TINY = [
    "model.width=8", "model.head_channels=8", "model.output_stride=16",
    "optim.batch_size=4", "optim.epochs=2", "optim.epochs_next=1",
    "data.crop_size=32", "data.workers=0", "eval.batch_size=16",
]


def tiny_sets(root: str | Path, *extra: str, cache_dir: str | Path | None = None) -> list[str]:
    """The ``--set`` items of the tiny run on the synthetic data in ``root``, then ``extra``."""
    cache = [f"data.cache_dir={cache_dir}"] if cache_dir is not None else []
    return [f"data.root={root}", *cache, *TINY, *extra]


def tiny_config(root: str | Path, *extra: str, cache_dir: str | Path | None = None) -> RunConfig:
    """The synth-demo preset with :func:`tiny_sets` applied."""
    return load_config(preset_dir() / "synth-demo.yaml", tiny_sets(root, *extra, cache_dir=cache_dir))


class InterruptAt(Callbacks):
    """Ctrl-C just before epoch ``epoch`` of step ``step`` trains (both 0-based).

    Steps and epochs before it are saved as usual (``last.pth`` holds the
    epoch before), so a resumed run goes on from there.
    """

    def __init__(self, step: int, epoch: int) -> None:
        self.step, self.epoch = step, epoch

    def on_epoch_start(self, step: int, epoch: int) -> None:
        if (step, epoch) == (self.step, self.epoch):
            raise KeyboardInterrupt


class Record(Callbacks):
    """What a run did: each step's setup (student, teacher, training labels), the epochs it trained, in order,
    and each finished step's results row."""

    def __init__(self) -> None:
        self.setups: dict[int, StepSetup] = {}
        self.epochs: list[tuple[int, int]] = []
        self.scores: dict[int, dict[str, Any]] = {}

    @property
    def trained_steps(self) -> list[int]:
        """The step of every epoch trained (a step appears once per epoch)."""
        return [step for step, _ in self.epochs]

    def on_step_start(self, step: int, setup: StepSetup) -> None:
        self.setups[step] = setup

    def on_epoch_start(self, step: int, epoch: int) -> None:
        self.epochs.append((step, epoch))

    def on_step_end(self, step: int, scores: Mapping[str, Any]) -> None:
        self.scores[step] = dict(scores)
