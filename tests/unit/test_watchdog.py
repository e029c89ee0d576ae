"""The in-process watchdog's alive file, which `gpu-plugin status` and the liveness probe read."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from common.heartbeat import alive_path, read_heartbeat
from common.watchdog import Watchdog
from tests.conftest import wait_until


def test_a_restarted_service_writes_its_own_pid_over_its_predecessors(tmp_path: Path) -> None:
    # A watchdog that fired left the file behind (os._exit): it names a dead process.
    alive_path(tmp_path, "health-monitor").write_text("999999\n")

    async def run() -> None:
        with Watchdog("health-monitor", tmp_path, limit=3.0):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, wait_until,
                                       lambda: (read_heartbeat(tmp_path, "health-monitor") or (0,))[0] == os.getpid(),
                                       10.0, "the alive file naming this process")

    asyncio.run(run())
