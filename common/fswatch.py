"""Directory watching with inotify, for asyncio.

Why: a kubelet restart shows up as files appearing and vanishing in the device-plugin
directory (kubelet.sock re-created, plugin sockets removed). inotify tells us within
microseconds and costs nothing while idle; polling would do neither.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as F

WATCH_MASK = (F.CREATE | F.DELETE | F.MOVED_FROM | F.MOVED_TO | F.DELETE_SELF | F.MOVE_SELF | F.ATTRIB
              | F.CLOSE_WRITE)  # a file edited in place (echo > file) changes without a create


class DirWatcher:
    """Yields batches of names created or removed in one directory.

    The name "" in a batch means the directory itself went away (or was never there);
    the watcher then re-creates its watch as soon as the directory exists again, and
    reports "" once more so callers re-check everything.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        self._create = create
        self._inotify = INotify(nonblocking=True)
        self._wd: int | None = None
        self._queue: asyncio.Queue[set[str]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _add_watch(self) -> bool:
        if self._create:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._wd = self._inotify.add_watch(str(self.path), WATCH_MASK)
            return True
        except OSError:
            self._wd = None
            return False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._add_watch()
        self._loop.add_reader(self._inotify.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        names: set[str] = set()
        lost = False
        for event in self._inotify.read(timeout=0):
            if event.mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
                lost = True
            elif event.name:
                names.add(event.name)
        if lost:
            names.add("")
            self._wd = None
        if names:
            self._queue.put_nowait(names)

    async def next(self, timeout: float | None = None) -> set[str]:
        """The next batch of changed names; on timeout an empty set.

        While the directory is missing, a timeout also retries the watch, so a caller
        that loops with a timeout recovers from a deleted directory by itself.
        """
        if self._wd is None and self._add_watch():
            return {""}
        try:
            # Not wait_for: on 3.11 it can swallow a cancellation that races the result.
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return set()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._inotify.fileno())
        self._inotify.close()


def file_id(path: Path) -> str:
    """Identity of a file: changes when it is re-created. "" when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return stat_id(st)


def stat_id(st: os.stat_result) -> str:
    """file_id of what `st` describes (e.g. an fstat of an O_PATH descriptor)."""
    return f"{st.st_ino}:{st.st_ctime_ns}"
