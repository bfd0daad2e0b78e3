"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

The new file gets the permissions an ordinary ``open(path, "w")`` would give
it (``0o666`` less the umask, e.g. ``0o644``), or those of the file it
replaces, so results, logs and checkpoints stay readable by whoever could read
them before.

The temporary file is named ``.ilseg-tmp-NAME.XXXXXXXX.tmp`` (:func:`is_ilseg_temporary`): a prefix
no file of a user's has, so clearing what a killed process left never
touches a user's own ``*.tmp`` file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ilseg.errors import IlsegError, WriteError

TEMP_PREFIX = ".ilseg-tmp-"
_TEMPORARY = re.compile(r"^\.ilseg-tmp-(?P<target>.+)\.[0-9a-f]+\.tmp$")
# The name ilseg gave its temporaries before it used TEMP_PREFIX: ``.NAME.XXXXXXXX.tmp``.
_OLD_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]+\.tmp$")


def temporary_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.ilseg-tmp-NAME.XXXXXXXX.tmp`` (8 random hex digits)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}.tmp")


def is_ilseg_temporary(name: str, ilseg_writes: Callable[[str], bool] = lambda target: False) -> bool:
    """Whether the file called ``name`` is the temporary file of one of ilseg's atomic writes.

    Every ``.ilseg-tmp-NAME.XXXX.tmp`` is; the older ``.NAME.XXXX.tmp`` only
    when ``ilseg_writes(NAME)`` says ilseg writes a file called ``NAME`` in
    that folder (``last.pth`` in a run folder), so a user's
    ``.hidden-notes.tmp`` is never taken for one.

    >>> is_ilseg_temporary(".ilseg-tmp-last.pth.1a2b3c4d.tmp"), is_ilseg_temporary(".hidden-notes.tmp")
    (True, False)
    """
    if _TEMPORARY.match(name):
        return True
    old = _OLD_TEMPORARY.match(name)
    return old is not None and ilseg_writes(old.group("target"))


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, rename it over ``path``.

    If ``write`` raises, ``path`` is left as it was and the temporary file is
    removed.  Mode of the result: that of the existing ``path``, else
    ``0o666 & ~umask`` as for any newly created file.

    Raises:
        WriteError: the file system refused (full disk, read-only or vanished
            folder, no permission), or ``write`` failed with an ``OSError`` or
            a ``RuntimeError`` (``torch.save`` reports a full disk as one).
            The message names ``path`` and the reason.
    """
    path = Path(path)
    try:
        _atomic_write(path, write)
    except (OSError, RuntimeError) as exc:
        raise WriteError(write_failure(path, exc), failure_reason(exc)) from None


def failure_reason(exc: BaseException) -> str:
    """An OSError's text (``"Read-only file system"``), or the first line of another exception's message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def write_failure(path: Path, exc: BaseException) -> str:
    """``"cannot write PATH (reason); ..."`` with the free space of its file system when that is the cause."""
    return (f"{write_problem(path, exc)}; the previous version of the file, if any, is intact. "
            "Free space or fix the folder's permissions, then run the command again")


def write_problem(path: Path, exc: BaseException) -> str:
    """``"cannot write PATH (reason)"``, with the free space of its file system when that is the cause."""
    reason = failure_reason(exc)
    free = _free_bytes(path)
    if free is not None and (free < 64 * 2**20 or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)):
        reason += f"; {free / 2**20:.0f} MiB free on that file system"
    return f"cannot write {path} ({reason})"


def _free_bytes(path: Path) -> int | None:
    for folder in (path.parent, *path.parent.parents):
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "its folder is a file", str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        existing_mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        existing_mode = None
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if existing_mode is not None:  # before writing: new content of a 0o600 file is never more open
                os.chmod(tmp, existing_mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _create_beside(path: Path) -> tuple[int, Path]:
    """Create a new, empty, uniquely named file in ``path``'s folder; return its descriptor and path.

    ``tempfile.mkstemp`` would create it with mode 0o600.  Asking the kernel for
    mode 0o666 instead lets it apply the process umask (and a folder's default
    ACL) exactly as for ``open(path, "w")``, without reading the umask: the
    only way to read it, ``os.umask``, sets it too, and another thread creating
    a file between the set and the restore would get the wrong mode.
    ``O_EXCL`` makes the creation fail rather than reuse an existing file or
    follow a planted symlink.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = temporary_path(path)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def load_failure(exc: BaseException, path: str | os.PathLike[str] | None = None) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused the file ``path``, in a few words and without
    torch's advice.

    torch wraps every refusal in a text that suggests ``weights_only=False``
    (which would run code from the file): that advice is never repeated.
    """
    text = str(exc)
    # torch 2.x: "Unsupported global: GLOBAL m.C was not an allowed global by default" for a class, and
    # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" for a blocked module
    if re.search(r"unsupported global|not an allowed global|is blocked", text, re.IGNORECASE):
        return "it holds Python objects, not only tensors; ilseg never loads such files"
    if "Unsupported operand" in text and path is not None and _pickle_protocol(Path(path)) >= 3:
        # an opcode torch's unpickler lacks (FRAME of protocol 4 ...): pickle.dump wrote it, not torch.save
        return ("it holds Python objects pickled with pickle.dump, not tensors saved with torch.save; ilseg never "
                "loads such files")
    if isinstance(exc, (OSError, EOFError)) and "Weights only load failed" not in text:
        return f"{type(exc).__name__}: {text.strip().splitlines()[0][:160]}" if text.strip() else type(exc).__name__
    return "not a PyTorch tensor file, or a truncated or corrupt one"


def _pickle_protocol(path: Path) -> int:
    """The protocol a pickle file starts by declaring (``0x80 N``), or 0 if it does not start so."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return 0
    return head[1] if len(head) == 2 and head[0] == 0x80 and head[1] <= 5 else 0


@contextlib.contextmanager
def quiet_pickle_warnings() -> Iterator[None]:
    """Around ``torch.load``: no "Detected pickle protocol 4 in the checkpoint" warning before ilseg's own
    line about a file ``pickle.dump`` wrote (torch warns, then refuses it anyway)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
        yield


def check_output_folder(folder: Path, *, option: str, what: str, ours: Callable[[Path], bool]) -> None:
    """Refuse ``folder`` as the output of a command unless it is new, empty, or ``what`` the command wrote.

    The one rule of ``ilseg train --out``, ``ilseg data synth --out`` and
    ``ilseg demo --out``: a command writes only into a folder it made, so it
    never writes beside, or over, a user's files.  Entries whose name starts
    with a dot (``.DS_Store``, ``.git``, the run lock) are left aside; every
    other entry must be one ``ours(entry)`` recognises.  Nothing is written
    or removed here.

    Raises:
        IlsegError: ``folder`` is a file, or holds something else (its first entries are named).
    """
    if folder.exists() and not folder.is_dir():
        raise IlsegError(f"{option} {folder} is a file, not a folder; choose a folder for {what}")
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not ours(p))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise IlsegError(f"{option} {folder} is not empty and is not {what} (it holds {shown}); choose a new or "
                         "empty folder (nothing was written there)")
