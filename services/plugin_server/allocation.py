"""Allocate: pure functions from requested device IDs to a ContainerAllocateResponse; and the
checks of a GetPreferredAllocation request.

Validation comes first and names the offending IDs, with NVIDIA's wording, because an
Allocate error fails the pod for good (UnexpectedAdmissionError) and the operator needs
to know why. A refused request is INVALID_ARGUMENT; the messages list a few IDs, then a count.

The answer matches NVIDIA's plugin (v0.20.0) for every device-list strategy:
- envvar: NVIDIA_VISIBLE_DEVICES=<id>,<id>.
- volume-mounts: NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices and one /dev/null
  mount per device; with envvar too it answers exactly as volume-mounts alone.
- cdi-annotations / cdi-cri: the CDI names k8s.device-plugin.nvidia.com/gpu=<id> in one
  annotation / in cdi_devices. With only CDI strategies there is no NVIDIA_VISIBLE_DEVICES
  and no DeviceSpecs: the runtime takes everything from the CDI spec (see `cdi`).
- gdrcopyEnabled, gdsEnabled, mofedEnabled: NVIDIA_GDRCOPY / NVIDIA_GDS / NVIDIA_MOFED=enabled with a
  non-CDI strategy; with a CDI strategy the names <vendor>/gdrcopy=all, gds=all, mofed=all after the
  devices (and the IMEX channels), whose specs `cdi.extra_specs` writes.
- pass_device_specs (with a non-CDI strategy): the GPU's /dev/nvidia<minor> and, for a MIG
  device, its GI/CI capability nodes, host paths under the dev root.
- MPS replicas, with every strategy (CDI-only included, as NVIDIA's): CUDA_MPS_PIPE_DIRECTORY=
  <container root>/<resource>/pipe, that directory mounted from <MPS root>/<resource>/pipe and
  /dev/shm from <MPS root>/shm, before the device mounts. NVIDIA sets no CUDA_MPS_ACTIVE_THREAD_
  PERCENTAGE in the answer: the daemon's defaults, set by mps-control, are the limits.

This is the gRPC hot path: no I/O, no NVML, nothing but dictionary look-ups.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from common.bus.messages import HEALTHY
from common.mps import SHM_DIR, pipe_dir, shm_dir
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import Settings
from services.plugin_server.device_table import PluginDevice

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
VOLUME_MOUNT_ROOT = "/var/run/nvidia-container-devices"
CDI_VENDOR = "k8s.device-plugin.nvidia.com"
CDI_KIND = f"{CDI_VENDOR}/gpu"
IMEX_CHANNELS = "NVIDIA_IMEX_CHANNELS"
IMEX_CHANNEL_DIR = "/dev/nvidia-caps-imex-channels"
CDI_ANNOTATION_NAME = "nvidia-device-plugin"
MAX_REPORTED_IDS = 10
MAX_ID_CHARS = 128  # keep error messages readable when a request is absurd

_CDI_STRATEGIES = frozenset({"cdi-annotations", "cdi-cri"})


@dataclass(frozen=True)
class Extras:
    """What every container with GPUs also gets (NVIDIA's gdrcopyEnabled, gdsEnabled, mofedEnabled and IMEX
    channels), made again at start and at each reload: kept out of Settings because the IMEX channels depend
    on device nodes found then."""

    gdrcopy: bool = False
    gds: bool = False
    mofed: bool = False
    imex_channels: tuple[str, ...] = ()  # IDs whose device node exists (or is required)

    def cdi_names(self) -> list[str]:
        """NVIDIA's order: the IMEX channels, then the gated classes gdrcopy, gds, mofed (AdditionalDevices)."""
        names = [f"{CDI_VENDOR}/imex-channel={c}" for c in self.imex_channels]
        if self.gdrcopy:
            names.append(f"{CDI_VENDOR}/gdrcopy=all")
        if self.gds:
            names.append(f"{CDI_VENDOR}/gds=all")
        if self.mofed:
            names.append(f"{CDI_VENDOR}/mofed=all")
        return names


NO_EXTRAS = Extras()


class AllocationError(ValueError):
    """The request cannot be honoured; the message is returned as INVALID_ARGUMENT."""


def new_annotation_id() -> str:
    """The random part of the CDI annotation key, one per container response (as NVIDIA's)."""
    return str(uuid.uuid4())


def _clip(device_id: str) -> str:
    # An error travels in gRPC trailing metadata (16 KiB at most): an absurd ID is shortened.
    return device_id if len(device_id) <= MAX_ID_CHARS else device_id[:MAX_ID_CHARS] + "..."


def _names(ids: Sequence[str]) -> str:
    shown = ", ".join(_clip(i) for i in ids[:MAX_REPORTED_IDS])
    more = len(ids) - MAX_REPORTED_IDS
    return shown + (f" (and {more} more)" if more > 0 else "")


