"""Chooses the NVML backend from the settings."""

from __future__ import annotations

from common.nvml.backend import NvmlBackend
from common.settings import Settings

SIM_CONTROL_SOCKET = "nvml-sim.sock"


def make_backend(settings: Settings) -> NvmlBackend:
    if settings.nvml_backend == "simulated":
        from common.nvml.simulated import SimulatedNvml, fleet_path

        return SimulatedNvml(
            fleet_path(settings.simulated_devices), control_socket=settings.run_dir / SIM_CONTROL_SOCKET
        )
    from common.nvml.real import RealNvml, resolve_library

    # NVIDIA's order: the container's view of the driver root first, then the driver root itself
    # (visible at the same path when mounted so), then the loader.
    return RealNvml(library=resolve_library([settings.container_driver_root, settings.driver_root]))
