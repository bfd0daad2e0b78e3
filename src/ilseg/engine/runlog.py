"""What a run prints and keeps: train.log, metrics.jsonl, progress bars, TensorBoard.

Only the main process (rank 0) writes or prints; other ranks get a logger
whose calls do nothing, so no line is printed twice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ilseg.report import pct


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


class RunLogger:
    """Prints lines, appends them to ``train.log``, logs scalars to ``metrics.jsonl``."""

    def __init__(self, run_dir: Path | None, *, enabled: bool = True, quiet: bool = False,
                 tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.quiet = quiet
        self._log = self._jsonl = self._tb = None
        if enabled and run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(run_dir / "train.log", "a", encoding="utf-8")
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    self.info("runtime.tensorboard is on but tensorboard is not installed "
                              "(pip install 'ilseg[tensorboard]'); continuing without it")
                else:
                    self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._scalar_index = 0

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.quiet:
            print(line, flush=True)
        else:
            tqdm.write(line, file=sys.stdout)
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()

    def scalars(self, values: dict[str, Any]) -> None:
        if not self.enabled or self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"time": round(time.time(), 3), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._scalar_index += 1
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"step{values.get('step', 0)}/{k}", v, values.get("epoch", self._scalar_index))

    def progress(self, total: int, desc: str):
        if not self.enabled or self.quiet:
            return _NoBar()
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)

    def step_table(self, entry: dict[str, Any]) -> None:
        """The table printed after each finished step."""
        self.scalars({k: v for k, v in entry.items() if isinstance(v, (int, float)) or v is None})
        head = (f"step {entry['step']} done: mIoU all {pct(entry['miou_all'])} | old {pct(entry['miou_old'])} | "
                f"new {pct(entry['miou_new'])} | pixel acc {pct(entry.get('pixel_accuracy'))}")
        per_class = "  ".join(f"{n} {pct(v)}" for n, v in entry["iou_per_class"].items())
        self.info(head)
        self.info("  IoU: " + per_class)

    def close(self) -> None:
        for f in (self._log, self._jsonl):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
