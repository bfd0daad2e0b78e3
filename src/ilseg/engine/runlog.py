"""What a run prints and keeps: train.log, metrics.jsonl, progress bars, TensorBoard.

Every line goes through Python's ``logging``, to the ``"ilseg"`` logger: the
engine's lines and those of library modules (``ilseg.models.pretrained``
saying it downloads weights, ...) reach the same two places while a run is
open: the terminal (through ``tqdm.write``, so progress bars stay intact) and
``RUN_DIR/train.log``.  Only the main process (rank 0) attaches them; other
ranks log nothing, so no line is printed twice.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm import tqdm

from ilseg.errors import WriteError
from ilseg.fileio import atomic_write_text, write_failure
from ilseg.runs.results import pct

LOGGER = logging.getLogger("ilseg")
_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
MAX_CLASSES_IN_LOG = 30  # more classes (ADE20k): the step's per-class IoU goes to RUN_DIR/iou-step{t}.md instead
LINE_WIDTH = 100  # the per-class IoU line wraps at about this many characters
TENSORBOARD_EVERY = 20  # iterations per TensorBoard point within an epoch (means over them); plus one per epoch


class _TqdmHandler(logging.Handler):
    """Writes records above any open progress bar (``tqdm.write``) instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()  # before a line ilseg prints on stderr, when both go to one file (a SLURM log)
        except Exception:  # noqa: BLE001 (logging's own contract: never raise from emit)
            self.handleError(record)


