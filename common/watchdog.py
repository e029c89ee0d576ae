"""The in-process liveness watchdog: a component whose loop stopped (hung, not dead) exits.

Why: supervisord restarts a component that dies, but one that hangs (an NVML call that never
returns on a fallen GPU, a blocking call on the loop) keeps its process and stops its bus
heartbeat for good. A separate watchdog process would cost ~15 MB on every node; a thread in
each process costs next to nothing and knows where its loop is stuck.

How: every CHECK_S the thread hands the asyncio loop a callback and checks that the previous
one ran (no callback when the loop proved itself since the last check by work it does anyway:
the bus heartbeat calls common.heartbeat.loop_answered). When one has waited `limit` seconds
(GPU_PLUGIN_WATCHDOG_TIMEOUT, default 30 s) the loop is stuck: the thread writes one line
naming the task and code the loop is stuck in (and whatever the service adds, e.g. NVML calls
in flight), then exits with EXIT_HUNG so that supervisord restarts this component alone. Extra
`stuck` sources name operations of other threads that must not block for that long (the
monitor's event thread).

Every answered check also sets the mtime of `<run dir>/<service>.alive` (content: the pid and
the limit) to the time the loop last answered: the DaemonSet's liveness probe (sh, no Python),
`gpu-plugin status` and gpu-plugin-supervisord read it. A Python thread cannot help if something
holds the GIL for good; faulthandler's C thread, re-armed at every check, then dumps every thread
and exits. Nothing in the process helps when the whole process stops (SIGSTOP, a cgroup freeze, a
page fault that never completes): the thread stops with it. gpu-plugin-supervisord then sees the
file stop changing and kills the process after `silence_limit(limit)` (services/supervisord.py).

30 s: everything the services run on their loops takes milliseconds, except NVML init and
discovery at the health-monitor's start, which take a few seconds on an 8-GPU node.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from common.heartbeat import DEFAULT_LIMIT_S, alive_path, check_interval, loop_answered_at
from common.lifecycle import ServiceMain
from common.settings import Settings

EXIT_HUNG = 3  # distinct from 1 (a failure) and 78 (a permanent one) in the container log

Stuck = Callable[[], list[tuple[str, float]]]  # (what, monotonic start) of operations in progress


class Watchdog:
    def __init__(self, service: str, run_dir: Path, limit: float = DEFAULT_LIMIT_S,
                 stuck: Stuck | None = None, describe: Callable[[], list[str]] | None = None) -> None:
        self._service = service
        self._alive = alive_path(run_dir, service)
        self._pid_written = False  # a watchdog that exited (os._exit) left its predecessor's pid there
        self._limit = limit
        self._check = check_interval(limit)
        self._stuck = stuck
        self._describe = describe
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._sent: float | None = None  # monotonic time of the ping not yet answered
        self._answered = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(1.0)  # wakes at once; after it, nothing re-arms the backstop
        faulthandler.cancel_dump_traceback_later()
        self._alive.unlink(missing_ok=True)

    def _pong(self) -> None:
        self._answered = time.monotonic()
        self._sent = None

    def _run(self) -> None:
        seen = loop_answered_at()  # the loop's own last answer (the bus heartbeat) at the previous check
        while not self._stop.wait(self._check):
            now = time.monotonic()
            # The GIL-proof backstop, a little later than our own verdict. Re-armed at every check (each
            # arming starts a thread): armed less often it would fire after the supervisor's kill of a
            # process gone silent, whose log line then says "stopped" and no thread's stack is dumped.
            faulthandler.dump_traceback_later(self._limit + 2 * self._check, exit=True)
            problems = []
            if self._sent is None:
                answered = loop_answered_at()
                own = answered is not None and answered != seen and now - answered < self._check
                seen = answered
                if own and answered is not None and answered > self._answered:
                    self._answered = answered
                self._touch(time.time() - (now - self._answered))
                # No ping when the loop answered since the last check by work of its own (the bus
                # heartbeat, common.heartbeat.loop_answered): a ping would only wake it once more. A loop
                # that hangs after that answer is pinged at the next check, so a hang is still seen
                # within the same limit + 2 checks. Our own pong is no such answer: a late one (a busy
                # loop) must not skip the next ping, or the alive file would age by two checks at a time.
                if not own:
                    self._sent = now
                    try:
                        self._loop.call_soon_threadsafe(self._pong)
                    except RuntimeError:
                        return  # the loop is closed: the service is ending
            elif now - self._sent >= self._limit:
                problems.append(f"event loop unresponsive for {now - self._sent:.0f} s ({self._where()})")
            if self._stuck is not None:
                with contextlib.suppress(Exception):
                    problems += [f"{what} blocked for {now - since:.0f} s" for what, since in self._stuck()
                                 if now - since >= self._limit]
            if problems:
                self._fire(problems)

    def _where(self) -> str:
        """The task and the innermost frames the loop thread is in."""
        task = None
        with contextlib.suppress(Exception):
            task = asyncio.current_task(self._loop)
        frame = sys._current_frames().get(self._loop_thread)
        frames = traceback.extract_stack(frame)[-4:] if frame is not None else []
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        return f"task {task.get_name() if task else 'none'}, in {where or 'unknown code'}"

    def _fire(self, problems: list[str]) -> None:
        extra: list[str] = []
        if self._describe is not None:
            with contextlib.suppress(Exception):
                extra = self._describe()
        message = "; ".join(problems + extra)
        # os.write, not logging: the stuck thread may hold the logging lock (a full stderr pipe).
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        line = (f"{stamp},000 {self._service}[{os.getpid()}] CRITICAL {__name__}: hung: {message}; "
                f"exiting {EXIT_HUNG} so that supervisord restarts {self._service}\n")
        with contextlib.suppress(OSError):
            os.write(2, line.encode(errors="replace"))
        os._exit(EXIT_HUNG)

    def _touch(self, when: float) -> None:
        try:
            if self._pid_written:
                os.utime(self._alive, (when, when))
                return
            raise FileNotFoundError  # this process's first touch: write its own pid (a predecessor's may be there)
        except FileNotFoundError:
            try:
                fd = os.open(self._alive, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {self._limit:g}\n")
                os.utime(self._alive, (when, when))
                self._pid_written = True
            except OSError:
                pass  # the run dir is gone for now; the publisher re-creates it, the next check retries
        except OSError:
            pass


def watched(service: str, main: ServiceMain) -> ServiceMain:
    """A service's main run under a Watchdog (for services with nothing to add to its report)."""

    async def run(settings: Settings, stop: asyncio.Event) -> None:
        with Watchdog(service, settings.run_dir, settings.watchdog_timeout):
            await main(settings, stop)

    return run
