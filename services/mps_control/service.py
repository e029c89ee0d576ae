"""mps-control's service body, shared by `gpu-plugin mps-control` (the plugin's pod) and
`mps-control-daemon` (NVIDIA's layout): MpsControl on the mps bus, following config reloads."""

from __future__ import annotations

import asyncio

from common.bus.messages import MPS_SOCKET
from common.bus.sockets import BusPublisher
from common.lifecycle import ensure_private_dir
from common.reload import Reloader
from common.settings import Settings
from services.mps_control.control import Devices, MpsControl

# What a config reload changes in a running mps-control, and what it uses but cannot change.
LIVE = frozenset({"sharing"})
RESTART = frozenset({"mps_root", "container_driver_root", "dra_devices"})


async def serve(settings: Settings, stop: asyncio.Event, devices: Devices, external: bool) -> None:
    """MpsControl on the bus, following config reloads: the same in both layouts and both programs.
    `devices` is closed at the end."""
    try:
        ensure_private_dir(settings.run_dir)
        publisher = BusPublisher(settings.bus_path(MPS_SOCKET), heartbeat_s=settings.heartbeat_s)
        try:
            control = MpsControl(settings, publisher, devices, external)
            reloader = Reloader.current()
            if reloader is not None:
                reloader.serve(LIVE, RESTART, control.apply_settings)
            await control.run(stop)
        finally:
            publisher.close()
    finally:
        devices.close()