class _LogFile(logging.FileHandler):
    """``train.log``; a failed write ends the run with one clear line (logging would print and go on)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            raise WriteError(write_failure(Path(self.baseFilename), exc)) from None
        super().handleError(record)


class _Bar(tqdm):
    """A progress bar that, drawn into a file (a SLURM log) rather than a terminal, ends its line when it closes.

    tqdm redraws a bar with carriage returns and, closed with ``leave=False``,
    leaves the line unfinished; the next line written to that file (the error
    ``ilseg`` prints on stderr, when stdout and stderr share the file) would
    continue it.
    """

    def close(self) -> None:
        was_open = not self.disable
        super().close()
        stream = self.fp
        if was_open and not (hasattr(stream, "isatty") and stream.isatty()):
            stream.write("\n")
            stream.flush()


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


class RunLogger:
    """Lines to the terminal and ``train.log`` (via ``logging``), scalars to ``metrics.jsonl``.

    Use it as a context manager, or call :meth:`close`: the handlers it
    attached to the ``"ilseg"`` logger are removed again.
    """

    def __init__(self, run_dir: Path | None, *, enabled: bool = True, quiet: bool = False,
                 tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.quiet = quiet
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._handlers: list[logging.Handler] = []
        self._jsonl = None
        self._tb: Any = None
        self._saved_level = LOGGER.level
        self._saved_propagate = LOGGER.propagate
        if not enabled:
            return
        console: logging.Handler = logging.StreamHandler(sys.stdout) if quiet else _TqdmHandler()
        self._attach(console)
        if run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._attach(_LogFile(run_dir / "train.log", encoding="utf-8"))
                self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            except OSError as exc:
                self.close()
                raise WriteError(write_failure(Path(exc.filename or run_dir), exc)) from None
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False  # printed here once, not again by a root handler
        if tensorboard and run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info("runtime.tensorboard is on but tensorboard is not installed "
                          "(pip install 'ilseg[tensorboard]'); continuing without it")
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._scalar_index = 0

    def _attach(self, handler: logging.Handler) -> None:
        handler.setFormatter(_FORMAT)
        LOGGER.addHandler(handler)
        self._handlers.append(handler)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def info(self, message: str) -> None:
        if self.enabled:
            LOGGER.info(message)

    def scalars(self, values: dict[str, Any]) -> None:
        if not self.enabled or self._jsonl is None:
            return
        try:
            self._jsonl.write(json.dumps({"time": round(time.time(), 3), **values}) + "\n")
            self._jsonl.flush()
        except OSError as exc:
            raise WriteError(write_failure(Path(self._jsonl.name), exc)) from None
        if self._tb is not None:
            self._scalar_index += 1
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"step{values.get('step', 0)}/{k}", v, values.get("epoch", self._scalar_index))

    def iteration_scalars(self, step: int, iteration: int, values: Mapping[str, float]) -> None:
        """TensorBoard points within an epoch (``step{t}/iter/<name>`` against the step's iteration); not
        in ``metrics.jsonl``, which keeps one line per epoch."""
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"step{step}/iter/{k}", v, iteration)

    def progress(self, total: int, desc: str) -> Any:
        if not self.enabled or self.quiet:
            return _NoBar()
        return _Bar(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)

    def step_table(self, entry: dict[str, Any]) -> None:
        """The lines printed after each finished step: the mIoUs, then every class's IoU (%).

        Up to :data:`MAX_CLASSES_IN_LOG` classes the IoUs are printed, wrapped
        at :data:`LINE_WIDTH` characters; with more (ADE20k's 151), they go to
        ``RUN_DIR/iou-step{t}.md`` and the log names the file.
        """
        self.scalars({k: v for k, v in entry.items() if isinstance(v, (int, float)) or v is None})
        head = (f"step {entry['step']} done: mIoU all {pct(entry['miou_all'])}% | old {pct(entry['miou_old'])}% | "
                f"new {pct(entry['miou_new'])}% | pixel acc {pct(entry.get('pixel_accuracy'))}%")
        self.info(head)
        ious = entry["iou_per_class"]
        if len(ious) > MAX_CLASSES_IN_LOG and self.run_dir is not None and self.enabled:
            path = self.run_dir / f"iou-step{entry['step']}.md"
            atomic_write_text(path, iou_table(entry))
            self.info(f"  IoU (%) of the {len(ious)} classes: {path} (every step, as fractions: "
                      f"{self.run_dir / 'results.csv'})")
            return
        for line in iou_lines(ious):
            self.info(line)

    def close(self) -> None:
        for handler in self._handlers:
            LOGGER.removeHandler(handler)
            try:
                handler.close()
            except OSError:  # its failed write was reported already
                pass
        if self._handlers:
            LOGGER.setLevel(self._saved_level)
            LOGGER.propagate = self._saved_propagate
        self._handlers = []
        if self._jsonl is not None:
            try:
                self._jsonl.close()
            except OSError:
                pass
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def iou_lines(ious: Mapping[str, float | None], width: int = LINE_WIDTH) -> list[str]:
    """Every class's IoU in percent, as lines of about ``width`` characters (``"  IoU (%): name 91.2  ..."``)."""
    lead, indent = "  IoU (%): ", " " * len("  IoU (%): ")
    lines, current = [], lead
    for name, value in ious.items():
        item = f"{name} {pct(value)}"
        if current not in (lead, indent) and len(current) + 2 + len(item) > width:
            lines.append(current)
            current = indent
        current += ("" if current in (lead, indent) else "  ") + item
    return lines + [current]


def iou_table(entry: Mapping[str, Any]) -> str:
    """``iou-step{t}.md``: the IoU (%) of every class after one step, best first ("-": absent from the test
    masks)."""
    ious = entry["iou_per_class"]
    ranked = sorted(ious.items(), key=lambda item: (item[1] is None, -(item[1] or 0.0)))
    rows = [f"| {name} | {pct(value)} |" for name, value in ranked]
    return (f"# IoU after step {entry['step']}\n\nmIoU all {pct(entry['miou_all'])}%, old "
            f"{pct(entry['miou_old'])}%, new {pct(entry['miou_new'])}%; IoU in %, best first; - where the class is "
            "absent from the test masks.\n\n| class | IoU |\n|---|---:|\n" + "\n".join(rows) + "\n")
