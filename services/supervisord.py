"""`gpu-plugin-supervisord`: supervisord itself, acting on what happens when it happens.

Stock supervisord polls with a 1 s timeout and acts in a fixed order within each turn: poll,
start due programs (transition), reap exited children, handle a signal. So it starts the
programs only after its first 1 s poll, restarts a program that died only after the poll that
follows the reap (up to 1 s with nothing to read), and sees SIGTERM only when the poll times
out (Python retries a poll that a signal interrupted). On every node that was ~1 s of each
cold start, ~1 s of every restart after a crash, and up to 3 s of every pod termination.

Two changes to its loop: the poll also watches a signal wakeup pipe (a SIGCHLD or SIGTERM
ends it at once), and after a turn that reaped a child or handled a signal, or on the first
turn, the next poll does not wait. Everything else, configuration and supervisorctl included,
is supervisord's own (pinned in requirements-image.txt).

And one duty: a frozen service is killed, so that supervisord restarts it. A service's own
watchdog thread (common.watchdog) ends a process whose loop hangs, but a process stopped whole
(SIGSTOP, a cgroup freeze, a page fault that never completes) stops that thread too, and
supervisord saw a live pid for ever: only the pod's liveness probe, 90 s later, ended it, with
every other service. Once a second the supervisor looks at each service's heartbeat file; one
unchanged for `silence_limit` of the service's watchdog limit (41 s with the default 30 s, timed
on the supervisor's monotonic clock, so a wall-clock step kills nothing) gets SIGKILL, which a
stopped process cannot ignore, and the restart that follows any unexpected exit. A process that
froze before its first heartbeat (e.g. at start) is timed from when the supervisor first saw it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor import supervisord
from supervisor.states import ProcessStates

from common.heartbeat import DEFAULT_LIMIT_S, SERVICES, read_heartbeat, silence_limit

HEARTBEAT_CHECK_S = 1.0


class Heartbeats:
    """Which running services have stopped beating (pure but for reading the files: testable)."""

    def __init__(self, run_dir: Path, default_limit: float = DEFAULT_LIMIT_S) -> None:
        self.run_dir = run_dir
        self.default_limit = default_limit  # before a process's first heartbeat names its own
        # program -> (pid, heartbeat last read, monotonic time it last changed)
        self._seen: dict[str, tuple[int, tuple[int, float, float] | None, float]] = {}

    def frozen(self, running: Mapping[str, int], now: float) -> list[tuple[str, int, float]]:
        """(program, pid, seconds silent) of each running program silent past its limit."""
        out = []
        for name in list(self._seen):
            if name not in running:
                del self._seen[name]
        for name, pid in running.items():
            beat = read_heartbeat(self.run_dir, name)
            seen = self._seen.get(name)
            if seen is None or seen[0] != pid or seen[1] != beat:
                self._seen[name] = (pid, beat, now)
                continue
            limit = beat[2] if beat is not None and beat[0] == pid else self.default_limit
            if now - seen[2] > silence_limit(limit):
                out.append((name, pid, now - seen[2]))
        return out


def _default_limit() -> float:
    raw = os.environ.get("GPU_PLUGIN_WATCHDOG_TIMEOUT")
    if not raw:
        return DEFAULT_LIMIT_S
    from common.settings.values import duration  # only where it is set: ~2 MB of supervisord's memory

    try:
        return duration(1.0)(raw, "GPU_PLUGIN_WATCHDOG_TIMEOUT")
    except ValueError:
        return DEFAULT_LIMIT_S  # the services refuse it themselves, naming it (exit 78)


class PromptSupervisor(supervisord.Supervisor):  # type: ignore[misc]
    due = True  # the next poll returns at once: the first turn starts the programs
    heartbeats: Heartbeats | None = None
    _next_heartbeat_check = 0.0

    def check_heartbeats(self) -> None:
        now = time.monotonic()
        if self.heartbeats is None or now < self._next_heartbeat_check:
            return
        self._next_heartbeat_check = now + HEARTBEAT_CHECK_S
        running = {p.config.name: p.pid for g in self.process_groups.values() for p in g.processes.values()
                   if p.config.name in SERVICES and p.pid and p.get_state() == ProcessStates.RUNNING}
        for name, pid, silent in self.heartbeats.frozen(running, now):
            self.options.logger.warn(
                f"{name} (pid {pid}) frozen: no heartbeat for {silent:.0f} s (its watchdog would have ended a "
                f"hung loop by now; the whole process is stopped); killing it so that it restarts")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # not supervisord's kill(): that is a stop, never restarted

    def reap(self, once: bool = False, recursionguard: int = 0) -> None:
        known = len(self.options.pidhistory)
        super().reap(once, recursionguard)
        if len(self.options.pidhistory) != known:
            self.due = True  # a child exited: restart it (or go on stopping) in the next turn

    def runforever(self) -> None:
        poller = self.options.poller
        plain_poll, plain_get_signal = poller.poll, self.options.get_signal
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

        def prompt_poll(timeout: float) -> tuple[list[int], list[int]]:
            poller.register_readable(wake_r)
            if self.due:
                self.due, timeout = False, 0
            readable, writable = plain_poll(timeout)
            self.check_heartbeats()
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                readable = [fd for fd in readable if fd != wake_r]
            return readable, writable

        def get_signal() -> int | None:
            sig: int | None = plain_get_signal()
            if sig is not None:
                self.due = True  # e.g. SIGTERM: the stop begins in the next turn, not a second later
            return sig

        poller.poll, self.options.get_signal = prompt_poll, get_signal
        try:
            super().runforever()
        finally:
            poller.poll, self.options.get_signal = plain_poll, plain_get_signal
            with contextlib.suppress(KeyError, OSError):
                poller.unregister_readable(wake_r)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)


def main(args: Any = None) -> None:
    run_dir = os.environ.get("GPU_PLUGIN_RUN_DIR")
    if run_dir:
        PromptSupervisor.heartbeats = Heartbeats(Path(run_dir), _default_limit())
    supervisord.Supervisor = PromptSupervisor  # supervisord.go() makes its Supervisor by this name
    supervisord.main(args)
