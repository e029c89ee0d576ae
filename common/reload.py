"""Live reload of the config file: on SIGHUP, and when the file changes, in every service.

Why: per-node configuration (NVIDIA's config-manager, our kube-agent, a ConfigMap volume update,
an operator's edit) changes the config file under a running pod; restarting the pod to apply it
would drop every registration at the kubelet. Each service re-resolves its settings exactly as at
start (flag > environment > file > default), so what a reload yields is what a restart would.

A file that fails validation is refused: the service keeps running on the old settings, the reason
is logged and kept in `status` (the services put it on the bus). A setting that a service cannot
change while it runs (paths, sockets, the driver root) is warned about by name and keeps its old
value until the next start; it is never silently dropped.

The directory is watched, not the file: a ConfigMap volume swaps a `..data` symlink and writers
replace the file by rename, neither of which an inotify watch on the old file would see. The
file's content digest decides whether anything changed, so the writers' temporary files and
repeated events cost one read and nothing else.

The file is read as common.files reads every file we do not own: a FIFO, a device or a 1 GB file
put in its place is refused at once (the old config keeps running; restoring a regular file
applies it), never opened blocking or read whole.

Complete files only: a replacement (a new inode: a rename, a ConfigMap's `..data` swap, what every
writer of ours and NVIDIA's does) is complete by construction and applied at once. A file changed
in place (same inode: `echo > file`, an editor writing in place, a copy in progress) may be read
half-written and still be valid YAML (32 devices -> 8 until the rest arrived); it is applied only
once its content has stayed the same for SETTLE_S. Waiting on every change would have cost the
atomic writers, the common case, a second of each label change. SIGHUP applies what is there at
once: its sender says the file is ready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from common.files import read_bounded
from common.fswatch import DirWatcher
from common.settings import Settings, SettingsError
from common.settings.values import MAX_CONFIG_BYTES

log = logging.getLogger(__name__)

Apply = Callable[[Settings], Awaitable[None]]
COALESCE_S = 0.05  # an editor's write, chmod and rename arrive as several events: read once after them
RECHECK_S = 30.0  # backstop for changes inotify cannot see (a file on a remounted volume)
SETTLE_S = 1.0  # a file changed in place is applied once its content has been the same this long


@dataclass(frozen=True)
class ConfigStatus:
    """What the services put on the bus (common.bus.messages.ConfigInfo has the same fields)."""

    file: str = ""  # the config file path ("" = none)
    digest: str = ""  # sha256 (12 hex) of the active file's content
    applied_at: float = 0.0
    refused: str = ""  # why the last changed content was refused ("" = it was not)
    refused_digest: str = ""
    reloads: int = 0  # reloads applied since the start
    refusals: int = 0  # new contents refused since the start


def digest_of(path: str | None) -> str:
    """sha256 (12 hex) of the file's content; "" when there is no file (yet: a ConfigMap swap, a
    writer's rename); `!<errno name>` when something unreadable is there (a FIFO, a file over the
    bound): a content of its own, which the reload then refuses with the reason."""
    if not path:
        return ""
    try:
        return hashlib.sha256(read_bounded(path, MAX_CONFIG_BYTES)).hexdigest()[:12]
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError as e:
        return f"!{errno.errorcode.get(e.errno or 0, 'EIO')}"


def inode_of(path: str | None) -> tuple[int, int]:
    """(device, inode) of the file `path` names (following a ConfigMap's symlinks); (0, 0) if none."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return (st.st_dev, st.st_ino) if st is not None else (0, 0)


class Reloader:
    """Re-resolves the settings on request or file change and hands the result to the service.

    `live` names the Settings fields the service applies while running; `apply` receives the old
    settings with those fields replaced, and raises SettingsError to refuse them (nothing changed
    then). Listeners are told after every outcome (status changed).
    """

    _current: Reloader | None = None

    def __init__(self, service: str, settings: Settings, resolve_again: Callable[[], Settings]) -> None:
        self.service = service
        self.settings = settings
        self._resolve = resolve_again
        self._apply: Apply | None = None
        self._live: frozenset[str] = frozenset()
        self._restart: frozenset[str] = frozenset()
        self._listeners: list[Callable[[], None]] = []
        self._requested = asyncio.Event()
        self.reloads = 0  # new contents (or SIGHUPs) accepted, for the bus
        self.refusals = 0  # new contents (or SIGHUPs) refused, for the bus
        self.status = ConfigStatus(file=settings.config_file or "", digest=digest_of(settings.config_file),
                                   applied_at=time.time())
        self._inode = inode_of(settings.config_file)  # of the content last applied or refused
        self._settling: tuple[str, float] | None = None  # (digest, monotonic deadline) of an in-place change

    @classmethod
    def current_for(cls, service: str, settings: Settings, resolve_again: Callable[[], Settings]) -> Reloader:
        """Creates the reloader of this process (one service per process)."""
        cls._current = cls(service, settings, resolve_again)
        return cls._current

    @classmethod
    def current(cls) -> Reloader | None:
        """The reloader of this process (None where no service runs it, e.g. a tool)."""
        return cls._current

    def serve(self, live: frozenset[str], restart: frozenset[str], apply: Apply) -> None:
        """The service applies `live` fields with `apply`; a change of a `restart` field (one it
        uses but cannot change while running) is warned about; other fields are not its own."""
        self._live, self._restart, self._apply = live, restart, apply

    def on_status(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def request(self) -> None:
        """SIGHUP: re-read even if the content looks unchanged."""
        log.info("SIGHUP received: reloading the settings")
        self._requested.set()

    async def run(self) -> None:
        path = Path(self.settings.config_file) if self.settings.config_file else None
        watcher = DirWatcher(path.parent) if path is not None else None
        if watcher is not None:
            watcher.start()
        try:
            while True:
                forced = await self._next_change(watcher)
                await self.reload(forced)
        finally:
            if watcher is not None:
                watcher.close()

    async def _next_change(self, watcher: DirWatcher | None) -> bool:
        if watcher is None:
            await self._requested.wait()
        else:
            while not self._requested.is_set():
                settle = None if self._settling is None else max(0.0, self._settling[1] - time.monotonic())
                changed = asyncio.create_task(watcher.next(timeout=RECHECK_S if settle is None else settle))
                signalled = asyncio.create_task(self._requested.wait())
                try:
                    done, _ = await asyncio.wait([changed, signalled], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (changed, signalled):
                        t.cancel()
                if changed in done and (changed.result() or settle is not None
                                        or digest_of(self.settings.config_file) not in (self.status.digest, "")):
                    break
            await asyncio.sleep(COALESCE_S)  # a debounce of the writer's burst, not a wait for a condition
        forced = self._requested.is_set()
        self._requested.clear()
        return forced

    async def reload(self, forced: bool = False) -> None:
        inode = inode_of(self.settings.config_file)
        digest = digest_of(self.settings.config_file)
        if not forced and digest in (self.status.digest, self.status.refused_digest):
            self._settling = None
            return
        if not forced and inode == self._inode and not self._settled(digest):
            return
        self._settling, self._inode = None, inode
        try:
            new = self._resolve()
        except SettingsError as e:
            self._refuse(digest, e)
            return
        old = self.settings
        changed = [f.name for f in dataclasses.fields(Settings) if getattr(new, f.name) != getattr(old, f.name)]
        fixed = [name for name in changed if name in self._restart]
        for name in fixed:
            log.warning("config reload: %s changed, but %s cannot change it while running: it keeps %r until "
                        "the pod restarts", name, self.service, getattr(self.settings, name))
        live = {name: getattr(new, name) for name in changed if name in self._live}
        if live:
            log.info("config reload: applying %s", ", ".join(sorted(live)))
            candidate = dataclasses.replace(self.settings, **live)
            if self._apply is not None:
                try:
                    await self._apply(candidate)
                except SettingsError as e:  # valid alone, but not servable here (e.g. the MIG layout)
                    self._refuse(digest, e)
                    return
            self.settings = candidate
        elif not fixed:
            log.info("config reload: no setting of %s changed", self.service)
        self.reloads += 1
        self.status = ConfigStatus(file=self.status.file, digest=digest, applied_at=time.time(), reloads=self.reloads,
                                   refusals=self.refusals)
        self._notify()

    def _settled(self, digest: str) -> bool:
        """Whether content changed in place has stayed `digest` for SETTLE_S (else the wait restarts)."""
        now = time.monotonic()
        if self._settling is None or self._settling[0] != digest:
            log.info("config file changed in place: applying it once it stays unchanged for %.1f s", SETTLE_S)
            self._settling = (digest, now + SETTLE_S)
            return False
        return now >= self._settling[1]

    def _refuse(self, digest: str, error: Exception) -> None:
        self.refusals += 1
        self.status = dataclasses.replace(self.status, refused=str(error), refused_digest=digest,
                                          refusals=self.refusals)
        log.error("config reload refused, still running the previous config (%s): %s",
                  self.status.digest or "no file", error)
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
