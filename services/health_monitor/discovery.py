"""Discovery: what GPUs and MIG devices the driver reports, as bus `DeviceState`s.

Written once against `NvmlBackend`, so the real driver and the simulation go through the
same code. Optional facts the driver does not support (MIG mode on older GPUs, NUMA)
are left unknown; a GPU that is lost while being described is listed Unhealthy rather
than dropped, because a device missing from the list is a device the kubelet forgets.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from common.bus.messages import (
    HEALTHY,
    UNHEALTHY,
    DeviceState,
    FabricState,
    MigAttributesState,
    PairLink,
    VgpuState,
    is_device_id,
)
from common.nvml.backend import (
    NVLINK_STATE_ACTIVE,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_NVLINK_MAX_LINKS,
    Handle,
    NvmlBackend,
    NvmlError,
)
from services.health_monitor.deadline import each_within
from services.health_monitor.remembered import GpuMemory, Remembered, remembered_of

log = logging.getLogger(__name__)


@dataclass
class Inventory:
    devices: list[DeviceState] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # GPUs NVML counts but cannot name, and why
    links: list[PairLink] = field(default_factory=list)
    handles: dict[str, Handle] = field(default_factory=dict)  # GPU UUID -> handle
    children: dict[str, list[str]] = field(default_factory=dict)  # GPU UUID -> MIG UUIDs


def _mig_profile(name: str) -> str:
    # NVML names MIG devices "<GPU name> MIG <profile>", e.g. "NVIDIA H100 80GB HBM3 MIG 1g.10gb".
    _, sep, profile = name.rpartition("MIG ")
    return profile.strip() if sep else ""


def _unusable(inv: Inventory, what: str, uuid: str) -> None:
    shown = uuid if len(uuid) <= 64 else uuid[:64] + "..."
    log.error("%s: UUID %r is not a valid device ID: not offered", what, shown)
    inv.unreadable.append(f"{what}: UUID {shown!r} is not a valid device ID")


@dataclass
class _Found:
    """One GPU index's discovery, filled in as it goes (read by the caller when it hangs)."""

    index: int
    step: str = "nvmlDeviceGetHandleByIndex"
    handle: Handle | None = None
    uuid: str = ""
    error: str = ""  # the GPU cannot be offered at all (no UUID, or not a device ID)
    code: int = 0  # NVML's code for `error`
    gpu: DeviceState | None = None
    migs: list[DeviceState] = field(default_factory=list)
    done: bool = False


def _discover_one(backend: NvmlBackend, found: _Found, now: float) -> None:
    index = found.index
    try:
        found.handle = backend.device_get_handle_by_index(index)
        found.step = "nvmlDeviceGetUUID"
        found.uuid = backend.device_get_uuid(found.handle)
    except NvmlError as e:
        # Without a UUID there is nothing to offer or to name: say so, and go on with the rest.
        log.error("GPU index %d cannot be read (%s)", index, e)
        found.error, found.code, found.done = f"GPU index {index}: {e}", e.code, True
        return
    if not is_device_id(found.uuid):
        found.done = True  # the caller leaves it out (the bus refuses a state carrying such an ID)
        return
    found.step = "describing it (name, PCI, memory, MIG devices)"
    try:
        found.gpu, found.migs = _describe(backend, found.handle, index, found.uuid, now)
    except NvmlError as e:
        # One broken GPU must not keep the others from being served: list it Unhealthy.
        reason = "GPU lost" if e.code == NVML_ERROR_GPU_IS_LOST else f"discovery failed: {e}"
        log.error("GPU %s (index %d): %s", found.uuid, index, reason)
        found.gpu = DeviceState(id=found.uuid, kind="gpu", index=str(index), name="", health=UNHEALTHY,
                                reason=reason, since=now)
    found.done = True


