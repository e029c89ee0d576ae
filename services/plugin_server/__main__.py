"""plugin-server: wiring only."""

from __future__ import annotations

import asyncio
import sys

from common.bus.messages import HEALTH_SOCKET, PLUGIN_SOCKET, ConfigInfo
from common.bus.sockets import BusPublisher
from common.lifecycle import ensure_private_dir, run_service, service_entry
from common.reload import Reloader
from common.settings import Settings
from common.watchdog import watched
from services.plugin_server.server import PluginServer

# What a config reload changes in a running plugin-server, and what it uses but cannot change.
LIVE = frozenset({"mig_strategy", "pass_device_specs", "device_list_strategy", "device_id_strategy",
                  "cdi_annotation_prefix", "shared_devices_allocation_policy", "gds_enabled", "mofed_enabled",
                  "gdrcopy_enabled", "imex_channel_ids", "imex_required", "sharing"})
# dra_devices: the dra-plugin reads it at its start too; changed live here only, a GPU would be offered by
# both APIs (or by none) until the pod restarts.
RESTART = frozenset({"driver_root", "dev_root", "container_driver_root", "cdi_hook_path", "kubelet_socket",
                     "device_plugin_dir", "mps_root", "dra_devices"})


async def main(settings: Settings, stop: asyncio.Event) -> None:
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(PLUGIN_SOCKET), heartbeat_s=settings.heartbeat_s)
    try:
        server = PluginServer(settings, publisher, settings.bus_path(HEALTH_SOCKET))
        reloader = Reloader.current()
        if reloader is not None:
            reloader.serve(LIVE, RESTART, server.apply_settings)
            reloader.on_status(lambda: server.set_config(ConfigInfo.of(reloader.status)))
            server.config = ConfigInfo.of(reloader.status)
        await server.run(stop)
    finally:
        publisher.close()


def run(settings: Settings) -> int:
    return run_service("plugin-server", watched("plugin-server", main), settings)


if __name__ == "__main__":
    sys.exit(service_entry("plugin-server", run, sys.argv[1:]))
