"""`gpu-plugin-supervisord`: supervisord itself, acting on what happens when it happens.

Stock supervisord polls with a 1 s timeout and acts in a fixed order within each turn: poll,
start due programs (transition), reap exited children, handle a signal. So it starts the
programs only after its first 1 s poll, restarts a program that died only after the poll that
follows the reap (up to 1 s with nothing to read), and sees SIGTERM only when the poll times
out (Python retries a poll that a signal interrupted). On every node that was ~1 s of each
cold start, ~1 s of every restart after a crash, and up to 3 s of every pod termination.

Three changes to its loop: the poll also watches a signal wakeup pipe (a SIGCHLD or SIGTERM
ends it at once); after a turn that reaped a child, handled a signal or changed a program's
state, or on the first turn, the next poll does not wait; and with nothing timed in progress
(`quiet_timeout`) the poll waits for something to happen instead of turning every second, so
that an idle pod's supervisor wakes once per heartbeat check, not once a second. Everything
else, configuration and supervisorctl included, is supervisord's own (pinned in
requirements-image.txt).

And one duty: a frozen service is killed, so that supervisord restarts it. A service's own
watchdog thread (common.watchdog) ends a process whose loop hangs, but a process stopped whole
(SIGSTOP, a cgroup freeze, a page fault that never completes) stops that thread too, and
supervisord saw a live pid for ever: only the pod's liveness probe, 90 s later, ended it, with
every other service. As often as a service's watchdog touches it (every 5 s with the default 30 s
limit) the supervisor looks at each service's heartbeat file; one unchanged for `silence_limit` of
the service's watchdog limit (41 s with the default 30 s, timed on the supervisor's monotonic
clock, so a wall-clock step kills nothing) gets SIGKILL, which a
stopped process cannot ignore, and the restart that follows any unexpected exit. A process that
froze before its first heartbeat (e.g. at start) is timed from when the supervisor first saw it.

And one saving: our services are forked from the supervisor, not executed. Every service was its
own interpreter importing asyncio, grpc, ZeroMQ, msgpack, protobuf and our code again: ~20-25 MB
private each, most of it the same pages. The supervisor imports what they share (PRELOAD) once,
freezes those objects out of the garbage collector (gc.freeze: a collection in a child would
write to every object's header and copy the page), and where supervisord would exec
`gpu-plugin <service>` the forked child runs that service in place (`_run_in_place`): its own pid,
started, stopped, restarted alone and shown by supervisorctl as before, with the imported pages
shared copy-on-write. Anything else a program names (sh, a tool that is not ours) is executed.

What must never be imported (or done) in the supervisor before a fork: anything that starts a
thread (a thread does not survive fork(), and a lock it held stays held in the child), opens a
socket or a file descriptor a child would inherit, creates a ZeroMQ context, a gRPC channel or
server, or loads libnvidia-ml (nvmlInit). The modules in PRELOAD only define things at import;
`check_preloaded` verifies it where they are imported (one thread, no new descriptor) and a test
holds it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from supervisor import events, supervisord
from supervisor import options as supervisor_options
from supervisor.states import ProcessStates, SupervisorStates

from common.heartbeat import DEFAULT_LIMIT_S, SERVICES, check_interval, read_heartbeat, silence_limit

# A program in one of these is timed by supervisord (startsecs, the backoff delay, stopwaitsecs): its
# 1 s turn stays while one is.
TIMED_STATES = frozenset({ProcessStates.STARTING, ProcessStates.BACKOFF, ProcessStates.STOPPING})
QUIET_POLL_S = 60.0  # the longest a poll waits with nothing timed (supervisord's own is 1 s)
# What the services share, imported by the supervisor before it forks them (each service's own
# extras, such as the Kubernetes client of the kube-agent, are imported by the service itself).
# Each service's entry module (light: what a service needs beyond the shared libraries it imports
# in its own process, e.g. the kube-agent's and dra-plugin's Kubernetes client, measured to cost
# the pod more preloaded than imported by the one child that uses it).
PRELOAD = ("services.cli", *(f"services.{s.replace('-', '_')}.__main__" for s in SERVICES), "common.nvml.factory",
           "pynvml", "ctypes")
ENTRY = "gpu-plugin"  # the command whose services run in place of an exec
PR_SET_NAME = 15
# supervisord's own handlers: blocked from fork() until the child has reset them, so a stop signal
# sent to a child that has not yet become its service is neither run by supervisord's handler in the
# child (and lost) nor missed: it is delivered, with the default action, once unblocked.
FORK_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR2,
                          signal.SIGCHLD})
# What an interpreter reads at its start (or the dynamic loader at exec): a program whose environment
# changes one of them from the supervisor's is executed, so that it applies.
EXEC_ONLY_PREFIXES = ("PYTHON", "LD_")


class PreloadError(RuntimeError):
    """A module imported before the forks did what none may: started a thread or opened a descriptor."""


def _descriptors() -> set[int]:
    """The open descriptors (the listing's own, closed by the time it returns, left out)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.fstat(int(name))
            found.add(int(name))
    return found


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Imports `modules` (those missing are left to the services: they say why); returns those imported."""
    threads, fds = threading.active_count(), _descriptors()
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            # Not the supervisor's to end on: imported by the service itself, it fails there alone, saying why.
            print(f"gpu-plugin-supervisord: {name} not preloaded ({type(e).__name__}: {e}); the services "
                  "that need it import it themselves", file=sys.stderr)
            continue
        loaded.append(name)
    check_preloaded(threads, fds)
    gc.freeze()
    return loaded


def check_preloaded(threads: int, fds: set[int]) -> None:
    if threading.active_count() != threads or len(os.listdir("/proc/self/task")) != threads:
        raise PreloadError("a preloaded module started a thread: it would not survive the fork")
    opened = sorted(_descriptors() - fds)
    if opened:
        targets = []
        for fd in opened:
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                targets.append(f"descriptor {fd}")
        raise PreloadError(f"a preloaded module opened {', '.join(targets)}: every child would inherit it")
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        if "libnvidia-ml" in maps.read():  # loaded (nvmlInit or a dlopen): one driver handle for every child
            raise PreloadError("a preloaded module loaded libnvidia-ml: only the health-monitor may, after its fork")


def _set_title(argv: Sequence[str]) -> None:
    """`ps`, `top`, pgrep and our own checks (common.heartbeat.process_lives) name the service, not
    the supervisor it was forked from: the name (comm) set, the argument area rewritten in place
    as setproctitle does (its length cannot grow; what does not fit is cut)."""
    import ctypes

    name = os.path.basename(argv[1] if len(argv) > 1 else argv[0]).encode()[:15]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49 of stat
    except (OSError, IndexError, ValueError):
        return
    if end <= start:
        return
    text = b"\0".join(a.encode() for a in argv)[:end - start - 1]
    ctypes.memmove(start, text + b"\0" * (end - start - len(text)), end - start)


def _run_in_place(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """In the forked child, instead of exec: the service's command, then the process's end."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        time.tzset()  # a TZ of the program's own
        sys.argv = list(argv)
        _set_title(argv)
        from services.cli import main as command

        code = command(list(argv[1:]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # as an interpreter would: the traceback on stderr, exit 1
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


class ForkingOptions(supervisor_options.ServerOptions):  # type: ignore[misc]
    """supervisord's options, whose fork and exec start our services in place."""

    in_place = False  # set once PRELOAD is imported

    def fork(self) -> int:
        for stream in (sys.stdout, sys.stderr):  # a child must not write the parent's buffered output again
            with contextlib.suppress(Exception):
                stream.flush()
        gc.freeze()  # what the supervisor built since: out of the children's collections too
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_SIGNALS)
        pid: int = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return pid

    def execve(self, filename: str, argv: list[str], env: dict[str, str]) -> Any:
        # The child: supervisord's handlers and wakeup pipe go (an exec resets handlers too, but not the
        # mask, which it keeps), then the signals blocked at fork() are let in.
        signal.set_wakeup_fd(-1)
        for sig in FORK_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_SIGNALS)
        if self.in_place and self._in_place(filename, argv, env):
            _run_in_place(argv, env)
        return os.execve(filename, argv, env)

    @staticmethod
    def _in_place(filename: str, argv: list[str], env: Mapping[str, str]) -> bool:
        if os.path.basename(filename) != ENTRY or len(argv) < 2 or argv[1] not in SERVICES:
            return False
        return all(env.get(k) == os.environ.get(k) for k in {*env, *os.environ} if k.startswith(EXEC_ONLY_PREFIXES))


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
    _states: tuple[Any, ...] = ()

    def check_heartbeats(self) -> None:
        now = time.monotonic()
        if self.heartbeats is None or now < self._next_heartbeat_check:
            return
        # As often as a service's own watchdog touches its file: more often would read the same mtime.
        self._next_heartbeat_check = now + check_interval(self.heartbeats.default_limit)
        running = {p.config.name: p.pid for g in self.process_groups.values() for p in g.processes.values()
                   if p.config.name in SERVICES and p.pid and p.get_state() == ProcessStates.RUNNING}
        for name, pid, silent in self.heartbeats.frozen(running, now):
            self.options.logger.warn(
                f"{name} (pid {pid}) frozen: no heartbeat for {silent:.0f} s (its watchdog would have ended a "
                f"hung loop by now; the whole process is stopped); killing it so that it restarts")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # not supervisord's kill(): that is a stop, never restarted

    def quiet_timeout(self, timeout: float) -> float:
        """How long the next poll may wait with nothing to read.

        supervisord turns once a second for what it times: starts (startsecs), backoff delays,
        stops (stopwaitsecs), the pod's stop, TICK events for a listener of them. With none of
        these in progress, a turn would only find nothing to do: the poll then waits for a child,
        a signal (the wakeup pipe), a request, a log line or the next heartbeat check. A turn in
        which a program changed state is followed by one at once, so that the event it raised
        reaches the listeners (the watchdog: honest exits) without waiting for the next turn."""
        procs = [p for g in self.process_groups.values() for p in g.processes.values()]
        states = tuple(p.get_state() for p in procs)
        if states != self._states:
            self._states = states
            return 0
        if (self.options.mood < SupervisorStates.RUNNING or any(s in TIMED_STATES for s in states)
                or any(getattr(g, "event_buffer", None) for g in self.process_groups.values())
                or any(issubclass(kind, events.TickEvent) or issubclass(events.TickEvent, kind)
                       for kind, _ in events.callbacks)):  # TICK listeners, and listeners of every event
            return timeout
        if self.heartbeats is None:
            return QUIET_POLL_S
        return min(QUIET_POLL_S, max(0.0, self._next_heartbeat_check - time.monotonic()))

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
            else:
                timeout = self.quiet_timeout(timeout)
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
    preload()
    ForkingOptions.in_place = True
    supervisord.Supervisor = PromptSupervisor  # supervisord.go() makes its Supervisor by this name
    supervisord.ServerOptions = ForkingOptions  # and its options by this one
    supervisord.main(args)
