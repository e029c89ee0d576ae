"""The plugin-server's view of mps-control: which MPS daemons are ready (mps.state).

Why a separate subscription: the replicas' health depends on the daemon as much as on the GPU,
and mps-control is the only process that knows the daemons: it runs them, or, in NVIDIA's layout,
watches those of mps-control-daemon's pod, and reports them alike. A silent mps-control keeps the
last state (missing data is not a fault); its restart replays the state at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.bus.messages import MpsState
from common.bus.sockets import BusSubscriber
from services.plugin_server.device_table import MpsReadiness

log = logging.getLogger(__name__)


async def watch_mps(bus: Path, readiness: MpsReadiness, changed: Callable[[], Awaitable[None]]) -> None:
    """Keeps `readiness` current; awaits `changed()` after each report that changes it."""
    sub = BusSubscriber([bus], topics=[MpsState.TOPIC])
    try:
        while True:
            msg = await sub.recv_latest()
            if not isinstance(msg, MpsState):
                continue
            if readiness.update((d.resource, d.ready) for d in msg.daemons):
                for d in msg.daemons:
                    if d.ready:
                        log.info("MPS daemon for %s is ready", d.resource)
                    else:
                        log.warning("MPS daemon for %s is not ready (%s): its replicas are Unhealthy", d.resource,
                                    d.last_error or "starting")
                await changed()
    finally:
        sub.close()
