"""mps-control: wiring only.

It runs the MPS control daemons (our chart's layout) or, where NVIDIA's mps-control-daemon runs
them in a pod of its own (GPU_PLUGIN_MPS_DAEMON=external, set by `nvidia-device-plugin`: see
common.mps), watches them; either way the plugin-server hears of them on the same bus.

Without sharing.mps it exits 0 at once, and supervisord (exitcodes=0, autorestart=unexpected)
leaves it exited: a node without MPS pays one interpreter start, not a resident process.
That exit needs startsecs=0, and with it supervisord never gives up on a program that keeps
failing (no FATAL): so it counts its own quick failures, and the third in a row is permanent
(exit 78, the container ends), as FATAL is for the other programs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.settings import Settings

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

QUICK_EXIT_S = 10.0
MAX_QUICK_EXITS = 3


def main_for(external: bool) -> Callable[[Settings, asyncio.Event], Awaitable[None]]:
    async def main(settings: Settings, stop: asyncio.Event) -> None:
        from common.bus.messages import HEALTH_SOCKET
        from services.mps_control.control import BusDevices
        from services.mps_control.service import serve

        await serve(settings, stop, BusDevices(settings.bus_path(HEALTH_SOCKET)), external)

    return main


def run(settings: Settings) -> int:
    if settings.sharing.mps is None:
        # Before the watchdog and the bus: nothing to run, nothing to hold memory for.
        print("gpu-plugin mps-control: sharing.mps is not configured: nothing to do", file=sys.stderr, flush=True)
        return 0
    # Imported past that exit: a node without MPS starts an interpreter, reads its settings and
    # stops, beside the services starting at the same time on the same cores.
    from common.lifecycle import EX_CONFIG, bad_setting, exit_permanently, run_service
    from common.mps import EXTERNAL, daemon_layout
    from common.settings import SettingsError
    from common.watchdog import watched

    try:
        external = daemon_layout(os.environ) == EXTERNAL
    except SettingsError as e:
        return bad_setting("mps-control", e)

    started = time.monotonic()
    rc = run_service("mps-control", watched("mps-control", main_for(external)), settings)
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
