"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (what job schedulers send before SIGKILL).

While :class:`StopRequests` is active, the first SIGINT or SIGTERM only
*requests* a stop: the training loop finishes its current iteration, saves
``last.pth`` with the position inside the epoch, and ends with
:class:`~ilseg.errors.Interrupted` (the CLI prints the resume command).  A
second SIGINT before the loop has seen the first interrupts at once
(``KeyboardInterrupt``), for a stuck iteration; once the loop has seen it and
is saving and shutting its data loader down, further signals are ignored
(a Ctrl-C pressed twice in a row, or sent to the whole process group twice,
would otherwise land inside the loader's shutdown and print its traceback).

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
_PROCESS_ENDS_AFTER_A_STOP = False


def ignore_signals_after_a_stop() -> None:
    """For a process that ends when its run stops (the ``ilseg`` command): once a stop has begun, SIGINT and
    SIGTERM stay ignored instead of getting their previous handlers back.

    The run's state is saved by then; what remains is shutting the data loader's workers and the interpreter
    down, which a second signal (a key pressed twice, a scheduler signalling the group again) would interrupt
    with a traceback.  A program that calls :func:`~ilseg.engine.run_training` itself gets its handlers back.
    """
    global _PROCESS_ENDS_AFTER_A_STOP
    _PROCESS_ENDS_AFTER_A_STOP = True


class StopRequests:
    """Context manager that turns SIGINT / SIGTERM into a stop request the loop polls."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.stopping = False  # the loop has seen the request: it is saving and leaving
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        keep_out = self.stopping and _PROCESS_ENDS_AFTER_A_STOP
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if keep_out else handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return  # already saving and leaving: let it finish
        if self.signal_number is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C, before the loop saw the first: stop now
        self.signal_number = signum

    def requested(self) -> bool:
        """Whether any rank was asked to stop (the same answer on every rank); once it says yes, the run is
        stopping and later signals are ignored."""
        self.stopping = self._requested()
        return self.stopping

    def _requested(self) -> bool:
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
