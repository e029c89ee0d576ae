"""The kube-agent's backoff between crashes, kept by the process itself.

Why not supervisord's: the kube-agent exits 0 at once when none of its parts is on, and supervisord
counts any exit within `startsecs` as a failed start (BACKOFF, then FATAL after startretries) whatever
its code, so supervisord.conf gives it startsecs=0, and a crash is then restarted at once, forever:
a part that fails at its start (~0.1 s now that services are forked) would restart the process ten
times a second, a traceback each. A FATAL kube-agent is no better: the event listener in
supervisord.conf stops supervisord on any FATAL, and with it the node's plugin, for a part that is
optional.

So a process that fails within QUICK_S of its start pauses before it exits, the pause doubling from
PAUSE_MIN_S with each such failure in a row, up to PAUSE_MAX_S: the count survives the restart in a
small file in the run dir, and a failure continues it only when the previous one's exit came just
before this process started (else it is a first failure again). The node serves on meanwhile; the
failure is in the log at once, with the pause, and the kube bus says nothing while it lasts. A process
that ran QUICK_S or longer exits at once: a crash after a long run is not a loop.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Final

from common.files import read_bounded, replace_file

QUICK_S: Final = 60.0
PAUSE_MIN_S: Final = 1.0
PAUSE_MAX_S: Final = 60.0
# From one process's exit to the next one's start: supervisord's reap and restart and our start (about
# 0.1 s forked, a second or two executed). A record older than this before our start is another story.
RESTART_S: Final = 10.0
RECORD: Final = "kube-agent.failures"  # "<failures in a row> <unix time of the last one's exit>"


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


def read_record(run_dir: Path) -> tuple[int, float] | None:
    """The record of the failures before, or None (none, or unreadable: counted as none)."""
    try:
        count, at = read_bounded(run_dir / RECORD, 64, follow=False).decode().split()
        return int(count), float(at)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def write_record(run_dir: Path, count: int, at: float) -> None:
    with contextlib.suppress(OSError):  # without it the next failure pauses as a first one: no harm
        replace_file(run_dir / RECORD, f"{count} {at:.3f}\n".encode(), 0o600)