def discover(backend: NvmlBackend, now: float, deadline: float | None = None,
             remembered: Mapping[int, Remembered] | None = None) -> Inventory:
    """Every GPU and MIG device. With a `deadline`, each GPU is described in a thread of its own:
    one whose NVML call hangs (a wedged GPU) is listed Unhealthy, the call named, after that
    many seconds (or, without a UUID, reported unreadable), and the others are served. A GPU
    without a UUID at an index `remembered` from earlier in this boot is listed Unhealthy under the
    UUID seen there (services.health_monitor.remembered)."""
    inv = Inventory()
    found = [_Found(index) for index in range(backend.device_get_count())]
    each_within([(f"nvml-discover-{f.index}", functools.partial(_discover_one, backend, f, now)) for f in found],
                deadline)
    nameless: list[tuple[_Found, str]] = []
    listed: dict[int, list[DeviceState]] = {}  # GPU index -> the GPU and its MIG devices, in index order below
    for f in found:
        if f.error:
            nameless.append((f, f.error))
            continue
        if not f.done and not f.uuid:
            log.error("GPU index %d: discovery hung in %s: not offered", f.index, f.step)
            nameless.append((f, f"GPU index {f.index}: NVML {f.step} hung"))
            continue
        if not is_device_id(f.uuid):
            _unusable(inv, f"GPU index {f.index}", f.uuid)
            continue
        assert f.handle is not None
        inv.handles[f.uuid] = f.handle
        gpu, migs = f.gpu, f.migs
        if not f.done or gpu is None:
            # Listed, so that the kubelet keeps the device and its probes can say when it answers.
            reason = f"NVML discovery hung ({f.step})"
            log.error("GPU %s (index %d): %s", f.uuid, f.index, reason)
            gpu, migs = DeviceState(id=f.uuid, kind="gpu", index=str(f.index), name="", health=UNHEALTHY,
                                    reason=reason, since=now), []
        for m in migs:
            if not is_device_id(m.id):
                _unusable(inv, f"MIG device of GPU index {f.index}", m.id)
        migs = [m for m in migs if is_device_id(m.id)]
        listed[f.index] = [gpu, *migs]
        inv.children[f.uuid] = [m.id for m in migs]
    named = {d.id for devices in listed.values() for d in devices}
    for f, error in nameless:
        seen = (remembered or {}).get(f.index)
        if seen is None or seen.uuid in named or not is_device_id(seen.uuid):
            inv.unreadable.append(error)
            continue
        cause = "GPU lost" if f.code == NVML_ERROR_GPU_IS_LOST else f"discovery failed: {error}"
        reason = f"{cause} (its UUID unreadable: as seen at index {f.index} earlier in this boot)"
        log.error("GPU %s (index %d): %s: listed Unhealthy", seen.uuid, f.index, reason)
        inv.unreadable.append(f"{error} (listed Unhealthy as {seen.uuid}, seen there earlier in this boot)")
        listed[f.index] = [DeviceState(id=seen.uuid, kind="gpu", index=str(f.index), name=seen.name, health=UNHEALTHY,
                                       reason=reason, since=now, minor=seen.minor, pci_bus_id=seen.pci_bus_id,
                                       memory_mb=seen.memory_mb)]
        inv.children[seen.uuid] = []
        if f.handle is not None:
            inv.handles[seen.uuid] = f.handle  # probed: a reset GPU that answers again recovers
    inv.devices = [d for index in sorted(listed) for d in listed[index]]  # the order of discovery, as always
    inv.links = discover_links(backend, inv)
    return inv


def discover_remembering(backend: NvmlBackend, now: float, deadline: float | None,
                         memory: GpuMemory | None) -> Inventory:
    """discover(), with the GPUs `memory` holds from earlier in this boot, and what it named added to them
    (an index that names nothing now keeps what it held)."""
    remembered = memory.load() if memory is not None else {}
    inventory = discover(backend, now, deadline, remembered)
    if memory is not None:
        memory.save({**remembered, **remembered_of(inventory.devices)})
    return inventory


