"""mps-control: wiring only.

Without sharing.mps it exits 0 at once, and supervisord (exitcodes=0, autorestart=unexpected)
leaves it exited: a node without MPS pays one interpreter start, not a resident process.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from common.bus.messages import HEALTH_SOCKET, MPS_SOCKET
from common.bus.sockets import BusPublisher
from common.lifecycle import ensure_private_dir, run_service, service_entry
from common.settings import Settings
from common.watchdog import watched
from services.mps_control.control import MpsControl

log = logging.getLogger(__name__)


async def main(settings: Settings, stop: asyncio.Event) -> None:
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(MPS_SOCKET))
    try:
        await MpsControl(settings, publisher, settings.bus_path(HEALTH_SOCKET)).run(stop)
    finally:
        publisher.close()


def run(settings: Settings) -> int:
    if settings.sharing.mps is None:
        # Before the watchdog and the bus: nothing to run, nothing to hold memory for.
        print("gpu-plugin mps-control: sharing.mps is not configured: nothing to do", file=sys.stderr, flush=True)
        return 0
    return run_service("mps-control", watched("mps-control", main), settings)


if __name__ == "__main__":
    sys.exit(service_entry("mps-control", run, sys.argv[1:]))
