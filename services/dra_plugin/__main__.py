"""dra-plugin: wiring only. Off unless DRA_ENABLED is true: it then says so and exits 0 before importing
gRPC or the Kubernetes client, and supervisord leaves it alone (as kube-agent and feature-labels). On, it
runs both halves of the DRA driver: the kubelet plugin (plugin.py) and the node's ResourceSlices
(slices.py), both from the health bus (one subscriber: the plugin's, which hands each message to the slices
writer too), one state on its own bus.

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

    from common.bus.messages import DraSlices
    from services.dra_plugin.slices import SliceStatus

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
    from services.dra_plugin.kubelet_devices import KubeletAllocations
    from services.dra_plugin.plugin import DraPlugin
    from services.dra_plugin.slices import SlicePublisher

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
        # Read before the first pool is built: a GPU a device-plugin pod holds is never published, even briefly.
        kubelet = KubeletAllocations(settings.device_plugin_dir)
        kubelet.read()
        plugin = DraPlugin(settings, node, publisher, settings.bus_path(HEALTH_SOCKET), kubelet=kubelet)
        # DRA's other half, in the same program: the node's ResourceSlices from the same bus and DRA_DEVICES. One
        # subscriber for both: the plugin follows the bus and hands each message to the slices writer too.
        slices = SlicePublisher(node, None, settings.dra_devices,
                                on_status=lambda status: plugin.slices_changed(_bus_form(status)),
                                kubelet_ids=lambda: kubelet.ids)

        async def held_changed() -> None:
            slices.wake()

        await plugin.run(stop, ("dra-slices", slices.run()), ("kubelet-devices", kubelet.run(held_changed)),
                         health_to=slices.heard)
    finally:
        publisher.close()


def _bus_form(status: SliceStatus) -> DraSlices:
    from common.bus.messages import DraSlices

    return DraSlices(api_version=status.api_version, taints=status.taints, published=status.published,
                     generation=status.generation, slices=status.slices, devices=status.devices,
                     tainted=status.tainted, left_out=list(status.left_out), writes=status.writes,
                     deleted_behind=status.deleted_behind, error=status.error)


def run(settings: Settings) -> int:
    if not settings.dra_enabled:
        configure_logging(SERVICE, settings.log_level)  # without the services' machinery (asyncio, gRPC, the bus)
        log.info("nothing to do: DRA is off (DRA_ENABLED is not true)")
        return 0
    from common.lifecycle import run_service
    from common.restarts import paced
    from common.watchdog import watched

    return run_service(SERVICE, watched(SERVICE, paced(SERVICE, main)), settings)


if __name__ == "__main__":
    from common.lifecycle import service_entry

    sys.exit(service_entry(SERVICE, run, sys.argv[1:]))
