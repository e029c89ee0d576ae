"""Process lifecycle shared by every service: logging, signals, the run directory.

A service is an `async def main(settings, stop)` that returns when `stop` is set. SIGTERM
and SIGINT set it; a second signal exits at once. A service that fails raises, the
process exits non-zero and supervisord restarts it: no component tries to limp on with
state it cannot trust.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common.settings import Settings

log = logging.getLogger(__name__)

ServiceMain = Callable[[Settings, asyncio.Event], Awaitable[None]]


class FatalError(RuntimeError):
    """A failure whose message says everything: logged without a traceback, exit status 1."""


def configure_logging(service: str, level: str) -> None:
    """One line per record on stderr; supervisord forwards it to the container log."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def ensure_private_dir(path: Path) -> None:
    """Creates `path` (and parents) owner-only; tightens it if it already exists."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)


async def run_until_stopped(stop: asyncio.Event, *tasks: asyncio.Task[Any]) -> None:
    """Runs a service's eternal tasks until `stop` is set.

    A task that fails, or ends at all, stops the service with an error: supervisord then
    restarts the process, which is better than limping on without, say, its socket watcher.
    """
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is stopper:
                continue
            error = t.exception()
            if error is not None:
                raise error
            raise RuntimeError(f"task {t.get_name()} ended unexpectedly")
    finally:
        for t in (*tasks, stopper):
            t.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)


def run_service(name: str, main: ServiceMain, settings: Settings) -> int:
    configure_logging(name, settings.log_level)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s received: stopping", signal.Signals(signum).name)
            stop.set()

        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, on_signal, s)
        await main(settings, stop)

    try:
        asyncio.run(runner())
    except FatalError as e:
        log.error("%s cannot continue: %s", name, e)
        return 1
    except Exception:
        log.exception("%s failed", name)
        return 1
    log.info("%s stopped", name)
    return 0
