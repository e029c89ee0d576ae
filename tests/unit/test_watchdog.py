"""The in-process watchdog's alive file, which `gpu-plugin status` and the liveness probe read."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from common.heartbeat import alive_path, loop_answered, read_heartbeat
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


def test_a_loop_that_proves_itself_by_its_own_work_is_not_pinged_and_one_that_stops_is(tmp_path: Path) -> None:
    """The bus heartbeat calls loop_answered on the loop: the watchdog then sends no ping of its own
    (it would only wake the loop once more), and keeps the alive file fresh; once nothing answers,
    the pings are back."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with Watchdog("registrar", tmp_path, limit=1.5) as dog:  # checks every 0.5 s
            pings: list[float] = []
            pong = dog._pong

            def counted() -> None:
                pings.append(time.monotonic())
                pong()

            dog._pong = counted  # type: ignore[method-assign]
            first = None
            # Answering by its own work ~10 times a check: no ping over ~5 checks, the file still touched.
            for _ in range(50):
                loop_answered()
                await asyncio.sleep(0.05)
                beat = read_heartbeat(tmp_path, "registrar")
                first = first or beat
            assert beat is not None and first is not None and beat[1] > first[1], "the alive file kept fresh"
            pinged_while_answering = len(pings)
            await loop.run_in_executor(None, wait_until, lambda: len(pings) > pinged_while_answering, 5.0,
                                       "a ping once the loop's own answers stopped")
        assert pinged_while_answering <= 1  # at most the one sent before the first answer was seen

    asyncio.run(run())
