"""Cordons: devices an operator took out of service by hand, kept on disk.

The file lives in the state directory, which by default is under the kubelet's
device-plugin directory: the kubelet removes only socket files there, and it is the
DaemonSet's one hostPath, so a cordon survives a restart of any component and of the pod.
Writers (the `gpu-plugin cordon` CLI) take an exclusive lock and replace the file
atomically; the health-monitor watches the directory and re-reads it.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.files import read_bounded, replace_file

FILE = "cordons.json"
# Far beyond what `gpu-plugin cordon` writes for any node (a few hundred bytes per device):
# a bigger file is not ours, and reading it whole would cost the monitor its memory.
MAX_FILE_BYTES = 1 << 20
MAX_REASON_CHARS = 1024  # keeps every entry, and so the file, small


class CordonFileError(ValueError):
    """The cordon file exists but cannot be read; it is left as it is for the operator."""


class CordonStateError(OSError):
    """The state dir cannot hold cordons (read-only filesystem, a file in its way)."""


@dataclass(frozen=True)
class Cordon:
    reason: str
    time: float


class CordonStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / FILE

    def load(self) -> dict[str, Cordon]:
        try:
            # Only we write it (by rename), on a host path: never follow a link planted there, and a
            # FIFO in its place is refused at once (it blocked the monitor's loop: no XID got through).
            data = read_bounded(self.path, MAX_FILE_BYTES, follow=False)
        except (FileNotFoundError, NotADirectoryError):
            # NotADirectory: a file sits where the state dir should be, so no cordon file
            # can exist: there are no cordons (and the monitor says cordons are unavailable).
            return {}
        except OSError as e:
            raise CordonFileError(f"cannot read {self.path}: {e.strerror or e}; not a cordon file we wrote") from e
        try:
            raw = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise CordonFileError(f"cannot read {self.path}: {str(e)[:200]}") from e
        if not isinstance(raw, dict):
            raise CordonFileError(f"{self.path}: expected a JSON object of device -> cordon")
        out: dict[str, Cordon] = {}
        for dev, entry in raw.items():
            when = entry.get("time", 0.0) if isinstance(entry, dict) else None
            if (not isinstance(entry, dict) or not isinstance(entry.get("reason", ""), str)
                    or isinstance(when, bool) or not isinstance(when, int | float)):
                raise CordonFileError(
                    f"{self.path}: entry {dev[:80]!r} is malformed (expected reason: str, time: number)")
            out[dev] = Cordon(reason=entry.get("reason", ""), time=float(when))
        return out

    def check_writable(self) -> None:
        """Creates the state dir if needed; raises CordonStateError saying why cordons cannot be kept."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise CordonStateError(f"cannot create the state dir {self.dir}: {e.strerror or e}") from e
        if not self.dir.is_dir():
            raise CordonStateError(f"the state dir {self.dir} is not a directory")
        if not os.access(self.dir, os.W_OK):  # EROFS shows here even for root
            raise CordonStateError(f"the state dir {self.dir} is not writable (read-only filesystem?)")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.check_writable()
        # The state dir is on a host path: never follow a symlink planted there, never truncate
        # (root would otherwise empty whatever file the link names), and only a regular file.
        path = self.dir / (FILE + ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError as e:
            raise CordonStateError(f"cordon lock {path}: {e.strerror} (a symlink or not a regular file?)") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CordonStateError(f"cordon lock {path} is not a regular file; remove it")
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, cordons: dict[str, Cordon]) -> None:
        body = {d: {"reason": c.reason, "time": c.time} for d, c in sorted(cordons.items())}
        replace_file(self.path, json.dumps(body, indent=1).encode(), 0o600)

    def cordon(self, device: str, reason: str) -> None:
        if len(reason) > MAX_REASON_CHARS:
            raise CordonFileError(f"the reason is {len(reason)} characters; at most {MAX_REASON_CHARS}")
        with self._locked():
            cordons = self.load()
            cordons[device] = Cordon(reason=reason, time=time.time())
            self._write(cordons)

    def uncordon(self, device: str) -> bool:
        """False when the device was not cordoned."""
        with self._locked():
            cordons = self.load()
            if cordons.pop(device, None) is None:
                return False
            self._write(cordons)
            return True
