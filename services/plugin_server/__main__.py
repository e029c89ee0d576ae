"""plugin-server: wiring only."""

from __future__ import annotations

import asyncio
import sys

from common.bus.messages import HEALTH_SOCKET, PLUGIN_SOCKET
from common.bus.sockets import BusPublisher
from common.lifecycle import ensure_private_dir, run_service, service_entry
from common.settings import Settings
from common.watchdog import watched
from services.plugin_server.server import PluginServer


async def main(settings: Settings, stop: asyncio.Event) -> None:
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(PLUGIN_SOCKET))
    try:
        await PluginServer(settings, publisher, settings.bus_path(HEALTH_SOCKET)).run(stop)
    finally:
        publisher.close()


def run(settings: Settings) -> int:
    return run_service("plugin-server", watched("plugin-server", main), settings)


if __name__ == "__main__":
    sys.exit(service_entry("plugin-server", run, sys.argv[1:]))
