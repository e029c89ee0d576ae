"""The session-wide leak check: a test run leaves no process behind.

Why: a process that leaves its parent's tree survives every fixture that kills what it spawned.
A daemon that double-forks into a session of its own (`nvidia-cuda-mps-control -d`, and its
fake in devtools/fake_mps) is reparented to init once the service that started it is killed;
seven simulated MPS daemons outlived one `make test`. Parent and child bookkeeping cannot find
such processes; their environment can: at session start the controller (the only pytest process
without xdist, the one that starts the workers with it) puts a fresh run ID in os.environ, every
process of the run inherits it (workers, services, the daemons they start), and at session
finish, once the workers are gone, the controller looks in /proc/*/environ for live processes
that carry it. Those still there after GRACE_S are reported with the test that started them
(PYTEST_CURRENT_TEST, inherited too), killed, and the run fails.

The check cannot go blind without failing the run: it finds a canary process of its own first
(a /proc it cannot read fails the run), and a test that removes or changes the run ID in
os.environ (after which what it starts is not tracked) fails in its teardown.

Blind spot: a process started with an environment built from nothing (not from os.environ).

tests/conftest.py imports the hooks; `pytest -p tests.leakcheck` loads them anywhere else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Generator

import pytest

MARKER = "GPU_PLUGIN_TEST_RUN"
GRACE_S = 3.0  # a daemon that notices its test's directory is gone exits within a fraction of this
CANARY_S = 5.0  # for the canary's environment to be readable
_RUN_ID = pytest.StashKey[str]()


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _environ(pid: int) -> list[bytes] | None:
    """The environment `pid` was started with; None when it is gone or not ours to read (another
    user's process, never one of ours). A zombie's is empty: it holds nothing and is not reported."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None


def _carries(pid: int, run_id: str) -> bool:
    return f"{MARKER}={run_id}".encode() in (_environ(pid) or [])


def carriers(run_id: str) -> dict[int, tuple[str, str]]:
    """Live processes whose environment carries `run_id`: pid -> (command line, test that started it)."""
    needle = f"{MARKER}={run_id}".encode()
    found: dict[int, tuple[str, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        env = _environ(pid)
        if env is None or needle not in env:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        test = next((v.split(b"=", 1)[1].decode(errors="replace") for v in env
                     if v.startswith(b"PYTEST_CURRENT_TEST=")), "outside any test")
        found[pid] = (cmdline, test)
    return found


def _kill(pid: int, run_id: str) -> None:
    """SIGKILLs `pid` only while it is the process that carries `run_id`: the pidfd, opened before the
    check, pins the process, so a pid reused meanwhile is not hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _carries(pid, run_id):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def leaks(run_id: str) -> list[str]:
    """What is wrong at session finish, in words; [] when nothing of the run is left."""
    problems: list[str] = []
    if os.environ.get(MARKER) != run_id:
        problems.append(f"{MARKER} was removed or changed in the controller's os.environ: processes started "
                        "since were not tracked")
    canary = subprocess.Popen(["sleep", "60"], env={**os.environ, MARKER: run_id})
    try:
        # Popen returns once the child's exec closed its error pipe, which the kernel does before
        # it lays out the new program's environment: /proc/<pid>/environ can still read empty for
        # a moment (seen once in a loaded full run). The canary is looked for until a deadline.
        deadline = time.monotonic() + CANARY_S
        while not _carries(canary.pid, run_id) and time.monotonic() < deadline:
            time.sleep(0.01)  # polling /proc: there is nothing to wait on
        found = carriers(run_id)
    finally:
        canary.kill()
        canary.wait()
    if canary.pid not in found:
        problems.append("the leak check cannot see the processes of this run (/proc/<pid>/environ of its own "
                        "canary process was not readable): it would miss every leak")
    found.pop(canary.pid, None)
    deadline = time.monotonic() + GRACE_S
    while found and time.monotonic() < deadline:
        time.sleep(0.05)  # not our children: nothing to wait on
        found = {pid: what for pid, what in found.items() if _carries(pid, run_id)}
    if found:
        problems.append(f"{len(found)} process(es) outlived the test run (killed now):")
        for pid, (cmdline, test) in sorted(found.items()):
            problems.append(f"  pid {pid}: {cmdline}  [started during {test}]")
            _kill(pid, run_id)
    return problems


def pytest_configure(config: pytest.Config) -> None:
    if _is_worker(config):
        # Inherited from the controller: kept to check that no test removes it.
        if not os.environ.get(MARKER):
            raise pytest.UsageError(f"leak check: this xdist worker did not inherit {MARKER} from the controller")
        config.stash[_RUN_ID] = os.environ[MARKER]
        return
    run_id = uuid.uuid4().hex
    os.environ[MARKER] = run_id  # before pytest_sessionstart, where xdist starts the workers
    config.stash[_RUN_ID] = run_id


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    # trylast: after the fixtures' own teardown (monkeypatch restores the environment there).
    run_id = item.config.stash.get(_RUN_ID, "")
    if os.environ.get(MARKER) != run_id:
        os.environ[MARKER] = run_id
        raise AssertionError(f"the test removed or changed {MARKER} in os.environ: the processes it started "
                             "since are not leak-checked (restore the environment, e.g. with monkeypatch)")


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, object, object]:
    # A wrapper: its part after the yield runs once every plain implementation has, xdist's
    # (which ends the workers) and the session fixtures' teardown included.
    result = yield
    config = session.config
    if _is_worker(config):
        return result
    problems = leaks(config.stash[_RUN_ID])
    if problems:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write("\n")  # the progress line is not ended yet
            reporter.write_sep("=", "leak check: FAILED", red=True)
            for line in problems:
                reporter.write_line(line)
        else:
            print("leak check: FAILED", *problems, sep="\n", flush=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
