"""common.files: what a file we do not own can do to a reader, and that none of it blocks or bloats."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from common.files import InputFileError, read_bounded, read_text_bounded, replace_file


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("version: v1\n")
    assert read_text_bounded(f, 100) == "version: v1\n"


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    f = tmp_path / "fifo"
    os.mkfifo(f)
    with pytest.raises(InputFileError, match="not a regular file \\(a FIFO\\)"):
        read_bounded(f, 100)  # no writer: a plain open() would block here for ever


def test_a_directory_a_socket_and_a_device_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="a directory"):
        read_bounded(tmp_path, 100)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "s"))
        with pytest.raises(InputFileError, match="a socket"):
            read_bounded(tmp_path / "s", 100)
    finally:
        s.close()
    with pytest.raises(InputFileError, match="a character device"):
        read_bounded("/dev/zero", 100)  # would never end with a read-until-EOF


def test_a_file_over_the_bound_is_refused_by_its_size(tmp_path: Path) -> None:
    f = tmp_path / "big"
    with open(f, "wb") as out:
        out.truncate(1 << 30)  # 1 GiB, sparse: refused from the stat, nothing read
    with pytest.raises(InputFileError) as e:
        read_bounded(f, 1 << 20)
    assert e.value.errno == errno.EFBIG and "larger than 1048576 bytes" in str(e.value)


def test_the_bound_itself_is_allowed(tmp_path: Path) -> None:
    f = tmp_path / "exact"
    f.write_bytes(b"x" * 10)
    assert read_bounded(f, 10) == b"x" * 10
    f.write_bytes(b"x" * 11)
    with pytest.raises(InputFileError):
        read_bounded(f, 10)


def test_a_final_symlink_is_followed_only_where_allowed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_bounded(link, 100) == b"secret"  # a ConfigMap key is a symlink into ..data
    with pytest.raises(InputFileError, match="a symlink"):
        read_bounded(link, 100, follow=False)


def test_a_symlink_loop_is_an_oserror(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OSError) as e:
        read_bounded(loop, 100)
    assert e.value.errno == errno.ELOOP


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_bounded(tmp_path / "nothing", 100)


def test_replace_file_swaps_in_a_complete_file_with_its_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "spec.json"
    target.write_text("old")
    before = os.umask(0o077)  # the caller's umask must not decide who may read it
    try:
        replace_file(target, b"new", 0o644, sync_dir=True)
    finally:
        os.umask(before)
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]


def test_replace_file_that_fails_leaves_what_was_there_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "spec.json"
    target.mkdir()  # a directory in the way: the rename fails once the data is written
    (target / "kept").write_text("x")
    with pytest.raises(IsADirectoryError):
        replace_file(target, b"new")
    assert (target / "kept").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["spec.json"]
