"""What NVML says of the node, as the labels need it: one pass, NVML initialised and shut down.

The device list is the health monitor's discovery (the same DeviceStates the bus carries, with
what GFD asks beyond it: compute capability, MIG attributes, PCI class, fabric, vGPU host driver);
the versions are asked here. NVIDIA's feature discovery initialises NVML for each labeling
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

from common.bus.messages import UNHEALTHY
from common.nvml.backend import NVML_ERROR_NOT_SUPPORTED, Handle, NvmlBackend, NvmlError
from services.feature_discovery.labels import LabelError, NodeFacts, facts_of
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
    try:
        # Discovery read what the labels need beyond the device list (compute capability, MIG mode and
        # attributes, PCI class, fabric, vGPU host driver): asked once per pass, not again here.
        return facts_of(backend.system_get_driver_version(), backend.system_get_cuda_driver_version(),
                        inventory.devices)
    except LabelError as e:
        raise FactsError(str(e)) from e
