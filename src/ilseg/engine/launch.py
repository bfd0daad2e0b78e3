"""``ilseg launch --nproc N train ...``: N processes on this machine, and one line when one of them fails.

torchrun does the same job and more (several machines, elastic restarts),
but when a process dies it prints its own traceback and failure report
after ilseg's line, and it waits 30 s before killing a process that is
stopped.  This launcher starts the N processes with the environment
torchrun gives them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free local port), lets their output
through unchanged, and when one ends with an error stops the others at once
(SIGTERM, then SIGKILL after :data:`GRACE_S` seconds; SIGKILL at once for a stopped one): what the user reads
ends with ilseg's own line, and the job ends within the configured
``runtime.collective_timeout_s`` plus a few seconds.  Ctrl-C and SIGTERM are
passed on to every process, which save and stop as a single process does.

For several machines, use torchrun (docs/scaling.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

GRACE_S = 5.0  # how long the others get, after one process failed, to finish on their own
POLL_S = 0.1


def free_port() -> int:
    """A TCP port free on this machine now (the rendezvous of the processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of process ``rank`` of ``nproc``, as torchrun sets it for one machine."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m ilseg ARGS`` in ``nproc`` processes; return the job's exit status.

    The status is the first failing process's (0 when all succeed; 128 + the
    signal number for a process killed by a signal).  One line is printed
    only when a process ended without ilseg's own message (killed by a signal).
    """
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "ilseg", *args], env=rank_environment(rank, nproc, port))
             for rank in range(nproc)]
    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        first_failure = _wait(procs)
    finally:
        _stop(procs)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return _job_status([p.returncode for p in procs], first_failure, forwarded)


def _wait(procs: Sequence[subprocess.Popen[bytes]]) -> int | None:
    """Wait until every process ended, or :data:`GRACE_S` after the first failure; return that failure's rank."""
    failed_at: float | None = None
    first: int | None = None
    while any(p.poll() is None for p in procs):
        for rank, proc in enumerate(procs):
            if first is None and proc.poll() not in (None, 0):
                first, failed_at = rank, time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            break
        time.sleep(POLL_S)
    if first is None:
        first = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
    return first


def _job_status(statuses: Sequence[int | None], first: int | None, forwarded: Sequence[int]) -> int:
    """The job's exit status, printing one line when no process could say what went wrong.

    A process that ended with a status of its own (ilseg's 2 for an error it
    printed, 130 / 143 after a signal it handled) speaks for the job, rank 0
    first.  Processes killed by a signal print nothing, so the launcher says
    which one and how (unless the signal was the user's, passed on).
    """
    reported = [s for s in statuses if s is not None and s > 0]
    if reported:
        return reported[0]
    if first is None:
        return 0
    status = statuses[first] or 0
    if status < 0:
        name = signal.Signals(-status).name
        if not forwarded:
            print(f"ilseg launch: process {first} of {len(statuses)} was killed by {name} (out of memory? "
                  "killed by the system?); the others were stopped. Continue with --resume RUN_DIR",
                  file=sys.stderr)
        return 128 - status
    return status


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop the processes still running: SIGKILL to a stopped (frozen) one, which woken up would only print a
    misleading line about its peers; SIGTERM to the others, and SIGKILL after :data:`GRACE_S` seconds."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        if _is_stopped(proc.pid):
            proc.kill()
        else:
            proc.terminate()
    end = time.monotonic() + GRACE_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, a debugger); read from Linux's /proc, else assumed not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")
