"""gpu-plugin-supervisord hooks three points of supervisord (pinned in requirements-image.txt).
If an upgrade renamed one, the hook would be silently skipped and every restart and stop would
be back to waiting for the 1 s poll: these tests fail first. What the hooks do is exercised by
the end-to-end tests, which run the stack through it."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from supervisor import events, options, poller, process, supervisord
from supervisor.states import ProcessStates, SupervisorStates

from services.supervisord import PRELOAD, QUIET_POLL_S, Heartbeats, PromptSupervisor
from tests.conftest import REPO


def test_the_hooked_supervisord_methods_exist_with_their_signatures() -> None:
    assert list(inspect.signature(supervisord.Supervisor.reap).parameters) == ["self", "once", "recursionguard"]
    assert list(inspect.signature(supervisord.Supervisor.runforever).parameters) == ["self"]
    assert list(inspect.signature(options.ServerOptions.get_signal).parameters) == ["self"]
    for cls in (poller.PollPoller, poller.SelectPoller):
        assert list(inspect.signature(cls.poll).parameters) == ["self", "timeout"]
        assert list(inspect.signature(cls.register_readable).parameters) == ["self", "fd"]
    # go() builds the Supervisor by its module-level name: what main() replaces.
    assert "Supervisor(options)" in inspect.getsource(supervisord.go)
    # The loop polls, then reaps and handles signals in the same turn: why a reap or a signal
    # makes the next poll return at once.
    loop = inspect.getsource(supervisord.Supervisor.runforever)
    assert loop.index("self.options.poller.poll(timeout)") < loop.index("self.reap()") < loop.index(
        "self.handle_signal()")


class Child:
    def finish(self, pid: int, sts: int) -> None:
        pass


class Options:
    """supervisord's options as reap() uses them: the live children by pid, and waitpid."""

    def __init__(self, *pids: int) -> None:
        self.pidhistory = {pid: Child() for pid in pids}

    def waitpid(self) -> tuple[int | None, int | None]:
        return (next(iter(self.pidhistory)), 0) if self.pidhistory else (None, None)


def test_a_reaped_child_makes_the_next_poll_immediate() -> None:
    sup = PromptSupervisor.__new__(PromptSupervisor)
    sup.options, sup.due = Options(10), False
    sup.reap()
    assert sup.due and sup.options.pidhistory == {}
    sup.due = False
    sup.reap()  # nothing exited
    assert not sup.due


class Program:
    def __init__(self, state: int) -> None:
        self.state = state

    def get_state(self) -> int:
        return self.state


class Group:
    def __init__(self, *programs: Program) -> None:
        self.processes = {str(i): p for i, p in enumerate(programs)}
        self.event_buffer: list[object] = []


def test_an_idle_supervisor_waits_for_something_to_happen_and_turns_each_second_while_something_is_timed() -> None:
    sup = PromptSupervisor.__new__(PromptSupervisor)
    a, b = Program(ProcessStates.RUNNING), Program(ProcessStates.RUNNING)
    group = Group(a, b)
    sup.options, sup.process_groups, sup.heartbeats = Options(), {"g": group}, None
    sup.options.mood = SupervisorStates.RUNNING
    assert sup.quiet_timeout(1) == 0  # first look: states "changed"
    assert sup.quiet_timeout(1) == QUIET_POLL_S  # all running, nothing timed: no turn per second
    for timed in (ProcessStates.STARTING, ProcessStates.BACKOFF, ProcessStates.STOPPING):
        b.state = timed
        assert sup.quiet_timeout(1) == 0, "a state change: one more turn at once, for the listeners"
        assert sup.quiet_timeout(1) == 1, f"{timed}: supervisord times it, its 1 s turn stays"
    b.state = ProcessStates.FATAL
    assert sup.quiet_timeout(1) == 0  # the event of that change reaches the watchdog listener now
    assert sup.quiet_timeout(1) == QUIET_POLL_S
    group.event_buffer.append(object())  # an event not yet taken by a busy listener
    assert sup.quiet_timeout(1) == 1
    group.event_buffer.clear()
    sup.options.mood = SupervisorStates.SHUTDOWN
    assert sup.quiet_timeout(1) == 1
    sup.options.mood = SupervisorStates.RUNNING
    for kind in (events.Tick5Event, events.Event):  # a listener of TICK events (or of all) needs the turns
        events.subscribe(kind, print)
        try:
            assert sup.quiet_timeout(1) == 1
        finally:
            events.unsubscribe(kind, print)
    sup.heartbeats = Heartbeats(Path("/nonexistent"), default_limit=30)
    sup._next_heartbeat_check = time.monotonic() + 2
    assert 1 < sup.quiet_timeout(1) <= 2  # until the next heartbeat check


