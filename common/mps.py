"""MPS facts shared by mps-control (which runs the daemons) and the plugin-server (which hands
their pipes to workloads): where a resource's directories are, which GPUs a resource shares,
and the limits each client gets. NVIDIA's layout (cmd/mps-control-daemon/mps/root.go):
`<root>/<resource>/pipe`, `<root>/<resource>/log`, one `<root>/shm` for all resources.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

from common.bus.messages import DeviceState
from common.settings import SharedResource

CONTROL_BIN = "nvidia-cuda-mps-control"
SHM_DIR = "/dev/shm"  # where the daemon and its clients share memory, in every container


def pipe_dir(root: str, resource: str) -> str:
    return posixpath.join(root, resource, "pipe")


def log_dir(root: str, resource: str) -> str:
    return posixpath.join(root, resource, "log")


def shm_dir(root: str) -> str:
    return posixpath.join(root, "shm")


def selected(res: SharedResource, position: int, device: DeviceState) -> bool:
    """Whether `res.devices` selects `device`, the `position`-th device of its resource."""
    if res.devices is None:
        return True
    if isinstance(res.devices, int):
        return position < res.devices
    return device.index in res.devices or device.id in res.devices


def gpus_of(res: SharedResource, devices: Iterable[DeviceState]) -> list[DeviceState]:
    """The GPUs that `res` shares with MPS, in discovery order (MPS shares whole GPUs only)."""
    gpus = [d for d in devices if d.kind == "gpu"]
    return [g for position, g in enumerate(gpus) if selected(res, position, g)]


def active_thread_percentage(replicas: int) -> int:
    """Each client's share of a GPU's SMs, as NVIDIA's daemon sets it: 100 / replicas, rounded down."""
    return 100 // replicas


def pinned_mem_limit(memory_mb: int, replicas: int) -> str:
    """Each client's share of a GPU's memory in MPS's syntax ("<n>M"); "" when the size is unknown,
    and then, as NVIDIA's daemon does, no limit is set."""
    return f"{memory_mb // replicas}M" if memory_mb > 0 else ""
