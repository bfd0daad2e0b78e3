"""Running a function over chunks of files in worker processes, stoppable with Ctrl-C.

Used by the commands that read or write every file of a dataset
(``ilseg data prepare``, ``ilseg data check``, the per-step image lists).  The
workers ignore SIGINT and SIGTERM: Ctrl-C reaches only this process, which then cancels the chunks not yet
started, waits for the running ones (so a file being written is finished, not
cut in half) and raises :class:`KeyboardInterrupt` for the caller to turn into
its one-line message.

Example::

    >>> for index, result in run_chunks(count_pixels, [paths[:32], paths[32:]], workers=4):
    ...     totals[index] = result
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def default_workers() -> int:
    """``min(8, number of CPUs)``: enough to keep a local disk busy without swamping a shared machine."""
    return max(1, min(8, os.cpu_count() or 1))


def chunked(items: Sequence[Item], workers: int, *, largest: int = 64) -> list[list[Item]]:
    """``items`` cut into about eight chunks per worker, of at most ``largest`` items each."""
    size = max(1, min(largest, -(-len(items) // max(1, workers * 8))))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def leave_signals_to_parent(*_: object) -> None:
    """In a worker process: ignore SIGINT and SIGTERM, which the parent handles for the whole job.

    Ctrl-C and ``kill -TERM -- -PGID`` (how SLURM ends a job step) reach every
    process of the group; a worker that died of them would make the parent
    report a broken pool or a dead loader worker instead of stopping cleanly.
    Workers still end when the parent ends (the pool and torch's loaders
    watch it).  Also a ``worker_init_fn`` for DataLoaders (it takes the worker id).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_chunks(
    function: Callable[[list[Item]], Result], chunks: Sequence[list[Item]], *, workers: int,
) -> Iterator[tuple[int, Result]]:
    """Yield ``(chunk index, function(chunk))`` for every chunk, in the order they finish.

    ``function`` must be a module-level function (it is pickled).  With
    ``workers <= 1`` the chunks run one after another in this process, in order.

    Raises:
        KeyboardInterrupt: Ctrl-C; chunks not yet started are cancelled and
            the running ones are waited for first.
    """
    if workers <= 1 or len(chunks) <= 1:
        for index, chunk in enumerate(chunks):
            yield index, function(chunk)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=leave_signals_to_parent)
    try:
        pending: dict[Future[Result], int] = {pool.submit(function, chunk): i for i, chunk in enumerate(chunks)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                yield index, future.result()
    finally:  # normal end, an error, Ctrl-C or the caller stopping early
        pool.shutdown(wait=True, cancel_futures=True)
