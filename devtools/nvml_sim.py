"""A simulated NVML: GPUs read from a device-description file, faults injected from outside.

Why it exists: the project must run, demo and be tested on machines with no GPU, and the
simulation must answer as a real driver does, errors included (the H200 fleet is the
recorded H200, NOT_SUPPORTED answers and all). It ships in the product and is selected
with `--nvml-backend=simulated`.

Description file (JSON). Any device field may instead be `{"error": <NVML code>}`, and
that call then raises `NvmlError(code)`, the way the recording shows it:

    {"driver_version": "580.159.04",
     "cuda_driver_version": 13000,        # nvmlSystemGetCudaDriverVersion (absent: NOT_SUPPORTED)
     "init_error": 9,                     # optional: nvmlInit fails with this code
     "devices": [{"uuid": "GPU-...", "name": "NVIDIA H200", "minor": 0,
                  "pci_bus_id": "00000000:00:06.0", "memory_total": 150754820096,
                  "sysfs_numa_node": 0, "mig_mode": [0, 0], "max_mig_devices": 7,
                  "supported_events": 65439, "numa_node_id": {"error": 3},
                  "mig_devices": [{"uuid": "MIG-...", "name": "NVIDIA H200 MIG 1g.18gb",
                                   "gpu_instance_id": 7, "compute_instance_id": 0,
                                   "memory_total": 17179869184}],
                  "nvlinks": [{"state": 1, "remote_pci_bus_id": "00000000:05:00.0"},
                              {"error": 3}],
                  "topology": {"GPU-<peer uuid>": 20}}]}

Device keys: `uuid`, `name`, `minor`, `pci_bus_id` (NVML form, 8-digit domain) and
`memory_total` (bytes) are required. Optional, a missing key answering NOT_SUPPORTED:
`mig_mode` [current, pending]; `max_mig_devices`; `supported_events` (event mask);
`ecc_mode` [current, pending] (only its error form changes an answer: ECC counters then
raise it); `sysfs_numa_node` (-1 or absent: unknown); `mig_devices` (MIG device handles in
index order; each needs uuid, name, gpu_instance_id, compute_instance_id, memory_total).
`nvlinks`: entry i answers link i: `state` (1 active, 0 inactive) for nvmlDeviceGetNvLinkState,
`remote_pci_bus_id` for nvmlDeviceGetNvLinkRemotePciInfo (absent: NOT_SUPPORTED), or the
whole entry `{"error": code}`; a link index past the list answers NOT_SUPPORTED, one at or
past NVML_NVLINK_MAX_LINKS INVALID_ARGUMENT; `"nvlinks": {"error": 3}` makes every link
NOT_SUPPORTED, as on the recorded H200. `topology`: peer UUID -> nvmlGpuTopologyLevel_t
(or an error object); looked up on either GPU of the pair, a GPU with itself is INTERNAL (0),
an unlisted pair NOT_SUPPORTED. Recorded answers kept only as data, with no call of their
own (yet): `numa_node_id`, `retired_pages_pending`, `remapped_rows`.
What feature discovery asks besides (each absent: NOT_SUPPORTED, or unknown for sysfs):
`cuda_compute_capability` [major, minor]; `pci_class` (sysfs's "0x030200" or a number);
`gpu_fabric_info` {"cluster_uuid": "<uuid>", "clique_id": n, "state": 3, "status": 0} (absent
on GPUs outside a multi-node NVLink fabric, as on the recorded H200); and per MIG device
`attributes` {"multiprocessors", "copy_engines", "decoders", "encoders", "jpegs", "ofas",
"gpu_instance_slices", "compute_instance_slices", "memory_mb"} (nvmlDeviceGetAttributes).
`vgpu` {"host_driver_version": "595.71.03", "host_driver_branch": "r596_25"} (ASCII, 10 bytes at
most each) makes the GPU a vGPU guest's: its PCI config space (`config_space`, what sysfs shows a
reader with CAP_SYS_ADMIN) then carries the host driver record that NVIDIA's feature discovery reads;
without it the space is a passthrough GPU's. Either goes through the real parser (common.nvml.vgpu).

Faults arrive as JSON lines on a unix socket (`FaultClient`, `gpu-plugin inject`), served
by a thread of the backend: {"op": "xid", "uuid": U, "xid": 79, "gi": .., "ci": ..},
{"op": "ecc", "uuid": U, "kind": "dbe"|"sbe", "count": n}, {"op": "lost", "uuid": U},
{"op": "remap", "uuid": U, "failed": true} (a pending row remap, failed or not),
{"op": "retired_pending", "uuid": U}, {"op": "event_error", "uuid": U, "code": 999} (the
next event wait fails), {"op": "hang", "uuid": U} (every later call on that GPU blocks inside the call, as a
real driver's call on a wedged GPU does, until "recover" releases it), {"op": "recover", "uuid": U}.
XID 79 and "lost" make every later call on that GPU raise GPU_IS_LOST, as a fallen-off-the-bus
GPU does, until "recover". Debug only, no driver does this: {"op": "freeze_loop"} blocks the
asyncio loop that called init() (the health-monitor's) until {"op": "thaw_loop"}, so that tests
can freeze a component's loop while its other threads live.
Where the description has "recovery_action", fatal XIDs and DBEs set it to GPU reset and
"recover" back to none, as recent drivers advise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.nvml.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    GPU_RECOVERY_ACTION_GPU_RESET,
    GPU_RECOVERY_ACTION_NONE,
    MEMORY_ERROR_CORRECTED,
    MEMORY_ERROR_UNCORRECTED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNINITIALIZED,
    NVML_ERROR_UNKNOWN,
    NVML_NVLINK_MAX_LINKS,
    NVML_TOPOLOGY_INTERNAL,
    WHOLE_GPU_INSTANCE,
    EventData,
    FabricInfo,
    Handle,
    MigAttributes,
    NvmlError,
    PciInfo,
    VgpuInfo,
)
from common.nvml.vgpu import CONVENTIONAL_SIZE, PCI_VENDOR_NVIDIA, read_host_driver

if TYPE_CHECKING:  # the settings (and YAML) stay out of scripts that only replay a fleet
    from common.settings import Settings

log = logging.getLogger(__name__)

XID_GPU_LOST = 79  # "GPU has fallen off the bus"
# XIDs after which the driver advises a GPU reset (double-bit ECC, lost, row-remap failure, ...).
XIDS_NEEDING_RESET = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120})
FLEETS = ("h200", "dgx-h100-8", "dgx-h100-8-mig")


_VGPU_FIELD = 10  # the width of each field of a vGPU's host driver record


class DescriptionError(ValueError):
    """The device-description file is unreadable or malformed."""


def fleet_path(name_or_path: str) -> Path:
    """A shipped fleet name (one of FLEETS) or a path to a description file."""
    if name_or_path in FLEETS:
        return Path(str(resources.files("devtools") / "fleets" / f"{name_or_path}.json"))
    return Path(name_or_path)


def _answer(value: Any) -> Any:
    """Either the recorded value or the recorded error, raised."""
    if isinstance(value, dict) and set(value) == {"error"}:
        raise NvmlError(int(value["error"]))
    return value


@dataclass
class _SimMig:
    parent: _SimGpu
    desc: dict[str, Any]


@dataclass
class _SimGpu:
    desc: dict[str, Any]
    lost: bool = False
    ecc: dict[int, int] = field(
        default_factory=lambda: {MEMORY_ERROR_CORRECTED: 0, MEMORY_ERROR_UNCORRECTED: 0}
    )
    registered: int = 0  # event mask registered on the (single) event set
    hang: threading.Event | None = None  # set: calls on this GPU block until it is released
    migs: list[_SimMig] = field(default_factory=list)

    @property
    def uuid(self) -> str:
        return str(self.desc["uuid"])


def load_description(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DescriptionError(f"cannot read device description {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise DescriptionError(f"device description {path}: expected an object with a 'devices' list")
    for i, dev in enumerate(data["devices"]):
        for key in ("uuid", "name", "minor", "pci_bus_id", "memory_total"):
            if not isinstance(dev, dict) or key not in dev:
                raise DescriptionError(f"device description {path}: devices[{i}] lacks '{key}'")
        if "vgpu" in dev:
            vgpu = dev["vgpu"]
            if not (isinstance(vgpu, dict) and set(vgpu) == {"host_driver_version", "host_driver_branch"}
                    and all(isinstance(v, str) and v.isascii() and len(v) <= _VGPU_FIELD for v in vgpu.values())):
                raise DescriptionError(f"device description {path}: devices[{i}].vgpu: expected "
                                       f"host_driver_version and host_driver_branch, ASCII of at most "
                                       f"{_VGPU_FIELD} characters")
    return data


def config_space(vgpu: dict[str, str] | None) -> bytes:
    """A GPU's PCI config space as sysfs shows it to CAP_SYS_ADMIN, the conventional 256 bytes: an
    NVIDIA 3D controller listing its capabilities. A passthrough GPU's list is power management (0x60),
    MSI (0x68), PCI Express (0x78) and a vendor-specific capability without the vGPU signature
    (0xb4); a vGPU's is the vendor-specific capability first (0xd0: "VF", then record 0 with the
    host driver's version and branch, NUL-padded), then MSI (0x68), as a vGPU function shows it."""
    space = bytearray(CONVENTIONAL_SIZE)
    space[0:2] = PCI_VENDOR_NVIDIA.to_bytes(2, "little")
    space[0x06] = 0x10  # status: a capability list follows
    space[0x09:0x0C] = bytes([0x00, 0x02, 0x03])  # class 0x030200 (programming interface, subclass, base)
    if vgpu is None:
        chain = [(0x60, 0x01, bytes(6)), (0x68, 0x05, bytes(14)), (0x78, 0x10, bytes(58)),
                 (0xB4, 0x09, bytes([0x01, 0x00]) + bytes(15))]
    else:
        record = bytes([0x00, 2 + 2 * _VGPU_FIELD]) + b"".join(
            vgpu[k].encode("ascii").ljust(_VGPU_FIELD, b"\0") for k in ("host_driver_version", "host_driver_branch"))
        chain = [(0xD0, 0x09, b"VF" + record), (0x68, 0x05, bytes(14))]
    space[0x34] = chain[0][0]
    for n, (at, cap_id, body) in enumerate(chain):
        following = chain[n + 1][0] if n + 1 < len(chain) else 0
        # Byte 2 is the length only in a vendor-specific capability; the others' bodies start there.
        head = bytes([cap_id, following, 3 + len(body)]) if cap_id == 0x09 else bytes([cap_id, following])
        space[at:at + len(head) + len(body)] = head + body
    return bytes(space)