def discover_links(backend: NvmlBackend, inv: Inventory) -> list[PairLink]:
    """NVLink counts and PCIe common-ancestor levels of every GPU pair, asked once at start.

    NVIDIA's plugin asks NVML on every GetPreferredAllocation (hundreds of ms per pair on
    some systems); asking once here keeps the request path free of NVML. Links to an
    NVSwitch connect a GPU to every other GPU on the switch fabric: such a pair counts the
    smaller of their switch link counts. Any query the driver refuses leaves that part
    unknown; preferred allocation then falls back on NUMA.
    """
    gpus = [d for d in inv.devices if d.kind == "gpu" and d.pci_bus_id]
    by_bus = {d.pci_bus_id.lower(): d.id for d in gpus}
    direct: dict[tuple[str, str], int] = {}
    to_switch: dict[str, int] = {}
    for d in gpus:
        handle = inv.handles[d.id]
        for link in range(NVML_NVLINK_MAX_LINKS):
            try:
                if backend.device_get_nvlink_state(handle, link) != NVLINK_STATE_ACTIVE:
                    continue
                remote = backend.device_get_nvlink_remote_pci_info(handle, link).bus_id.lower()
            except NvmlError:
                break  # no NVLink on this GPU, or past its last link
            peer = by_bus.get(remote)
            if peer is None:
                to_switch[d.id] = to_switch.get(d.id, 0) + 1
            elif d.id < peer:  # both ends report a direct link: count it from one
                direct[(d.id, peer)] = direct.get((d.id, peer), 0) + 1
    links: list[PairLink] = []
    for i, a in enumerate(gpus):
        for b in gpus[i + 1:]:
            try:
                level = backend.device_get_topology_common_ancestor(inv.handles[a.id], inv.handles[b.id])
            except NvmlError:
                level = -1
            nvlinks = direct.get((min(a.id, b.id), max(a.id, b.id)), 0)
            if to_switch.get(a.id) and to_switch.get(b.id):
                nvlinks += min(to_switch[a.id], to_switch[b.id])
            links.append(PairLink(a=a.id, b=b.id, nvlinks=nvlinks, level=level))
    return links


def _describe(
    backend: NvmlBackend, handle: Handle, index: int, uuid: str, now: float
) -> tuple[DeviceState, list[DeviceState]]:
    pci = backend.device_get_pci_info(handle).bus_id
    gpu = DeviceState(
        id=uuid,
        kind="gpu",
        index=str(index),
        name=backend.device_get_name(handle),
        health=HEALTHY,
        reason="",
        since=now,
        minor=backend.device_get_minor_number(handle),
        pci_bus_id=pci,
        numa_node=backend.sysfs_numa_node(pci),
        memory_mb=backend.device_get_memory_total(handle) // (1024 * 1024),
    )
    mode = _mig_mode(backend, handle, uuid)  # asked once: the labels, the MIG devices and the flag all need it
    gpu = _with_feature_facts(backend, handle, gpu, mig_capable=mode is not None)
    if mode is None or mode[0] != 1:
        return gpu, []
    return dataclasses.replace(gpu, mig_enabled=True), _describe_migs(backend, handle, gpu, now)


T = TypeVar("T")


def _optional(what: str, uuid: str, ask: Callable[[], T]) -> T | None:
    """A fact only the labels need: unknown when the driver refuses it, so that it never decides a
    GPU's health (a lost GPU is the probes' to find: the first probe runs before the first state)."""
    try:
        return ask()
    except NvmlError as e:
        if e.code != NVML_ERROR_NOT_SUPPORTED:
            log.warning("%s: %s unknown: %s", uuid, what, e)
        return None


