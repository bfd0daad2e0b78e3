"""Child processes of the tests, bounded: a command runs in its own process group, and that group and every
process descended from the command are killed when it ends or runs past its timeout.

``subprocess.run(..., timeout=T)`` kills only the child it started; grandchildren (torchrun's ranks, data
loader workers, Chromium's helpers) keep its pipes open, so collecting the output would wait for them
forever.  torchrun starts its ranks in sessions of their own, so the group alone is not enough: the
descendants are found through Linux's /proc before anything is killed (an orphan's parent becomes 1).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
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
            kill_tree(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd[:6]))} ... ran past {timeout:.0f} s; its last output:\n"
                                 f"{_tail(out)}\n{_tail(err)}") from None
        finally:
            kill_tree(proc.pid)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def kill_tree(pid: int) -> None:
    """SIGKILL to ``pid``'s descendants (found first, while they are still its descendants) and its group."""
    for child in descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    kill_group(pid)


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (Linux's /proc; none found elsewhere)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


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