class SimulatedNvml:
    """NvmlBackend over a description file; see the module docstring."""

    shutdown_under_wait_safe = True  # its event wait is a Python queue

    def __init__(self, description: Path, control_socket: Path | None = None) -> None:
        self._description = description
        self._desc = load_description(description)
        self._control_path = control_socket
        self._lock = threading.Lock()
        self._initialized = False
        self._gpus: list[_SimGpu] = []
        self._events: queue.Queue[EventData] = queue.Queue()
        self._listener: socket.socket | None = None
        self._wait_error: int | None = None  # the next event_set_wait fails with this code
        self._init_loop: asyncio.AbstractEventLoop | None = None  # freeze_loop's target
        self._thaw = threading.Event()

    # -- lifecycle --------------------------------------------------------------------
    def init(self) -> None:
        if "init_error" in self._desc:
            raise NvmlError(int(self._desc["init_error"]))
        with self._lock:
            if not self._gpus:
                for d in self._desc["devices"]:
                    gpu = _SimGpu(desc=d)
                    gpu.migs = [_SimMig(parent=gpu, desc=m) for m in d.get("mig_devices", [])]
                    self._gpus.append(gpu)
            self._initialized = True
        with contextlib.suppress(RuntimeError):  # not called from a loop: freeze_loop has no target
            self._init_loop = asyncio.get_running_loop()
        if self._control_path is not None and self._listener is None:
            self._start_control_server(self._control_path)

    def library(self) -> str:
        """No libnvidia-ml: the device description that stands in for it."""
        return f"simulated:{self._description}" if self._initialized else ""

    def shutdown(self) -> None:
        with self._lock:
            if not self._initialized:
                raise NvmlError(NVML_ERROR_UNINITIALIZED)
            self._initialized = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._control_path is not None:
                self._control_path.unlink(missing_ok=True)

    def _check(self) -> None:
        if not self._initialized:
            raise NvmlError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: Handle) -> _SimGpu:
        self._check()
        gpu = handle.parent if isinstance(handle, _SimMig) else handle
        if not isinstance(gpu, _SimGpu):
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        hang = gpu.hang
        if hang is not None:
            hang.wait()  # outside the lock, as a real hung call holds no lock of ours
        if gpu.lost:
            raise NvmlError(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def _field(self, handle: Handle, key: str) -> Any:
        gpu = self._gpu(handle)
        desc = handle.desc if isinstance(handle, _SimMig) else gpu.desc
        if key not in desc:
            raise NvmlError(NVML_ERROR_NOT_SUPPORTED)
        return _answer(desc[key])

    # -- queries ----------------------------------------------------------------------
    def system_get_driver_version(self) -> str:
        self._check()
        return str(self._desc.get("driver_version", "0.0"))

    def system_get_cuda_driver_version(self) -> int:
        self._check()
        return int(_answer(self._desc.get("cuda_driver_version", {"error": NVML_ERROR_NOT_SUPPORTED})))

    def device_get_count(self) -> int:
        self._check()
        return len(self._gpus)

    def device_get_handle_by_index(self, index: int) -> Handle:
        self._check()
        if not 0 <= index < len(self._gpus):
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        return self._gpus[index]

    def device_get_uuid(self, handle: Handle) -> str:
        return str(self._field(handle, "uuid"))

    def device_get_name(self, handle: Handle) -> str:
        return str(self._field(handle, "name"))

    def device_get_minor_number(self, handle: Handle) -> int:
        if isinstance(handle, _SimMig):
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        return int(self._field(handle, "minor"))

    def device_get_pci_info(self, handle: Handle) -> PciInfo:
        return PciInfo(bus_id=str(self._field(self._gpu(handle), "pci_bus_id")))

    def device_get_memory_total(self, handle: Handle) -> int:
        return int(self._field(handle, "memory_total"))

    def device_get_cuda_compute_capability(self, handle: Handle) -> tuple[int, int]:
        major, minor = self._field(handle, "cuda_compute_capability")
        return int(major), int(minor)

    def device_get_attributes(self, mig_handle: Handle) -> MigAttributes:
        a = self._field(mig_handle, "attributes")
        return MigAttributes(**{f.name: int(a[f.name]) for f in fields(MigAttributes)})

    def device_get_gpu_fabric_info(self, handle: Handle) -> FabricInfo:
        info = self._field(self._gpu(handle), "gpu_fabric_info")
        return FabricInfo(cluster_uuid=str(info["cluster_uuid"]), clique_id=int(info["clique_id"]),
                          state=int(info["state"]), status=int(info.get("status", 0)))

    def sysfs_pci_class(self, pci_bus_id: str) -> int | None:
        for gpu in self._gpus:
            if str(gpu.desc["pci_bus_id"]).lower() == pci_bus_id.lower():
                value = gpu.desc.get("pci_class")
                return int(value, 16) if isinstance(value, str) else None if value is None else int(value)
        return None

    def sysfs_vgpu(self, pci_bus_id: str) -> VgpuInfo | None:
        for gpu in self._gpus:
            if str(gpu.desc["pci_bus_id"]).lower() == pci_bus_id.lower():
                return read_host_driver(functools.partial(config_space, gpu.desc.get("vgpu")), pci_bus_id)
        return None

    def device_get_mig_mode(self, handle: Handle) -> tuple[int, int]:
        cur, pending = self._field(handle, "mig_mode")
        return int(cur), int(pending)

    def device_get_max_mig_device_count(self, handle: Handle) -> int:
        return int(self._field(handle, "max_mig_devices"))

    def device_get_mig_device_handle_by_index(self, handle: Handle, index: int) -> Handle:
        gpu = self._gpu(handle)
        if isinstance(handle, _SimMig) or index < 0:
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        # Past the GPU's maximum is INVALID_ARGUMENT; with MIG off the maximum is 0 and the
        # recorded H200 answered NOT_FOUND for index 0, so only a positive maximum bounds it.
        max_migs = int(_answer(gpu.desc.get("max_mig_devices", 0)))
        if 0 < max_migs <= index:
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(gpu.migs):
            raise NvmlError(NVML_ERROR_NOT_FOUND)
        return gpu.migs[index]

    def device_get_gpu_instance_id(self, mig_handle: Handle) -> int:
        if not isinstance(mig_handle, _SimMig):
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        return int(self._field(mig_handle, "gpu_instance_id"))

    def device_get_compute_instance_id(self, mig_handle: Handle) -> int:
        if not isinstance(mig_handle, _SimMig):
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        return int(self._field(mig_handle, "compute_instance_id"))

    def device_get_supported_event_types(self, handle: Handle) -> int:
        return int(self._field(handle, "supported_events"))

    def device_get_total_ecc_errors(self, handle: Handle, error_type: int) -> int:
        gpu = self._gpu(handle)
        if "ecc_mode" in gpu.desc:
            _answer(gpu.desc["ecc_mode"])
        if error_type not in gpu.ecc:
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.ecc[error_type]

    def sysfs_numa_node(self, pci_bus_id: str) -> int | None:
        for gpu in self._gpus:
            if str(gpu.desc["pci_bus_id"]).lower() == pci_bus_id.lower():
                node = gpu.desc.get("sysfs_numa_node", -1)
                return None if node is None or int(node) < 0 else int(node)
        return None

    # -- topology ---------------------------------------------------------------------
    def _nvlink(self, handle: Handle, link: int) -> dict[str, Any]:
        gpu = self._gpu(handle)
        if isinstance(handle, _SimMig) or not 0 <= link < NVML_NVLINK_MAX_LINKS:
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        links = _answer(gpu.desc.get("nvlinks", {"error": NVML_ERROR_NOT_SUPPORTED}))
        if link >= len(links):
            raise NvmlError(NVML_ERROR_NOT_SUPPORTED)
        entry: dict[str, Any] = _answer(links[link])
        return entry

    def device_get_nvlink_state(self, handle: Handle, link: int) -> int:
        return int(_answer(self._nvlink(handle, link).get("state", {"error": NVML_ERROR_NOT_SUPPORTED})))

    def device_get_nvlink_remote_pci_info(self, handle: Handle, link: int) -> PciInfo:
        entry = self._nvlink(handle, link)
        bus_id = _answer(entry.get("remote_pci_bus_id", {"error": NVML_ERROR_NOT_SUPPORTED}))
        return PciInfo(bus_id=str(bus_id))

    def device_get_topology_common_ancestor(self, handle1: Handle, handle2: Handle) -> int:
        gpu1, gpu2 = self._gpu(handle1), self._gpu(handle2)
        if isinstance(handle1, _SimMig) or isinstance(handle2, _SimMig):
            raise NvmlError(NVML_ERROR_INVALID_ARGUMENT)
        for a, b in ((gpu1, gpu2), (gpu2, gpu1)):
            topo = _answer(a.desc.get("topology", {}))
            if b.uuid in topo:
                return int(_answer(topo[b.uuid]))
        if gpu1 is gpu2:
            return NVML_TOPOLOGY_INTERNAL
        raise NvmlError(NVML_ERROR_NOT_SUPPORTED)

    def mig_cap_minors(self, gpu_minor: int, gpu_instance_id: int, compute_instance_id: int) -> list[int]:
        # The layout the driver gives /proc/driver/nvidia-caps/mig-minors: config 1, monitor 2,
        # then per GPU 15 GPU instances, each an access node followed by 8 compute instances.
        gi = 3 + gpu_minor * 15 * 9 + gpu_instance_id * 9
        return [gi, gi + 1 + compute_instance_id]

    # -- probes -----------------------------------------------------------------------
    def device_get_remapped_rows(self, handle: Handle) -> tuple[int, int, bool, bool]:
        corr, unc, pending, failed = self._field(handle, "remapped_rows")
        return int(corr), int(unc), bool(pending), bool(failed)

    def device_get_retired_pages_pending_status(self, handle: Handle) -> bool:
        return bool(self._field(handle, "retired_pages_pending"))

    def device_get_recovery_action(self, handle: Handle) -> int:
        return int(self._field(handle, "recovery_action"))

    # -- events -----------------------------------------------------------------------
    def event_set_create(self) -> Handle:
        self._check()
        return self._events

    def device_register_events(self, handle: Handle, event_types: int, event_set: Handle) -> None:
        gpu = self._gpu(handle)
        supported = int(_answer(gpu.desc.get("supported_events", {"error": NVML_ERROR_NOT_SUPPORTED})))
        if event_types & ~supported:
            raise NvmlError(NVML_ERROR_NOT_SUPPORTED)
        with self._lock:
            gpu.registered |= event_types

    def event_set_wait(self, event_set: Handle, timeout_ms: int) -> EventData:
        self._check()
        with self._lock:
            if self._wait_error is not None:
                code, self._wait_error = self._wait_error, None
                raise NvmlError(code)
        try:
            return self._events.get(timeout=timeout_ms / 1000.0)
        except queue.Empty:
            raise NvmlError(NVML_ERROR_TIMEOUT) from None

    def event_set_free(self, event_set: Handle) -> None:
        self._check()

    # -- fault injection --------------------------------------------------------------
    def inject(self, cmd: dict[str, Any]) -> None:
        """Applies one fault command; raises ValueError with a readable reason."""
        op = cmd.get("op")
        uuid = cmd.get("uuid")
        if op in ("freeze_loop", "thaw_loop"):
            self._freeze_loop(op == "freeze_loop")
            return
        with self._lock:
            gpu, mig = self._find(uuid)
            if op == "xid":
                xid = cmd.get("xid")
                if not isinstance(xid, int) or xid <= 0:
                    raise ValueError(f"xid must be a positive integer, got {xid!r}")
                gi, ci = WHOLE_GPU_INSTANCE, WHOLE_GPU_INSTANCE
                if mig is not None:
                    gi = int(mig.desc["gpu_instance_id"])
                    ci = int(mig.desc["compute_instance_id"])
                gi = int(cmd.get("gi", gi))
                ci = int(cmd.get("ci", ci))
                self._emit(gpu, EVENT_XID_CRITICAL, xid, gi, ci)
                if xid == XID_GPU_LOST:
                    gpu.lost = True
                if xid in XIDS_NEEDING_RESET:
                    self._advise(gpu, GPU_RECOVERY_ACTION_GPU_RESET)
            elif op == "ecc":
                kind = cmd.get("kind")
                count = cmd.get("count", 1)
                if kind not in ("sbe", "dbe") or not isinstance(count, int) or count < 1:
                    raise ValueError("ecc needs kind 'sbe' or 'dbe' and a positive count")
                err = MEMORY_ERROR_UNCORRECTED if kind == "dbe" else MEMORY_ERROR_CORRECTED
                gpu.ecc[err] += count
                etype = EVENT_DOUBLE_BIT_ECC if kind == "dbe" else EVENT_SINGLE_BIT_ECC
                if kind == "dbe":
                    self._advise(gpu, GPU_RECOVERY_ACTION_GPU_RESET)
                self._emit(gpu, etype, 0, WHOLE_GPU_INSTANCE, WHOLE_GPU_INSTANCE)
            elif op == "lost":
                gpu.lost = True
            elif op == "remap":
                failed = bool(cmd.get("failed", True))
                self._set_field(gpu, "remapped_rows", lambda v: [v[0], v[1] + 1, 1, int(failed)])
            elif op == "retired_pending":
                self._set_field(gpu, "retired_pages_pending", lambda v: 1)
            elif op == "event_error":
                self._wait_error = int(cmd.get("code", NVML_ERROR_UNKNOWN))
            elif op == "hang":
                if gpu.hang is None:
                    gpu.hang = threading.Event()
            elif op == "recover":
                # What a GPU reset gives back: a GPU that answers, clean counters, no advice.
                if gpu.hang is not None:
                    gpu.hang.set()  # releases the calls blocked in it
                    gpu.hang = None
                gpu.lost = False
                gpu.ecc = {MEMORY_ERROR_CORRECTED: 0, MEMORY_ERROR_UNCORRECTED: 0}
                self._advise(gpu, GPU_RECOVERY_ACTION_NONE)
                self._set_field(gpu, "remapped_rows", lambda v: [v[0], v[1], 0, 0])
                self._set_field(gpu, "retired_pages_pending", lambda v: 0)
            else:
                raise ValueError(
                    f"unknown fault op {op!r}; expected xid, ecc, lost, remap, retired_pending, event_error, hang, "
                    "recover, freeze_loop or thaw_loop"
                )

    def _freeze_loop(self, freeze: bool) -> None:
        loop = self._init_loop
        if loop is None:
            raise ValueError("freeze_loop: init() was not called from an asyncio loop")
        if not freeze:
            self._thaw.set()
            return
        self._thaw.clear()
        try:
            loop.call_soon_threadsafe(self._thaw.wait)
        except RuntimeError as e:  # the loop is closed
            raise ValueError(f"freeze_loop: {e}") from e

    @staticmethod
    def _set_field(gpu: _SimGpu, key: str, change: Callable[[Any], Any]) -> None:
        """Changes a probed value, unless the GPU does not support the query at all."""
        value = gpu.desc.get(key)
        if value is not None and not (isinstance(value, dict) and "error" in value):
            gpu.desc[key] = change(value)

    def _advise(self, gpu: _SimGpu, action: int) -> None:
        self._set_field(gpu, "recovery_action", lambda v: action)

    def _find(self, uuid: object) -> tuple[_SimGpu, _SimMig | None]:
        for gpu in self._gpus:
            if gpu.uuid == uuid:
                return gpu, None
            for mig in gpu.migs:
                if mig.desc.get("uuid") == uuid:
                    return gpu, mig
        raise ValueError(f"unknown device {uuid!r}")

    def _emit(self, gpu: _SimGpu, etype: int, data: int, gi: int, ci: int) -> None:
        # As in NVML, an event reaches the set only if it was registered for the device.
        if gpu.registered & etype:
            self._events.put(EventData(gpu.uuid, etype, data, gi, ci))

    def _start_control_server(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._serve, args=(listener,), name="nvml-sim-control", daemon=True).start()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by shutdown()
            with conn:
                conn.settimeout(2.0)
                try:
                    line = conn.makefile("rb").readline(65536)
                    try:
                        cmd = json.loads(line)
                        if not isinstance(cmd, dict):
                            raise ValueError("a fault command is a JSON object")
                        self.inject(cmd)
                        reply: dict[str, Any] = {"ok": True}
                    except ValueError as e:
                        reply = {"ok": False, "error": str(e)}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError as e:
                    log.warning("fault control connection failed: %s", e)


class FaultClient:
    """Sends fault commands to a running simulated backend (used by `gpu-plugin inject`)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self._path = path
        self._timeout = timeout

    def send(self, cmd: dict[str, Any]) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self._timeout)
            try:
                s.connect(str(self._path))
            except OSError as e:
                raise ConnectionError(
                    f"no simulated NVML backend answers on {self._path} ({e.strerror}); "
                    "is the health-monitor running with --nvml-backend=simulated?"
                ) from e
            s.sendall(json.dumps(cmd).encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline(65536) or b"{}")
        if not reply.get("ok"):
            raise ValueError(reply.get("error", "no answer from the simulated backend"))


SIM_CONTROL_SOCKET = "nvml-sim.sock"  # in the run dir: where FaultClient reaches the simulated driver


def make_backend(settings: Settings) -> SimulatedNvml:
    """The "simulated" NVML backend, as the product's factory asks for it (an entry point)."""
    return SimulatedNvml(fleet_path(settings.simulated_devices), control_socket=settings.run_dir / SIM_CONTROL_SOCKET)
