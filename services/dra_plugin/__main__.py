"""dra-plugin: wiring only. Off unless DRA_ENABLED is true: it then says so and exits 0 before importing
gRPC or the Kubernetes client, and supervisord leaves it alone (as kube-agent and feature-labels).

On, it needs NODE_NAME (the pool of its devices, and the claims the kubelet prepares are this node's):
without it, it is refused at start (exit 78, named), as the kube-agent's node health is."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import TYPE_CHECKING

from common.logs import configure_logging
from common.settings import Settings

if TYPE_CHECKING:
    import asyncio

SERVICE = "dra-plugin"
NODE_NAME = "NODE_NAME"
_NODE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# A config reload changes nothing in a running dra-plugin; what its CDI specs are made from applies at its
# next start (named in a warning).
LIVE: frozenset[str] = frozenset()
RESTART = frozenset({"driver_root", "dev_root", "container_driver_root", "cdi_hook_path"})

log = logging.getLogger(__name__)


async def main(settings: Settings, stop: asyncio.Event) -> None:
    from common.bus.messages import DRA_SOCKET, HEALTH_SOCKET
    from common.bus.sockets import BusPublisher
    from common.lifecycle import PermanentError, ensure_private_dir
    from common.reload import Reloader
    from services.dra_plugin.plugin import DraPlugin

    node = os.environ.get(NODE_NAME, "")
    if not _NODE.fullmatch(node):
        raise PermanentError(f"{SERVICE}: DRA_ENABLED needs {NODE_NAME}, this node's name (the pool of its devices): "
                             f"{'it is not set' if not node else f'{node[:80]!r} is not a node name'}; set it from "
                             "the pod's spec.nodeName (the chart does)")
    reloader = Reloader.current()
    if reloader is not None:
        async def nothing_live(_new: Settings) -> None:
            pass

        reloader.serve(LIVE, RESTART, nothing_live)
    # The client logs every request at info: a line per claim read is the plugin's own to write.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(DRA_SOCKET), heartbeat_s=settings.heartbeat_s)
    try:
        await DraPlugin(settings, node, publisher, settings.bus_path(HEALTH_SOCKET)).run(stop)
    finally:
        publisher.close()


def run(settings: Settings) -> int:
    if not settings.dra_enabled:
        configure_logging(SERVICE, settings.log_level)  # without the services' machinery (asyncio, gRPC, the bus)
        log.info("nothing to do: DRA is off (DRA_ENABLED is not true)")
        return 0
    from common.lifecycle import run_service
    from common.watchdog import watched

    return run_service(SERVICE, watched(SERVICE, main), settings)


if __name__ == "__main__":
    from common.lifecycle import service_entry

    sys.exit(service_entry(SERVICE, run, sys.argv[1:]))
