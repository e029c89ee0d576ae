"""health-monitor: wiring only (settings -> backend -> HealthMonitor)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

from common.bus.messages import HEALTH_SOCKET
from common.bus.sockets import BusPublisher
from common.cordons import CordonStore
from common.lifecycle import ensure_private_dir, run_service, service_entry
from common.nvml.backend import NvmlError
from common.nvml.factory import make_backend
from common.settings import Settings
from common.watchdog import Watchdog
from services.health_monitor.metrics import start_metrics
from services.health_monitor.model import RecoveryPolicy
from services.health_monitor.monitor import HealthMonitor
from services.health_monitor.xid_policy import policy_for


async def main(settings: Settings, stop: asyncio.Event) -> None:
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(HEALTH_SOCKET))
    backend = make_backend(settings)
    degraded: list[str] = []
    try:
        monitor = HealthMonitor(
            backend,
            publisher,
            policy_for(settings),
            fail_on_init_error=settings.fail_on_init_error,
            recovery=RecoveryPolicy(settings.recovery_policy, settings.probe_interval, settings.quiet_period),
            health=settings.health,
            cordons=CordonStore(settings.state_dir),
            metrics=start_metrics(settings.metrics_port, degraded),
            degraded=degraded,
            probe_deadline=settings.probe_deadline,
        )
        with Watchdog("health-monitor", settings.run_dir, settings.watchdog_timeout, stuck=monitor.stuck_calls,
                      describe=monitor.hung_probes):
            await monitor.run(stop)
    finally:
        with contextlib.suppress(NvmlError):
            backend.shutdown()
        publisher.close()


def run(settings: Settings) -> int:
    return run_service("health-monitor", main, settings)


if __name__ == "__main__":
    sys.exit(service_entry("health-monitor", run, sys.argv[1:]))
