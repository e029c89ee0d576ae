"""mps-control: wiring only.

Without sharing.mps it exits 0 at once, and supervisord (exitcodes=0, autorestart=unexpected)
leaves it exited: a node without MPS pays one interpreter start, not a resident process.
That exit needs startsecs=0, and with it supervisord never gives up on a program that keeps
failing (no FATAL): so it counts its own quick failures, and the third in a row is permanent
(exit 78, the container ends), as FATAL is for the other programs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.settings import Settings

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

QUICK_EXIT_S = 10.0
MAX_QUICK_EXITS = 3


async def main(settings: Settings, stop: asyncio.Event) -> None:
    from common.bus.messages import HEALTH_SOCKET, MPS_SOCKET
    from common.bus.sockets import BusPublisher
    from common.lifecycle import ensure_private_dir
    from services.mps_control.control import MpsControl

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
    # Imported past that exit: a node without MPS starts an interpreter, reads its settings and
    # stops, beside the services starting at the same time on the same cores.
    from common.lifecycle import EX_CONFIG, exit_permanently, run_service
    from common.watchdog import watched

    started = time.monotonic()
    rc = run_service("mps-control", watched("mps-control", main), settings)
    count = settings.run_dir / "mps-control.quick-exits"
    if rc in (0, EX_CONFIG) or time.monotonic() - started >= QUICK_EXIT_S:
        count.unlink(missing_ok=True)
        return rc
    n = _bump(count)
    if n >= MAX_QUICK_EXITS:
        return exit_permanently("mps-control", f"failed {n} times in a row within {QUICK_EXIT_S:.0f} s of its start; "
                                               "its log above says why")
    return rc


def _bump(path: Path) -> int:
    try:
        n = int(path.read_text().strip() or 0) + 1
    except (OSError, ValueError):
        n = 1
    with contextlib.suppress(OSError):
        path.write_text(str(n))
    return n


if __name__ == "__main__":
    from common.lifecycle import service_entry

    sys.exit(service_entry("mps-control", run, sys.argv[1:]))
