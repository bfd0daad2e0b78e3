"""Child processes of the tests, bounded: a command runs in its own process group, and that whole group is
killed when the command ends or runs past its timeout.

``subprocess.run(..., timeout=T)`` kills only the child it started; grandchildren (torchrun's ranks, data
loader workers, Chromium's helpers) keep its pipes open, so collecting the output would wait for them
forever.  Killing the group ends them all, so a test that goes wrong fails after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any


def run(cmd: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, timeout=timeout, **kwargs)``, with the group of ``cmd`` killed at the end."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    check = kwargs.pop("check", False)
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd[:6]))} ... ran past {timeout:.0f} s; its last output:\n"
                                 f"{_tail(out)}\n{_tail(err)}") from None
        finally:
            kill_group(proc.pid)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def kill_group(pgid: int) -> None:
    """SIGKILL to every process left in the group ``pgid`` (none left: nothing to do)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-3000:]
