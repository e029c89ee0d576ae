"""The optional programs' backoff between crashes, kept by each process itself (`paced`): the
kube-agent, feature-labels, the dra-plugin, mps-control.

Why not supervisord's: each exits 0 at once when it has nothing to do (the kube-agent when none of
its parts is on), and supervisord
counts any exit within `startsecs` as a failed start (BACKOFF, then FATAL after startretries) whatever
its code, so supervisord.conf gives it startsecs=0, and a crash is then restarted at once, forever:
a program that fails at its start (~0.1 s now that services are forked) would restart ten times a
second, a traceback each. A FATAL one is no better: the event listener in supervisord.conf stops
supervisord on any FATAL, and with it the node's plugin, for a program that is optional.

So a process that fails within QUICK_S of its start pauses before it exits, the pause doubling from
PAUSE_MIN_S with each such failure in a row, up to PAUSE_MAX_S: the count survives the restart in a
small file in the run dir, and a failure continues it only when the previous one's exit came just
before this process started (else it is a first failure again). The node serves on meanwhile; the
failure is in the log at once, with the pause, and the program's bus says nothing while it lasts. A
process that ran QUICK_S or longer exits at once: a crash after a long run is not a loop. A
PermanentError (a failure no restart fixes) is not paced: it ends the container at once, as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Final

from common.files import read_bounded, replace_file
from common.lifecycle import PermanentError, ServiceMain
from common.settings import Settings

log = logging.getLogger(__name__)

QUICK_S: Final = 60.0
PAUSE_MIN_S: Final = 1.0
PAUSE_MAX_S: Final = 60.0
# From one process's exit to the next one's start: supervisord's reap and restart and our start (about
# 0.1 s forked, a second or two executed). A record older than this before our start is another story.
RESTART_S: Final = 10.0
SUFFIX: Final = ".failures"  # <run dir>/<service>.failures: "<failures in a row> <unix time of the last one's exit>"


def pause_for(previous: tuple[int, float] | None, started: float, failed: float) -> tuple[int, float]:
    """(quick failures in a row, this one included: 0 for a failure after a long run; the pause before
    exiting) for a process started at unix time `started` that failed at `failed`, `previous` being the
    record of the failures before (their count, and the time the last one exited)."""
    if failed - started >= QUICK_S:
        return 0, 0.0
    count = 1
    if previous is not None and started - RESTART_S <= previous[1] <= started:
        count = previous[0] + 1
    return count, min(PAUSE_MIN_S * 2 ** min(count - 1, 16), PAUSE_MAX_S)


def read_record(run_dir: Path, service: str) -> tuple[int, float] | None:
    """The record of the failures before, or None (none, or unreadable: counted as none)."""
    try:
        count, at = read_bounded(run_dir / f"{service}{SUFFIX}", 64, follow=False).decode().split()
        return int(count), float(at)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def write_record(run_dir: Path, service: str, count: int, at: float) -> None:
    with contextlib.suppress(OSError):  # without it the next failure pauses as a first one: no harm
        replace_file(run_dir / f"{service}{SUFFIX}", f"{count} {at:.3f}\n".encode(), 0o600)


def paced(service: str, main: ServiceMain) -> ServiceMain:
    """`main`, whose failure soon after the start pauses (growing) before the process exits."""
    async def run(settings: Settings, stop: asyncio.Event) -> None:
        started = time.time()
        try:
            await main(settings, stop)
        except PermanentError:
            raise  # the container ends at once: no restart to pace
        except Exception as e:
            count, pause = pause_for(read_record(settings.run_dir, service), started, time.time())
            if pause:
                log.error("%s failed %.1f s after its start (quick failures in a row: %d): %s: %s; exiting in "
                          "%.0f s, then supervisord restarts it (the node serves on meanwhile)", service,
                          time.time() - started, count, type(e).__name__, e, pause)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):  # a pause, cut short by SIGTERM
                        await stop.wait()
            write_record(settings.run_dir, service, count, time.time())
            raise

    return run
