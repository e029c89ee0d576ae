"""What NVML says of the node, as the labels need it: one pass, NVML initialised and shut down.

The device list is the health monitor's discovery (the same DeviceStates the bus carries);
what GFD asks beyond it (versions, compute capability, MIG attributes, PCI class, fabric) is
asked here on the same handles. NVIDIA's feature discovery initialises NVML for each labeling
pass and shuts it down after it, holding nothing in between: so does this.

Unlike the health monitor, which lists a GPU it cannot describe as Unhealthy and serves the
others, a labeling pass fails whole on any NVML error, as NVIDIA's does: labels must describe
every GPU or none.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from common.bus.messages import UNHEALTHY, DeviceState
from common.nvml.backend import (
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    FabricInfo,
    Handle,
    NvmlBackend,
    NvmlError,
)
from services.feature_discovery.labels import Device, NodeFacts
from services.health_monitor.discovery import discover

log = logging.getLogger(__name__)


class InitError(Exception):
    """NVML cannot be initialised (no driver, no library): what failOnInitError decides about."""


class FactsError(Exception):
    """NVML answered, but not enough to label the node."""


def collect(backend: NvmlBackend) -> NodeFacts:
    """One pass: init, discovery and GFD's extra questions, shutdown (also after a failure)."""
    try:
        backend.init()
    except NvmlError as e:
        raise InitError(f"failed to initialize NVML: {e}") from e
    try:
        return _collect(backend)
    except NvmlError as e:
        raise FactsError(f"NVML: {e}") from e
    finally:
        with contextlib.suppress(NvmlError):
            backend.shutdown()


class _WithoutTopology:
    """The backend, with NVLink and PCIe topology answered NOT_SUPPORTED without asking the driver.

    Discovery also maps every GPU pair's links, for preferred allocation; no label needs them, and
    those queries take up to hundreds of ms per pair on some systems (NVIDIA/k8s-device-plugin#774),
    paid again on every pass while NVML is held.
    """

    def __init__(self, backend: NvmlBackend) -> None:
        self._backend = backend

    def device_get_nvlink_state(self, handle: Handle, link: int) -> int:
        raise NvmlError(NVML_ERROR_NOT_SUPPORTED)

    def device_get_topology_common_ancestor(self, handle1: Handle, handle2: Handle) -> int:
        raise NvmlError(NVML_ERROR_NOT_SUPPORTED)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def _collect(backend: NvmlBackend) -> NodeFacts:
    inventory = discover(_WithoutTopology(backend), time.time())
    if inventory.unreadable:
        raise FactsError(f"error getting devices: {inventory.unreadable[0]}")
    broken = [d for d in inventory.devices if d.health == UNHEALTHY]
    if broken:
        raise FactsError(f"error getting devices: {broken[0].id}: {broken[0].reason}")
    if not any(d.kind == "gpu" for d in inventory.devices):
        return NodeFacts(driver_version="", cuda_driver_version=0, devices=())
    driver = backend.system_get_driver_version()
    cuda = backend.system_get_cuda_driver_version()
    mig_handles = _mig_handles(backend, inventory.handles, inventory.children)
    devices: list[Device] = []
    for state in inventory.devices:
        if state.kind == "gpu":
            devices.append(_gpu(backend, state, inventory.handles[state.id]))
        else:
            devices.append(_mig(backend, state, mig_handles[state.id]))
    return NodeFacts(driver_version=driver, cuda_driver_version=cuda, devices=tuple(devices))


def _gpu(backend: NvmlBackend, state: DeviceState, handle: Handle) -> Device:
    return Device(
        id=state.id, kind="gpu", name=state.name, memory_mb=state.memory_mb, mig_enabled=state.mig_enabled,
        mig_capable=_mig_capable(backend, handle),
        compute_capability=backend.device_get_cuda_compute_capability(handle),
        pci_class=backend.sysfs_pci_class(state.pci_bus_id),
        fabric=_fabric(backend, handle),
    )


def _mig(backend: NvmlBackend, state: DeviceState, handle: Handle) -> Device:
    return Device(id=state.id, kind="mig", name=state.name, memory_mb=state.memory_mb, parent=state.parent,
                  profile=state.profile, attributes=backend.device_get_attributes(handle))


def _mig_capable(backend: NvmlBackend, handle: Handle) -> bool:
    """go-nvlib IsMigCapable: the driver answers for MIG mode at all."""
    try:
        backend.device_get_mig_mode(handle)
    except NvmlError as e:
        if e.code == NVML_ERROR_NOT_SUPPORTED:
            return False
        raise
    return True


def _fabric(backend: NvmlBackend, handle: Handle) -> FabricInfo | None:
    try:
        return backend.device_get_gpu_fabric_info(handle)
    except NvmlError as e:
        if e.code == NVML_ERROR_NOT_SUPPORTED:
            return None  # not in a multi-node NVLink fabric: no clique
        raise


def _mig_handles(backend: NvmlBackend, gpus: dict[str, Handle], children: dict[str, list[str]]) -> dict[str, Handle]:
    """MIG UUID -> handle: discovery keeps only the GPUs' handles, so the slots are walked again."""
    found: dict[str, Handle] = {}
    for gpu, migs in children.items():
        if not migs:
            continue
        for slot in range(backend.device_get_max_mig_device_count(gpus[gpu])):
            try:
                handle = backend.device_get_mig_device_handle_by_index(gpus[gpu], slot)
            except NvmlError as e:
                if e.code == NVML_ERROR_NOT_FOUND:
                    continue  # an empty slot
                raise
            found[backend.device_get_uuid(handle)] = handle
        missing = [m for m in migs if m not in found]
        if missing:
            raise FactsError(f"MIG device {missing[0]} of GPU {gpu} went away during discovery")
    return found
