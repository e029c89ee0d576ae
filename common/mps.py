"""MPS facts shared by mps-control (which runs or watches the daemons), mps-control-daemon (which
runs them in NVIDIA's layout) and the plugin-server (which hands their pipes to workloads): where a
resource's directories and files are, which GPUs a resource shares, and the limits each client
gets. NVIDIA's layout (cmd/mps-control-daemon/mps/root.go): `<root>/<resource>/pipe`,
`<root>/<resource>/log`, one `<root>/shm` for all resources, `<root>/<resource>/.started` once a
resource's daemon is configured and `<root>/.ready` once all of them are (what NVIDIA's plugin
waits for before it serves).

Who runs the daemons (GPU_PLUGIN_MPS_DAEMON): `own`, our chart's layout, where mps-control runs
them inside the plugin's pod; `external`, NVIDIA's, where NVIDIA's chart and the GPU Operator run
`mps-control-daemon` in a DaemonSet of its own from the plugin's image and the plugin only looks
at what it publishes under the MPS root. `nvidia-device-plugin` (the command only NVIDIA's chart
and the Operator start the image with; ours starts the entry point) sets `external`: two daemons
on one pipe directory would fight over it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from common.settings import SettingsError, SharedResource

if TYPE_CHECKING:  # nvidia-device-plugin reads the layout names here and execs: no bus types for it
    from common.bus.messages import DeviceState

CONTROL_BIN = "nvidia-cuda-mps-control"
SHM_DIR = "/dev/shm"  # where the daemon and its clients share memory, in every container
READY_FILE = ".ready"
STARTED_FILE = ".started"

DAEMON_ENV = "GPU_PLUGIN_MPS_DAEMON"
OWN = "own"
EXTERNAL = "external"
DAEMON_LAYOUTS = (OWN, EXTERNAL)


def daemon_layout(environ: Mapping[str, str]) -> str:
    """Who runs the MPS control daemons (see the module's docstring); `own` when unset."""
    value = environ.get(DAEMON_ENV, "").strip() or OWN
    if value not in DAEMON_LAYOUTS:
        raise SettingsError(f"{DAEMON_ENV}={value!r}: must be one of {', '.join(DAEMON_LAYOUTS)} ({OWN}: mps-control "
                            f"runs the MPS daemons; {EXTERNAL}: NVIDIA's mps-control-daemon does, and mps-control "
                            "watches them)")
    return value


def pipe_dir(root: str, resource: str) -> str:
    return posixpath.join(root, resource, "pipe")


def log_dir(root: str, resource: str) -> str:
    return posixpath.join(root, resource, "log")


def shm_dir(root: str) -> str:
    return posixpath.join(root, "shm")


def started_file(root: str, resource: str) -> str:
    return posixpath.join(root, resource, STARTED_FILE)


def ready_file(root: str) -> str:
    return posixpath.join(root, READY_FILE)


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
