"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (what job schedulers send before SIGKILL).

While :class:`StopRequests` is active, the first SIGINT or SIGTERM only
*requests* a stop: the training loop finishes its current iteration, saves
``last.pth`` with the position inside the epoch, and ends with
:class:`~ilseg.errors.Interrupted` (the CLI prints the resume command).  A
second SIGINT interrupts at once (``KeyboardInterrupt``), for a stuck job.

Under torchrun every rank must stop at the same iteration, or the others
would wait in a collective: :meth:`StopRequests.requested` agrees across
ranks (one all-reduce of a flag per iteration, only in distributed runs).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager that turns SIGINT / SIGTERM into a stop request the loop polls."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_number is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_number = signum

    def requested(self) -> bool:
        """Whether any rank was asked to stop (the same answer on every rank)."""
        local = self.signal_number is not None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_number is None:
            self.signal_number = int(signal.SIGTERM)  # another rank got it
        return bool(flag.item())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
