"""A service's heartbeat file, `<run dir>/<service>.alive`: written by its watchdog thread
(common.watchdog), read by the liveness probe (sh), `gpu-plugin status` and gpu-plugin-supervisord.

Its mtime is the time the service's loop last answered; its content is the pid and the watchdog
limit, so that a reader knows whose heartbeat it is and how long a silence means frozen. Light on
purpose (os only): supervisord imports it, and every import there is memory on every node.
"""

from __future__ import annotations

import time
from pathlib import Path

from common.files import read_bounded

DEFAULT_LIMIT_S = 30.0
CHECK_S = 5.0
# Every supervised Python program of ours: each runs under a watchdog that keeps a heartbeat file.
SERVICES = ("health-monitor", "plugin-server", "registrar", "mps-control", "kube-agent", "feature-labels",
            "dra-plugin")


_loop_answered: float | None = None  # monotonic time this process's event loop last ran `loop_answered`


def loop_answered() -> None:
    """Called on the service's event loop by periodic work it does anyway (the bus heartbeat): proof
    that the loop runs, so that the watchdog (common.watchdog) need not wake it with a ping of its own."""
    global _loop_answered
    _loop_answered = time.monotonic()


def loop_answered_at() -> float | None:
    return _loop_answered


def alive_path(run_dir: Path, service: str) -> Path:
    return run_dir / f"{service}.alive"


def check_interval(limit: float) -> float:
    return min(CHECK_S, limit / 3)


def silence_limit(limit: float) -> float:
    """How long a service's alive file may stay unchanged before its process is taken for frozen:
    past the point where its own watchdog would have ended a hung loop (a ping sent up to one check
    after the last answer, then `limit`, seen at the next check), so that a hung loop is still
    reported by the watchdog that knows where it is stuck."""
    return limit + 2 * check_interval(limit) + 1.0


def read_heartbeat(run_dir: Path, service: str) -> tuple[int, float, float] | None:
    """(pid, unix time the loop last answered, the service's watchdog limit), or None."""
    path = alive_path(run_dir, service)
    try:
        fields = read_bounded(path, 64, follow=False).split()
        st = path.lstat()
        pid = int(fields[0]) if fields else 0
        limit = float(fields[1]) if len(fields) > 1 else DEFAULT_LIMIT_S
    except (OSError, ValueError):
        return None
    return pid, st.st_mtime, limit


def process_lives(pid: int, service: str) -> bool:
    """Whether `pid` is a live process of `service` (a recycled pid running something else is not)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return service.encode() in cmdline
