"""registrar: wiring only."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from common.bus.messages import PLUGIN_SOCKET, REGISTRAR_SOCKET
from common.bus.sockets import BusPublisher
from common.lifecycle import check_dir_can_exist, ensure_private_dir, run_service, service_entry
from common.reload import Reloader
from common.settings import Settings
from common.watchdog import watched
from services.registrar.registrar import Registrar

log = logging.getLogger(__name__)


async def _nothing_live(_: Settings) -> None:
    pass


async def main(settings: Settings, stop: asyncio.Event) -> None:
    ensure_private_dir(settings.run_dir)
    reloader = Reloader.current()
    if reloader is not None:
        # The registrar only follows the plugin-server's endpoints, which a reload changes; of the
        # file it uses only the kubelet socket, which it cannot change while running.
        reloader.serve(frozenset(), frozenset({"kubelet_socket"}), _nothing_live)
    if not settings.kubelet_socket:
        log.info('kubelet socket is "": not registering with the kubelet')
        await stop.wait()
        return
    check_dir_can_exist(Path(settings.kubelet_socket).parent, "kubelet socket's directory")
    publisher = BusPublisher(settings.bus_path(REGISTRAR_SOCKET), heartbeat_s=settings.heartbeat_s)
    try:
        await Registrar(Path(settings.kubelet_socket), publisher, settings.bus_path(PLUGIN_SOCKET),
                        settings.stream_lost_grace).run(stop)
    finally:
        publisher.close()


def run(settings: Settings) -> int:
    return run_service("registrar", watched("registrar", main), settings)


if __name__ == "__main__":
    sys.exit(service_entry("registrar", run, sys.argv[1:]))