def _with_feature_facts(backend: NvmlBackend, handle: Handle, gpu: DeviceState, mig_capable: bool) -> DeviceState:
    """What NVIDIA's gpu-feature-discovery asks of a GPU beyond discovery, asked once here: none of it
    changes while the driver runs, and feature-labels then needs no NVML of its own."""
    cc = _optional("compute capability", gpu.id, lambda: backend.device_get_cuda_compute_capability(handle))
    fabric = _optional("fabric", gpu.id, lambda: backend.device_get_gpu_fabric_info(handle))
    pci_class = backend.sysfs_pci_class(gpu.pci_bus_id)
    vgpu = backend.sysfs_vgpu(gpu.pci_bus_id)
    return dataclasses.replace(
        gpu,
        compute_major=cc[0] if cc is not None else -1,
        compute_minor=cc[1] if cc is not None else -1,
        mig_capable=mig_capable,
        pci_class=pci_class if pci_class is not None else -1,
        fabric=None if fabric is None else FabricState(cluster_uuid=fabric.cluster_uuid, clique_id=fabric.clique_id,
                                                       state=fabric.state, status=fabric.status),
        vgpu=None if vgpu is None else VgpuState(host_driver_version=vgpu.host_driver_version,
                                                 host_driver_branch=vgpu.host_driver_branch),
    )


def _mig_attributes(backend: NvmlBackend, mig_handle: Handle, uuid: str) -> MigAttributesState | None:
    a = _optional("MIG attributes", uuid, lambda: backend.device_get_attributes(mig_handle))
    if a is None:
        return None
    return MigAttributesState(
        multiprocessors=a.multiprocessors, copy_engines=a.copy_engines, decoders=a.decoders, encoders=a.encoders,
        jpegs=a.jpegs, ofas=a.ofas, gpu_instance_slices=a.gpu_instance_slices,
        compute_instance_slices=a.compute_instance_slices, memory_mb=a.memory_mb,
    )


def _mig_mode(backend: NvmlBackend, handle: Handle, uuid: str) -> tuple[int, int] | None:
    """(current, pending) MIG mode; None when the driver does not answer for it (go-nvlib's
    IsMigCapable: NOT_SUPPORTED is not capable, said silently; another refusal is logged). A lost
    GPU is no unknown mode: it fails the description, as any call of it does."""
    try:
        return backend.device_get_mig_mode(handle)
    except NvmlError as e:
        if e.code == NVML_ERROR_GPU_IS_LOST:
            raise
        if e.code != NVML_ERROR_NOT_SUPPORTED:
            log.warning("%s: MIG mode unknown: %s", uuid, e)
        return None


def _describe_migs(backend: NvmlBackend, handle: Handle, gpu: DeviceState, now: float) -> list[DeviceState]:
    """The MIG devices of a GPU in MIG mode."""
    migs: list[DeviceState] = []
    for slot in range(backend.device_get_max_mig_device_count(handle)):
        try:
            mh = backend.device_get_mig_device_handle_by_index(handle, slot)
        except NvmlError as e:
            if e.code == NVML_ERROR_NOT_FOUND:
                continue  # an empty slot
            raise
        name = backend.device_get_name(mh)
        uuid = backend.device_get_uuid(mh)
        migs.append(
            DeviceState(
                id=uuid,
                kind="mig",
                index=f"{gpu.index}:{len(migs)}",
                name=name,
                health=HEALTHY,
                reason="",
                since=now,
                pci_bus_id=gpu.pci_bus_id,
                numa_node=gpu.numa_node,
                memory_mb=backend.device_get_memory_total(mh) // (1024 * 1024),
                parent=gpu.id,
                gpu_instance_id=(gi := backend.device_get_gpu_instance_id(mh)),
                compute_instance_id=(ci := backend.device_get_compute_instance_id(mh)),
                profile=_mig_profile(name),
                caps=backend.mig_cap_minors(gpu.minor, gi, ci),
                mig_attributes=_mig_attributes(backend, mh, uuid),
            )
        )
    return migs
