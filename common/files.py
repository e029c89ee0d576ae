"""One way to read a file this program does not own: the config file, a ConfigMap key, the cordon
file, the MPS pid file, anything under a host path.

Why: `open(path).read()` trusts the path. A FIFO put where the config file was blocks the open for
ever (every service froze at start, and again after each restart); a device node may do anything on
open; a 1 GB file is read whole before any size check; a symlink planted in a host directory makes
root read (or mount) whatever it names. Here a file is checked before and after opening:

- `lstat`/`stat` first: anything but a regular file is refused without being opened (a device
  node's open can have effects; a FIFO's blocks);
- opened `O_NONBLOCK` (a FIFO swapped in between the check and the open does not block) and, where
  the rule is "never follow a final symlink" (files we write ourselves on a host path), `O_NOFOLLOW`;
- `fstat` on the descriptor: the check that counts, on what was actually opened;
- read at most `limit + 1` bytes: a larger file is refused, whatever its size, for one read's cost.

Errors are OSErrors (existing `except OSError` paths keep working) whose `strerror` says what is
wrong in words an operator can act on.

And one way to write a file others read while it changes (the config the services follow, the
cordons, a CDI spec the runtime reads, NFD's labels, the MPS ready files): a temporary file in
the same directory, complete and synced, renamed over the old one, so a reader sees the old
content or the new, never half of either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


class InputFileError(OSError):
    """The file exists but is not one we read: not a regular file, or larger than the bound."""


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _check(path: str, st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(errno.EINVAL, f"not a regular file ({kind_of(st.st_mode)})", path)
    if st.st_size > limit:
        raise InputFileError(errno.EFBIG, f"larger than {limit} bytes ({st.st_size})", path)


def read_bounded(path: str | Path, limit: int, *, follow: bool = True) -> bytes:
    """The content of the regular file at `path`, at most `limit` bytes; OSError otherwise.

    `follow=False`: a symlink as the last component is refused (ELOOP), for files that only we
    write and that live where others can plant links.
    """
    p = os.fspath(path)
    _check(p, os.stat(p) if follow else os.lstat(p), limit)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(p, flags)
    try:
        _check(p, os.fstat(fd), limit)
        chunks: list[bytes] = []
        left = limit + 1  # one byte more than allowed tells a file that grew since the fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise InputFileError(errno.EFBIG, f"larger than {limit} bytes (it grew while being read)", p)
    return data


def read_text_bounded(path: str | Path, limit: int, *, follow: bool = True) -> str:
    """`read_bounded` decoded as UTF-8 (UnicodeDecodeError is the caller's to name)."""
    return read_bounded(path, limit, follow=follow).decode("utf-8")


def replace_file(path: str | Path, data: bytes, mode: int = 0o644, *, sync_dir: bool = False) -> None:
    """Writes `data` to `path` by rename, with `mode` whatever the umask; `sync_dir`: the rename
    itself survives a crash too (a file a restarted reader must find). OSError when it cannot."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
