"""health-monitor: wiring only (settings -> backend -> HealthMonitor)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Coroutine
from typing import Any

from common.bus.messages import HEALTH_SOCKET, ConfigInfo
from common.bus.sockets import BusPublisher
from common.cordons import CordonStore
from common.lifecycle import ensure_private_dir, run_service, service_entry
from common.nvml.backend import NvmlError
from common.nvml.factory import make_backend
from common.reload import Reloader
from common.settings import Settings
from common.watchdog import Watchdog
from services.health_monitor.model import RecoveryPolicy
from services.health_monitor.monitor import HealthMonitor
from services.health_monitor.remembered import GpuMemory
from services.health_monitor.xid_policy import policy_for

# What a config reload changes in a running health-monitor, and what it uses but cannot change.
LIVE = frozenset({"probe_interval", "recovery_policy", "quiet_period", "fatal_xids", "ignored_xids",
                  "monitor_only_xids", "ecc_single_bit", "ecc_double_bit"})
RESTART = frozenset({"fail_on_init_error", "driver_root", "container_driver_root",
                     "device_discovery_strategy"})
_tasks: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)  # held until done: the loop keeps only weak references
    task.add_done_callback(_tasks.discard)


def recovery_of(settings: Settings) -> RecoveryPolicy:
    return RecoveryPolicy(settings.recovery_policy, settings.probe_interval, settings.quiet_period)


async def main(settings: Settings, stop: asyncio.Event) -> None:
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(HEALTH_SOCKET), heartbeat_s=settings.heartbeat_s)
    backend = make_backend(settings)
    monitor: HealthMonitor | None = None
    try:
        monitor = HealthMonitor(
            backend,
            publisher,
            policy_for(settings),
            fail_on_init_error=settings.fail_on_init_error,
            recovery=recovery_of(settings),
            health=settings.health,
            cordons=CordonStore(settings.state_dir),
            probe_deadline=settings.probe_deadline,
            watchdog_limit=settings.watchdog_timeout,
            memory=GpuMemory(settings.state_dir),
        )
        reloader = Reloader.current()
        if reloader is not None:
            async def apply(new: Settings) -> None:
                await monitor.apply_policy(policy_for(new), recovery_of(new), new.health)

            reloader.serve(LIVE, RESTART, apply)
            reloader.on_status(lambda: _spawn(monitor.set_config(ConfigInfo.of(reloader.status))))
            monitor.config = ConfigInfo.of(reloader.status)
        with Watchdog("health-monitor", settings.run_dir, settings.watchdog_timeout, stuck=monitor.stuck_calls,
                      describe=monitor.hung_probes):
            await monitor.run(stop)
    finally:
        if monitor is None or not monitor.nvml_busy or backend.shutdown_under_wait_safe:
            with contextlib.suppress(NvmlError):
                backend.shutdown()
        publisher.close()


def run(settings: Settings) -> int:
    return run_service("health-monitor", main, settings)


if __name__ == "__main__":
    sys.exit(service_entry("health-monitor", run, sys.argv[1:]))
