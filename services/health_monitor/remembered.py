"""The GPUs this boot has seen, kept in the state dir: a GPU lost before a monitor restart stays listed.

Why: a GPU that fell off the bus answers GPU_IS_LOST to every call, its UUID included. A
health-monitor started after that (its own crash, a config change of a restart-only setting, a pod
update) could not name it, so the GPU vanished from ListAndWatch: the kubelet dropped it from the
node's capacity, and the fault read as a smaller node instead of a broken GPU. Each discovery
records every GPU it named (index, UUID, what the device plugin needs of it); a later discovery in
the same boot lists a GPU it cannot name at a remembered index as Unhealthy, under its remembered
UUID, so the kubelet keeps it (and its pods their status) until the GPU is reset.

Only within one boot (the kernel's boot_id): after a reboot the driver enumerates anew (a GPU that
is gone is gone, the indexes may differ). A record whose UUID is discovered elsewhere is not used.
The file is ours (written by rename, not followed if a link) and bounded; a bad one is ignored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from common.bus.messages import DeviceState
from common.files import read_bounded, replace_file

log = logging.getLogger(__name__)

FILE = "gpus.json"
MAX_BYTES = 1 << 18  # 8 GPUs take ~1.5 KB; 1 024 would take ~200 KB
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Remembered:
    uuid: str
    name: str
    pci_bus_id: str
    minor: int
    memory_mb: int


def boot_id(path: Path = BOOT_ID) -> str:
    try:
        return read_bounded(path, 64).decode().strip()
    except (OSError, ValueError):
        return ""  # no boot id: nothing is remembered (a record could not be told from another boot's)


class GpuMemory:
    def __init__(self, state_dir: Path, boot: str | None = None) -> None:
        self.path = state_dir / FILE
        self.boot = boot_id() if boot is None else boot
        self._written: bytes | None = None

    def load(self) -> dict[int, Remembered]:
        """index -> the GPU seen there in this boot; {} when none, another boot's, or unreadable."""
        if not self.boot:
            return {}
        try:
            data = json.loads(read_bounded(self.path, MAX_BYTES, follow=False))
            if not isinstance(data, dict) or data.get("boot") != self.boot:
                return {}
            gpus = data["gpus"]
            return {int(index): Remembered(str(g["uuid"]), str(g["name"]), str(g["pci_bus_id"]), int(g["minor"]),
                                           int(g["memory_mb"])) for index, g in gpus.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("remembered GPUs in %s not used (%s: %s): a GPU lost before this start is not listed",
                        self.path, type(e).__name__, e)
            return {}

    def save(self, gpus: dict[int, Remembered]) -> None:
        """Writes `gpus` (atomically, only when they changed); a state dir that cannot hold it is no
        failure of the monitor's: it is said once."""
        if not self.boot:
            return
        body = json.dumps({"boot": self.boot, "gpus": {str(i): asdict(g) for i, g in sorted(gpus.items())}},
                          sort_keys=True).encode()
        if body == self._written:
            return
        try:
            replace_file(self.path, body, 0o600)
        except OSError as e:
            if self._written is None:
                log.warning("cannot remember the GPUs in %s (%s): a GPU lost before a restart would not be listed",
                            self.path, e.strerror or e)
        self._written = body


def remembered_of(devices: list[DeviceState]) -> dict[int, Remembered]:
    """What a discovery names, to be remembered (GPUs with their facts: a GPU described without them, as
    one lost after its UUID was read, keeps what was remembered at its index; one listed from memory
    gives back what it was listed with)."""
    return {int(d.index): Remembered(d.id, d.name, d.pci_bus_id, d.minor, d.memory_mb)
            for d in devices if d.kind == "gpu" and d.index.isdigit() and d.name}
