"""A file of device IDs that another writer keeps (the kubelet's device-manager checkpoint, the
dra-plugin's claim record), read bounded and kept current by one reader: again when its directory
says the file changed, and every `recheck_s` as a backstop for what inotify cannot see. A missing
file holds no IDs; one that cannot be read or parsed keeps the IDs last read and is logged once,
until it reads again (a file caught mid-rename or corrupted must not free what it held)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.files import read_bounded
from common.fswatch import DirWatcher

log = logging.getLogger(__name__)


class WatchedIds:
    def __init__(self, path: Path, parse: Callable[[bytes], frozenset[str]], limit: int, what: str, held: str,
                 errors: tuple[type[Exception], ...] = (), follow: bool = True, recheck_s: float = 30.0) -> None:
        """`parse` raises one of `errors` for a file it refuses; `what` names the file and `held` what
        the IDs last read keep meanwhile, for the log."""
        self.path = path
        self.ids: frozenset[str] = frozenset()
        self._parse, self._limit, self._follow = parse, limit, follow
        self._errors: tuple[type[Exception], ...] = (OSError, *errors)
        self._what, self._held, self._recheck_s = what, held, recheck_s
        self._failing = False

    def read(self) -> bool:
        """Reads the file again; True when the IDs changed."""
        try:
            ids = self._parse(read_bounded(self.path, self._limit, follow=self._follow))
        except FileNotFoundError:
            ids = frozenset()
        except self._errors as e:
            if not self._failing:
                self._failing = True
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                log.warning("%s %s cannot be read (%s): %s (%d)", self._what, self.path, why, self._held,
                            len(self.ids))
            return False
        if self._failing:
            log.info("%s %s reads again", self._what, self.path)
            self._failing = False
        if ids == self.ids:
            return False
        log.info("%s %s: %d device IDs%s", self._what, self.path, len(ids),
                 f" ({', '.join(sorted(ids)[:8])}{', ...' if len(ids) > 8 else ''})" if ids else "")
        self.ids = ids
        return True

    async def run(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Keeps `ids` current; awaits `changed()` after each read that changes them."""
        watcher = DirWatcher(self.path.parent)  # not created here: the directory is its writer's
        watcher.start()
        try:
            if self.read():
                await changed()
            while True:
                names = await watcher.next(timeout=self._recheck_s)
                if (not names or self.path.name in names or "" in names) and self.read():
                    await changed()
        finally:
            watcher.close()
