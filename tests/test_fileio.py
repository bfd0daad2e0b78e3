"""Atomic writes: the permissions of an ordinary write, and all-or-nothing on failure."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

import pytest

from ilseg.errors import WriteError
from ilseg.fileio import atomic_write_bytes, atomic_write_text

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and umask")


@pytest.fixture
def umask() -> Iterator[object]:
    """Set the process umask for one test (``umask(0o022)``) and restore it afterwards."""
    previous = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_file_gets_the_mode_of_an_ordinary_open(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "results.json", "{}\n")
    with open(tmp_path / "plain.txt", "w") as f:  # what the atomic write must match
        f.write("{}\n")
    assert mode(tmp_path / "results.json") == expected == mode(tmp_path / "plain.txt")
    assert (tmp_path / "results.json").read_text() == "{}\n"


@pytest.mark.parametrize("existing", [0o640, 0o600, 0o664])
def test_replacing_a_file_keeps_its_mode(tmp_path, umask, existing):
    umask(0o022)
    path = tmp_path / "train.log"
    path.write_text("old\n")
    os.chmod(path, existing)
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert mode(path) == existing


@pytest.mark.parametrize("exists", [True, False])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path, exists):
    path = tmp_path / "last.pth"
    if exists:
        path.write_bytes(b"old checkpoint")

    def write_half_then_fail(f):
        f.write(b"half of a new checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(WriteError, match=r"cannot write .*last\.pth \(disk full\)"):
        atomic_write_bytes(path, write_half_then_fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["last.pth"] if exists else [])
    if exists:
        assert path.read_bytes() == b"old checkpoint"


def test_creates_missing_folders_and_leaves_only_the_target(tmp_path):
    path = tmp_path / "run" / "step-0" / "config.yaml"
    atomic_write_bytes(path, lambda f: f.write(b"name: run\n"))
    atomic_write_bytes(path, lambda f: f.write(b"name: again\n"))
    assert path.read_bytes() == b"name: again\n"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_a_full_disk_is_one_clear_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "step1.pth"
    path.write_bytes(b"previous")

    def no_space(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as info:
        atomic_write_bytes(path, no_space)
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message and "MiB free" in message
    assert "intact" in message and path.read_bytes() == b"previous"


def test_torch_save_failure_message_is_its_first_line(tmp_path):
    def torch_style(f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nframe #0: ...")

    with pytest.raises(WriteError) as info:
        atomic_write_bytes(tmp_path / "last.pth", torch_style)
    assert "unexpected pos 64 vs 0" in str(info.value) and "frame #0" not in str(info.value)


def test_a_folder_that_is_a_file_is_refused_clearly(tmp_path):
    (tmp_path / "run").write_text("I am a file")
    with pytest.raises(WriteError, match="its folder is a file"):
        atomic_write_bytes(tmp_path / "run" / "config.yaml", lambda f: f.write(b"x"))
    assert (tmp_path / "run").read_text() == "I am a file"
