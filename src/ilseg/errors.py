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
