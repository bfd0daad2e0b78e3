"""Hooks into a run at its step and epoch boundaries, for what watches a run or stops it on purpose.

``run_training(..., callbacks=MyCallbacks())`` calls each hook at a fixed
point; every hook does nothing by default, so a subclass states only what it
wants.  The hooks see the run, they do not steer it: the loss belongs to the
method (:mod:`ilseg.methods`), the schedule to the config.  Tests use them to
interrupt a run at a chosen epoch or to see a step's teacher; a user can log
to another tracker.  There is no per-iteration hook (the loop stays one
readable function).

Example::

    >>> class StopBeforeStep1(Callbacks):
    ...     def on_step_start(self, step, setup):
    ...         if step == 1:
    ...             raise KeyboardInterrupt  # as Ctrl-C: step 0 is saved, a resumed run goes on from step 1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ilseg.methods import StepSetup


class Callbacks:
    """The engine's hooks; subclass and override the ones you need."""

    def on_step_start(self, step: int, setup: StepSetup) -> None:
        """After the method set the step up (student, teacher, training labels), before any data is loaded."""

    def on_epoch_start(self, step: int, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based) of ``step`` trains, also when a resumed run continues it."""

    def on_epoch_end(self, step: int, epoch: int, means: Mapping[str, float]) -> None:
        """After a whole epoch trained and ``last.pth`` holds it; ``means``: its loss terms and ``lr``."""

    def on_step_end(self, step: int, scores: Mapping[str, Any]) -> None:
        """After ``step`` was evaluated, saved (``step{t}.pth``) and recorded; ``scores``: its results row."""