def validate(
    resource: str, ids: Sequence[str], devices: Mapping[str, PluginDevice], settings: Settings | None = None
) -> None:
    """Raises AllocationError for a request that must not be answered.

    In order: no IDs, unknown IDs, duplicate IDs, unhealthy IDs, and (with
    failRequestsGreaterThanOne) more than one time-sliced replica. `settings` None skips
    the last check.
    """
    prefix = f'invalid allocation request for "{resource}": invalid request'
    if not ids:
        raise AllocationError(f"{prefix}: no devices requested")
    unknown = [i for i in ids if i not in devices]
    if unknown:
        raise AllocationError(f"{prefix}: unknown device: {_names(unknown)}")
    if duplicates := _duplicates(ids):
        raise AllocationError(f"{prefix}: duplicate device: {_names(duplicates)}")
    unhealthy = [i for i in ids if devices[i].health != HEALTHY]
    if unhealthy:
        raise AllocationError(f"{prefix}: unhealthy device: {_names(unhealthy)}")
    if settings is not None and len(ids) > 1 and any(_one_only(devices[i], settings) for i in ids):
        raise AllocationError(f"{prefix}: maximum request size for shared resources is 1; found {len(ids)}")


def check_disjoint(resource: str, requests: Sequence[Sequence[str]]) -> None:
    """Raises AllocationError when a device ID is named by two container requests of one Allocate:
    each container would be answered as if the device were its own. (The kubelet sends one.)"""
    if len(requests) < 2:
        return
    seen: set[str] = set()
    shared: dict[str, None] = {}
    for ids in requests:
        shared.update(dict.fromkeys(i for i in ids if i in seen))
        seen.update(ids)
    if shared:
        raise AllocationError(f'invalid allocation request for "{resource}": invalid request: device requested by '
                              f"more than one container: {_names(list(shared))}")


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out: dict[str, None] = {}
    for i in ids:
        if i in seen:
            out[i] = None
        seen.add(i)
    return list(out)


def preferred_candidates(
    resource: str, available: Sequence[str], must_include: Sequence[str], size: int,
    devices: Mapping[str, PluginDevice],
) -> Sequence[str]:
    """Checks one ContainerPreferredAllocationRequest; returns the IDs of `available` to choose from.

    Raises AllocationError unless the request is one the kubelet sends (devicemanager's
    devicesToAllocate: sets of the IDs we listed, must_include the devices already chosen and
    inside available, allocation_size the container's total, at least 1 and never more than
    available holds): a size below 1, an ID not served, an ID twice, must_include outside
    available, more must_include than the size, or a size `available` cannot fill. An answer to
    such a request was a guess the kubelet never asked for.

    Unhealthy IDs are not refused: the kubelet offers what its last ListAndWatch update said was
    Healthy, and a device can turn Unhealthy here before that update reaches it. A refusal would
    fail the pod's admission for good over that race, so the device is passed over instead while
    enough others remain (and the Allocate that follows succeeds); when none do, the answer keeps
    it and Allocate says which device is unhealthy. must_include is kept as the kubelet chose it.
    """
    prefix = f'invalid preferred allocation request for "{resource}"'
    if size < 1:
        raise AllocationError(f"{prefix}: allocation_size must be at least 1; got {size}")
    unknown = [i for i in available if i not in devices] + [i for i in must_include if i not in devices]
    if unknown:
        raise AllocationError(f"{prefix}: unknown device: {_names(list(dict.fromkeys(unknown)))}")
    avail = set(available)
    twice = _duplicates(available) + _duplicates(must_include)
    if twice:
        raise AllocationError(f"{prefix}: duplicate device: {_names(twice)}")
    outside = [i for i in must_include if i not in avail]
    if outside:
        raise AllocationError(f"{prefix}: must_include_deviceIDs not in available_deviceIDs: {_names(outside)}")
    if len(must_include) > size:
        raise AllocationError(f"{prefix}: must_include_deviceIDs holds {len(must_include)} devices, more than "
                              f"allocation_size {size}")
    if size > len(available):
        raise AllocationError(f"{prefix}: allocation_size {size} is more than the {len(available)} available devices")
    must = set(must_include)
    unhealthy = {i for i in available if devices[i].health != HEALTHY and i not in must}
    if unhealthy and len(available) - len(unhealthy) >= size:
        return [i for i in available if i not in unhealthy]
    return available


def _one_only(dev: PluginDevice, settings: Settings) -> bool:
    """A replica of a section with failRequestsGreaterThanOne (MPS's default: true, as NVIDIA's)."""
    if dev.replica is None:
        return False
    section = settings.sharing.mps if dev.sharing == "mps" else settings.sharing.time_slicing
    return section is not None and section.fail_requests_greater_than_one


