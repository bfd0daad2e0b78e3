"""The one exception type the command line turns into a clear message.

Raise :class:`IlsegError` for any problem the *user* can fix (a missing
folder, a corrupt file, a wrong task name, a bad config value).  The message
must name the offending file or value and say what to do.  The CLI prints it
on one line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class IlsegError(Exception):
    """A user-fixable error; its message names the problem and the fix."""


class ReportedByMainRank(IlsegError):
    """Rank 0's error, raised on the other ranks of a distributed run.

    Rank 0 prints the message; the other processes exit with status 2 without
    printing it again (see :func:`ilseg.engine.distributed.on_main`).
    """


class WriteError(IlsegError):
    """A file could not be written (full disk, read-only or vanished folder, no permission).

    The message names the file and the reason; the file's previous version,
    if any, is intact (writes are atomic).  ``reason`` is the reason alone
    (``"No space left on device"``), for callers that go on without the file.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class Interrupted(IlsegError):
    """Training stopped on request (SIGINT / SIGTERM) after saving its state at a safe point."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number


_WORKER_WRAPPER = "Original Traceback (most recent call last):"


def one_line(exc: BaseException) -> str:
    """The user-facing message of ``exc``, without a DataLoader worker's wrapped traceback.

    An error raised in a DataLoader worker process reaches the main process as
    ``"Caught IlsegError in DataLoader worker process 0.\\nOriginal Traceback
    ...\\nilseg.errors.IlsegError: <message>"``; the message after the last
    ``"<ExceptionType>: "`` line is the one the user needs.
    """
    text = str(exc)
    if _WORKER_WRAPPER not in text:
        return text
    name = type(exc).__name__
    tail = text.rstrip().rsplit(f"{name}: ", 1)
    return tail[1].strip() if len(tail) == 2 else text.strip().splitlines()[-1]


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1: messages say "1 epoch", "3 epochs".

    >>> plural(1, "epoch"), plural(3, "epoch"), plural(2, "class"), plural(0, "batch", "batches")
    ('1 epoch', '3 epochs', '2 classes', '0 batches')

    ``many`` gives an irregular plural; the rule adds "es" after s, sh and x only ("epochs", not "epoches").
    """
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {many or (noun + 'es' if noun.endswith(('s', 'sh', 'x')) else noun + 's')}"
