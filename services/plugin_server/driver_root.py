"""Paths under the driver root or the dev root, resolved the way a chroot sees them, and bounded scans.

Why: the container runtime bind-mounts a CDI spec's hostPath as root, following the host's symlinks.
The driver root is not ours: a containerized driver, a host directory, or `/` itself. A symlink in it
means what it means inside that root (where the driver put it), so it is followed here the way a chroot
would: an absolute target starts again at the root, and nothing found is outside the root. Whatever the
spec then names is the target found, a path with no symlink left in it when it was checked, so the
runtime has no link of ours to follow. (The root's owner can still swap a file between this check and
the runtime's mount; nothing on this side can close that, and the owner of the root could have put the
file there in the first place.)

`..` above the root is refused rather than clamped at the root as a chroot would: under a root other
than `/` the host's kernel would climb out where a chroot stays in, and a link that means two things
is not one a driver installer writes.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass

MAX_LINKS = 40  # Linux's MAXSYMLINKS: past as many, the kernel answers ELOOP too


class Refused(Exception):
    """The path is not one to put in a spec; the message says why, in an operator's words."""


class Missing(Refused):
    """Nothing there (or a link to nothing): for an optional file, a normal absence."""


class TooMany(Exception):
    """More names matched than the bound allows; the scan stopped there."""

    def __init__(self, directory: str, limit: int) -> None:
        super().__init__(f"more than {limit} matching names in {directory}")
        self.directory = directory
        self.limit = limit


@dataclass(frozen=True)
class Found:
    """A path inside the root, with no symlink in it, and what lstat said of it."""

    path: str  # absolute, as seen inside the root
    st: os.stat_result  # never a symlink's

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def parent(self) -> str:
        return self.path.rsplit("/", 1)[0] or "/"


def at(root: str, path: str) -> str:
    """`path` (absolute, normalised: a Found.path) where this process sees it under `root`."""
    base = root.rstrip("/")
    return path if not base else base + path if path != "/" else base


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def _walk(root: str, parts: list[str], todo: list[str]) -> Found:
    """Resolves the components in `todo` (a stack: last one first) from the directory `parts`."""
    links = 0
    st: os.stat_result | None = None
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            if not parts:
                raise Refused("a symlink climbs above the root")
            parts.pop()
            st = None
            continue
        parts.append(part)
        here = at(root, _join(parts))
        try:
            st = os.lstat(here)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise Refused(f"more than {MAX_LINKS} symlinks on the way (a loop)")
                target = os.readlink(here)
                parts.pop()
                if target.startswith("/"):
                    parts.clear()  # the root's /, not the host's
                todo.extend(p for p in reversed(target.split("/")) if p)
                st = None
                continue
        except (FileNotFoundError, NotADirectoryError) as e:
            raise Missing(f"{_join(parts)} does not exist under the root") from e
        except OSError as e:
            raise Refused(f"{_join(parts)}: {e.strerror}") from e
        if todo and not stat.S_ISDIR(st.st_mode):
            raise Missing(f"{_join(parts)} is not a directory")
    if st is None:  # the walk ended on a `..`, a link to a directory, or the root itself
        try:
            st = os.lstat(at(root, _join(parts)))
        except OSError as e:
            raise Refused(f"{_join(parts)}: {e.strerror}") from e
    return Found(_join(parts), st)


def resolve(root: str, path: str) -> Found:
    """`path` (absolute, as seen inside `root`) with every symlink followed inside `root`.

    Missing when something on the way does not exist; Refused for a `..` above the root, more than
    MAX_LINKS links (a loop) or an error other than absence."""
    return _walk(root, [], [p for p in reversed(path.split("/")) if p])


def resolve_entry(root: str, directory: Found, name: str) -> Found:
    """`name` in `directory` (already resolved: its path is not walked again) resolved as `resolve` does."""
    return _walk(root, [p for p in directory.path.split("/") if p], [name])


def matching_names(root: str, directory: Found, patterns: tuple[str, ...], limit: int) -> list[str]:
    """The names in `directory` that match one of the glob `patterns` (hidden names never, as glob), sorted.

    Why a scan and a bound: a directory is read one entry at a time and only matches are kept, so a
    directory of 100 000 names costs one pass and no memory, and more than `limit` matches raise
    TooMany at the first one past it instead of being collected."""
    found: list[str] = []
    with os.scandir(at(root, directory.path)) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                continue
            if len(found) >= limit:
                raise TooMany(at(root, directory.path), limit)
            found.append(entry.name)
    return sorted(found)


def first_match(root: str, directory: Found, patterns: tuple[str, ...]) -> str | None:
    """The first name in `directory` matching one of `patterns`; None when none or unreadable."""
    try:
        with os.scandir(at(root, directory.path)) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
                    return entry.name
    except OSError:
        return None
    return None


class Refusals:
    """Paths left out of a spec and why, told in one warning line: a count and the first few.

    Why one line: 100 000 planted links would otherwise be 100 000 log lines per spec. The paths seen
    are kept to count each once (a file may be looked at twice); the scans' bounds bound them."""

    EXAMPLES = 3

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []
        self._seen: set[str] = set()

    def add(self, path: str, why: str) -> None:
        if path in self._seen:
            return
        self._seen.add(path)
        self.count += 1
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(f"{path}: {why}")

    def summary(self) -> str:
        more = f" and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        return "; ".join(self.examples) + more