def mps_edits(resource: str, settings: Settings) -> tuple[dict[str, str], list[pb.Mount]]:
    """NVIDIA's MPS part of an answer for `resource` (its served name): the env and the two mounts."""
    container = pipe_dir(settings.mps_container_root, resource)
    return {MPS_PIPE_ENV: container}, [
        pb.Mount(container_path=container, host_path=pipe_dir(settings.mps_host_root, resource)),
        pb.Mount(container_path=SHM_DIR, host_path=shm_dir(settings.mps_host_root)),
    ]


def runtime_ids(ids: Sequence[str], devices: Mapping[str, PluginDevice], id_strategy: str) -> list[str]:
    """The names the container runtime gets: UUIDs or indices ("N", "N:M"), replicas collapsed,
    in the order of first appearance."""
    out: dict[str, None] = {}
    for i in ids:
        dev = devices[i].device
        out[dev.id if id_strategy == "uuid" else dev.index] = None
    return list(out)


def host_path(root: str, path: str) -> str:
    """`path` (absolute, inside the container) under the host's `root`, as Go's filepath.Join."""
    return posixpath.normpath(posixpath.join("/", root.lstrip("/"), path.lstrip("/")))


def device_specs(ids: Sequence[str], devices: Mapping[str, PluginDevice], dev_root: str) -> list[pb.DeviceSpec]:
    """One /dev/nvidia<minor> per physical GPU, a MIG device's cap nodes after its GPU's; no duplicates."""
    paths: dict[str, None] = {}
    for i in ids:
        pd = devices[i]
        gpu = pd.parent if pd.parent is not None else pd.device
        if gpu.minor >= 0:
            paths[f"/dev/nvidia{gpu.minor}"] = None
        if pd.device.kind == "mig":
            for cap in pd.device.caps:
                paths[f"/dev/nvidia-caps/nvidia-cap{cap}"] = None
    return [pb.DeviceSpec(container_path=p, host_path=host_path(dev_root, p), permissions="rw") for p in paths]


def container_response(
    resource: str,
    ids: Sequence[str],
    devices: Mapping[str, PluginDevice],
    settings: Settings,
    *,
    annotation_id: Callable[[], str] = new_annotation_id,
    extras: Extras = NO_EXTRAS,
) -> pb.ContainerAllocateResponse:
    validate(resource, ids, devices, settings)
    names = runtime_ids(ids, devices, settings.device_id_strategy)
    resp = pb.ContainerAllocateResponse()
    strategies = settings.device_list_strategy
    if "cdi-annotations" in strategies or "cdi-cri" in strategies:
        qualified = [f"{CDI_KIND}={name}" for name in names] + extras.cdi_names()
        if "cdi-annotations" in strategies:
            key = f"{settings.cdi_annotation_prefix}{CDI_ANNOTATION_NAME}_{annotation_id()}"
            resp.annotations[key] = ",".join(qualified)
        if "cdi-cri" in strategies:
            resp.cdi_devices.extend(pb.CDIDevice(name=q) for q in qualified)
    if any(devices[i].sharing == "mps" for i in ids):
        envs, mounts = mps_edits(resource, settings)
        resp.envs.update(envs)
        resp.mounts.extend(mounts)
    if _CDI_STRATEGIES.issuperset(strategies):
        return resp  # only CDI: the runtime takes everything from the spec
    if "envvar" in strategies and extras.imex_channels:
        resp.envs[IMEX_CHANNELS] = ",".join(extras.imex_channels)
    if "volume-mounts" in strategies:
        resp.envs[VISIBLE_DEVICES] = VOLUME_MOUNT_ROOT
        resp.mounts.extend(
            pb.Mount(container_path=f"{VOLUME_MOUNT_ROOT}/{name}", host_path="/dev/null") for name in names
        )
        resp.mounts.extend(pb.Mount(container_path=f"{VOLUME_MOUNT_ROOT}/imex/{c}", host_path="/dev/null")
                           for c in extras.imex_channels)
    else:  # envvar
        resp.envs[VISIBLE_DEVICES] = ",".join(names)
    if settings.pass_device_specs:
        resp.devices.extend(device_specs(ids, devices, settings.dev_root))
        resp.devices.extend(
            pb.DeviceSpec(container_path=p, host_path=host_path(settings.dev_root, p), permissions="rw")
            for p in (f"{IMEX_CHANNEL_DIR}/channel{c}" for c in extras.imex_channels))
    # The legacy runtime hook injects GDRCopy, GPUDirect Storage and MOFED from these, as for NVIDIA's plugin.
    if extras.gdrcopy:
        resp.envs["NVIDIA_GDRCOPY"] = "enabled"
    if extras.gds:
        resp.envs["NVIDIA_GDS"] = "enabled"
    if extras.mofed:
        resp.envs["NVIDIA_MOFED"] = "enabled"
    return resp