def test_heartbeats_a_beating_service_is_never_frozen_and_a_silent_one_is_after_its_limit(tmp_path: Path) -> None:
    import os

    from common.heartbeat import alive_path, silence_limit
    from services.supervisord import Heartbeats

    beats = Heartbeats(tmp_path, default_limit=30)
    alive = alive_path(tmp_path, "plugin-server")
    alive.write_text("100 3\n")  # pid 100, its watchdog limit 3 s
    limit = silence_limit(3)
    assert beats.frozen({"plugin-server": 100}, now=0) == []
    for t in range(1, 100):  # the file changes at every check: never frozen, however long
        os.utime(alive, (t, t))
        assert beats.frozen({"plugin-server": 100}, now=t) == []
    assert beats.frozen({"plugin-server": 100}, now=99 + limit) == []
    assert beats.frozen({"plugin-server": 100}, now=99 + limit + 0.5) == [("plugin-server", 100, limit + 0.5)]


def test_heartbeats_a_process_silent_since_its_start_is_timed_with_the_default_limit(tmp_path: Path) -> None:
    from common.heartbeat import alive_path, silence_limit
    from services.supervisord import Heartbeats

    beats = Heartbeats(tmp_path, default_limit=10)
    alive_path(tmp_path, "registrar").write_text("7 2\n")  # its predecessor's heartbeat, with another limit
    assert beats.frozen({"registrar": 8, "kube-agent": 9}, now=0) == []
    late = silence_limit(10) + 1
    assert sorted(beats.frozen({"registrar": 8, "kube-agent": 9}, now=late)) == [
        ("kube-agent", 9, late), ("registrar", 8, late)]
    # A restarted process (a new pid) starts its own clock.
    assert beats.frozen({"registrar": 11}, now=late + 1) == []


def test_the_fork_hooks_exist_where_supervisord_forks_and_executes() -> None:
    assert list(inspect.signature(options.ServerOptions.fork).parameters) == ["self"]
    assert list(inspect.signature(options.ServerOptions.execve).parameters) == ["self", "filename", "argv", "env"]
    spawn = inspect.getsource(process.Subprocess.spawn)
    assert "options.fork()" in spawn
    assert "options.execve(filename, argv, env)" in inspect.getsource(process.Subprocess._spawn_as_child)
    # main() builds its options by this module-level name: what our main() replaces.
    assert "ServerOptions()" in inspect.getsource(supervisord.main)


def _preload(modules: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """preload() in a fresh interpreter, as the supervisor runs it before its first fork."""
    code = f"from services.supervisord import preload\nprint(','.join(preload({modules})))"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": f"{REPO}:{tmp_path}", "PATH": "/usr/bin:/bin"}, check=False)


def test_what_the_supervisor_imports_before_forking_starts_no_thread_and_opens_nothing(tmp_path: Path) -> None:
    done = _preload("", tmp_path)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.strip().split(",")
    for service in ("health_monitor", "plugin_server", "registrar"):
        assert f"services.{service}.__main__" in loaded
    assert set(loaded) <= set(PRELOAD)


@pytest.mark.parametrize(("body", "said"), [
    ("import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n",
     "started a thread"),
    ("import socket\nSOCK = socket.socket()\n", "opened socket:"),
    ("FILE = open(__file__)\n", "opened /"),
    ("import ctypes, os, shutil\n"
     "COPY = os.path.join(os.path.dirname(__file__), 'libnvidia-ml.so.1')\n"
     "shutil.copy('/usr/lib/x86_64-linux-gnu/libz.so.1', COPY)\n"
     "ctypes.CDLL(COPY)\n", "loaded libnvidia-ml"),
], ids=["thread", "socket", "file", "nvml"])
def test_a_module_that_would_break_a_fork_is_refused_at_preload(tmp_path: Path, body: str, said: str) -> None:
    (tmp_path / "unfit.py").write_text(body)
    done = _preload("('json', 'unfit')", tmp_path)
    assert done.returncode != 0 and "PreloadError" in done.stderr and said in done.stderr, done.stderr


def test_a_module_that_fails_to_import_is_left_to_its_service(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('no driver here')\n")
    done = _preload("('json', 'broken')", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "json" and "broken not preloaded (RuntimeError: no driver here)" in done.stderr


def test_a_program_whose_environment_changes_what_an_interpreter_reads_at_start_is_executed() -> None:
    from services.supervisord import ForkingOptions

    argv = ["gpu-plugin", "registrar"]
    env = dict(os.environ)
    assert ForkingOptions._in_place("/venv/bin/gpu-plugin", argv, env)
    assert not ForkingOptions._in_place("/venv/bin/gpu-plugin", argv, {**env, "PYTHONMALLOC": "malloc"})
    assert not ForkingOptions._in_place("/venv/bin/gpu-plugin", argv, {**env, "LD_PRELOAD": "/lib/x.so"})
    assert not ForkingOptions._in_place("/bin/sh", ["sh", "-c", "gpu-plugin registrar"], env)
    assert not ForkingOptions._in_place("/venv/bin/gpu-plugin", ["gpu-plugin", "status"], env)
