"""A stand-in libnvidia-ml.so.1 (fakenvml.c), compiled into a driver root, and its fault injection.

`build_driver_root(root)` is a driver with no GPUs (the library-path tests); `build_gpu_driver_root(root)`
is a DGX H100 with 1 to 8 GPUs whose faults a test injects from outside the process that loaded the
library, through files under the root (so also from outside a container the root is mounted into):

    driver = build_gpu_driver_root(tmp / "driver-root", gpus=8)
    # podman run -v <tmp>/driver-root:/driver-root ... (NVML_BACKEND=real; the default container root)
    driver.inject_xid(3, 79)          # or inject_xid(tmp / "driver-root", "GPU-...", 79)

What the stand-in models, and what it does not, is written at the top of fakenvml.c.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("fakenvml.c")
FAKE_DRIVER_VERSION = "580.159.04"
DEFAULT_LIB_DIR = "usr/lib/x86_64-linux-gnu"
CONTROL_DIR = "run/fakenvml"  # under the driver root; the library finds it from where it is loaded
CONTROL_ENV = "FAKENVML_DIR"  # overrides CONTROL_DIR, for a process that cannot see the root's one

# What the stand-in reports, by NVML index (devtools/fleets/dgx-h100-8.json).
H100_NAME = "NVIDIA H100 80GB HBM3"
H100_MEMORY = 85520809984
DGX_H100_UUIDS = (
    "GPU-f039c560-d7cc-5c7c-54f1-dd371541d642",
    "GPU-395dbbc6-d6a1-da57-04f2-774967777cb0",
    "GPU-a627da9f-778c-8baa-0df9-4f3cd37978a4",
    "GPU-6854711e-8b65-7cae-6d7d-cbbcb4c31190",
    "GPU-1fe1bcc1-2f65-dab2-db25-4d055ee56c43",
    "GPU-91c6aa6e-4fcc-1a95-64ab-dbed86afa4d1",
    "GPU-930bc548-4e27-0432-876f-a3553ef2f53f",
    "GPU-5a20cdd2-88f7-7505-15b6-a96180636b05",
)
DGX_H100_BUS_IDS = tuple(f"00000000:{bus:02X}:00.0" for bus in (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB))
MAX_GPUS = len(DGX_H100_UUIDS)
H100_NVLINKS = 18  # each to an NVSwitch


def _compile(target: Path, lib_dir: str) -> None:
    # The library finds the driver root (and its control directory) this many levels above itself.
    up = "/".join([".."] * len(Path(lib_dir.strip("/")).parts))
    subprocess.run(["cc", "-shared", "-fPIC", "-pthread", "-O2", "-Wall", "-Wextra", "-o", str(target),
                    f'-DFAKE_DRIVER_VERSION="{FAKE_DRIVER_VERSION}"', f'-DFAKE_ROOT_FROM_LIB="{up}"',
                    str(SOURCE)], check=True)


def build_driver_root(root: Path, lib_dir: str = DEFAULT_LIB_DIR) -> Path:
    """<root>/<lib_dir>/libnvidia-ml.so.<version> plus the .so.1 symlink, as a driver installs it; no GPUs.

    Returns the versioned file (what the symlink resolves to)."""
    directory = root / lib_dir
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"libnvidia-ml.so.{FAKE_DRIVER_VERSION}"
    _compile(target, lib_dir)
    (directory / "libnvidia-ml.so.1").symlink_to(target.name)
    return target


def control_dir(root: Path) -> Path:
    return root / CONTROL_DIR


@dataclass(frozen=True)
class FakeDriver:
    """A driver root built by `build_gpu_driver_root`: where things are, what it reports, its faults."""

    root: Path
    library: Path  # the versioned file, as the real backend reports it (symlinks resolved)
    gpus: int

    @property
    def control(self) -> Path:
        return control_dir(self.root)

    @property
    def uuids(self) -> tuple[str, ...]:
        return DGX_H100_UUIDS[:self.gpus]

    @property
    def bus_ids(self) -> tuple[str, ...]:
        return DGX_H100_BUS_IDS[:self.gpus]

    def inject_xid(self, gpu: int | str, xid: int) -> None:
        inject_xid(self.root, gpu, xid)

    def inject(self, line: str) -> None:
        inject(self.root, line)

    def trace(self) -> list[str]:
        return trace(self.root)

    def registered(self, mask: int) -> set[int]:
        return registered(self.root, mask)


def build_gpu_driver_root(root: Path, gpus: int = MAX_GPUS, lib_dir: str = DEFAULT_LIB_DIR) -> FakeDriver:
    """A driver root whose libnvidia-ml reports the first `gpus` GPUs of a DGX H100.

    The control directory (<root>/run/fakenvml) is made writable for everyone: a container may run
    the library under another uid than the test that injects."""
    if not 1 <= gpus <= MAX_GPUS:
        raise ValueError(f"gpus must be 1 to {MAX_GPUS}, got {gpus}")
    library = build_driver_root(root, lib_dir)
    control = control_dir(root)
    control.mkdir(parents=True, exist_ok=True)
    (control / "gpus").write_text(f"{gpus}\n")
    (control / "events").touch()
    for path in (control, control / "events"):
        path.chmod(0o777 if path.is_dir() else 0o666)
    return FakeDriver(root=root, library=library, gpus=gpus)


def _gpu_token(gpu: int | str) -> str:
    if isinstance(gpu, int):
        if not 0 <= gpu < MAX_GPUS:
            raise ValueError(f"GPU index {gpu} is not one of the stand-in's 0..{MAX_GPUS - 1}")
        return str(gpu)
    if gpu not in DGX_H100_UUIDS:
        raise ValueError(f"{gpu!r} is not a UUID of the stand-in")
    return gpu


def inject(root: Path, line: str) -> None:
    """Appends one fault line (fakenvml.c's grammar) to the root's events file, whole, in one write."""
    if "\n" in line:
        raise ValueError("one fault per line")
    data = (line + "\n").encode()
    # O_APPEND and a single write: a library reading concurrently sees the line whole or not at all.
    fd = os.open(control_dir(root) / "events", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write of a fault line to {control_dir(root) / 'events'}")
    finally:
        os.close(fd)


def inject_xid(root: Path, gpu: int | str, xid: int) -> None:
    """An XID critical error event on `gpu` (NVML index or UUID); XID 79 also makes it lost."""
    if xid <= 0:
        raise ValueError(f"an XID is a positive integer, got {xid}")
    inject(root, f"xid {_gpu_token(gpu)} {xid}")


def reset_gpu(root: Path, gpu: int | str) -> None:
    """A GPU reset: the GPU answers again, its volatile ECC counters and recovery advice cleared."""
    inject(root, f"reset {_gpu_token(gpu)}")


def trace(root: Path) -> list[str]:
    """What the library did, in every process that loaded it (fakenvml.c: the trace)."""
    path = control_dir(root) / "trace"
    return path.read_text().splitlines() if path.exists() else []


_REGISTER = re.compile(r"^\d+ register gpu=(\d+) mask=0x([0-9a-f]+)$")


def registered(root: Path, mask: int) -> set[int]:
    """GPU indexes some process registered an event set for every event type of `mask` on."""
    found: set[int] = set()
    for line in trace(root):
        m = _REGISTER.match(line)
        if m and int(m.group(2), 16) & mask == mask:
            found.add(int(m.group(1)))
    return found
