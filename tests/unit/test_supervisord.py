"""gpu-plugin-supervisord hooks three points of supervisord (pinned in requirements-image.txt).
If an upgrade renamed one, the hook would be silently skipped and every restart and stop would
be back to waiting for the 1 s poll: these tests fail first. What the hooks do is exercised by
the end-to-end tests, which run the stack through it."""

from __future__ import annotations

import inspect
from pathlib import Path

from supervisor import options, poller, supervisord

from services.supervisord import PromptSupervisor


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
