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
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FILE = "cordons.json"


class CordonFileError(ValueError):
    """The cordon file exists but cannot be read; it is left as it is for the operator."""


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
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CordonFileError(f"cannot read {self.path}: {e}") from e
        if not isinstance(raw, dict):
            raise CordonFileError(f"{self.path}: expected a JSON object of device -> cordon")
        out: dict[str, Cordon] = {}
        for dev, entry in raw.items():
            when = entry.get("time", 0.0) if isinstance(entry, dict) else None
            if (not isinstance(entry, dict) or not isinstance(entry.get("reason", ""), str)
                    or isinstance(when, bool) or not isinstance(when, int | float)):
                raise CordonFileError(f"{self.path}: entry {dev!r} is malformed (expected reason: str, time: number)")
            out[dev] = Cordon(reason=entry.get("reason", ""), time=float(when))
        return out

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / (FILE + ".lock"), "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, cordons: dict[str, Cordon]) -> None:
        body = {d: {"reason": c.reason, "time": c.time} for d, c in sorted(cordons.items())}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".cordons.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def cordon(self, device: str, reason: str) -> None:
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
