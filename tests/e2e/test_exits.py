"""End to end, under the real entry point (scripts/entrypoint.sh) and supervisord: how the
container ends. A SIGTERM stops everything together and exits 0; a failure a restart cannot
fix ends the container at once, non-zero, with the cause as the last line (a crash loop, FATAL:
test_stack.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from devtools.devstack import PROGRAMS, DevStack
from tests.conftest import wait_until
from tests.e2e.conftest import held

pytestmark = pytest.mark.e2e


def ended(s: DevStack, timeout: float = 60.0) -> tuple[int, str]:
    """Waits (no signal sent) for the entry point to exit; its status and the whole log."""
    assert s.supervisord is not None
    wait_until(lambda: s.supervisord is not None and s.supervisord.poll() is not None, timeout,
               f"the entry point exiting by itself\n{s.logs()}")
    return s.supervisord.returncode, (s.root / "supervisord.log").read_text(errors="replace")


def last_line(log: str) -> str:
    return log.rstrip("\n").rsplit("\n", 1)[-1]


@pytest.fixture
def make_stack() -> object:
    stacks: list[DevStack] = []

    def make(**kw: object) -> DevStack:
        s = DevStack(**kw)  # type: ignore[arg-type]
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.stop()
        s.cleanup()


def test_sigterm_stops_every_program_and_the_entry_point_exits_0(stack: DevStack) -> None:
    held(stack)
    code = stack.stop(timeout=30)
    log = (stack.root / "supervisord.log").read_text(errors="replace")
    assert code == 0, log
    for program in PROGRAMS:
        assert f"stopped: {program} (exit status 0)" in log or f"stopped: gpu-plugin:{program} (exit status 0)" in log
        assert f"{program}[" in log and "stopped" in log
    assert " ERROR " not in log and "Traceback" not in log, log
    # Stopped together: supervisord sent every program its SIGTERM before the first had exited.
    lines = log.splitlines()
    first_stopped = next(i for i, line in enumerate(lines) if "INFO stopped: " in line)
    assert sum("SIGTERM received: stopping" in line for line in lines[:first_stopped]) == len(PROGRAMS), log


def test_a_bad_setting_ends_the_container_at_once_with_the_cause_last(make_stack) -> None:  # type: ignore[no-untyped-def]
    s = make_stack(env={"MIG_STRATEGY": "bogus"})
    s.start()
    code, log = ended(s)
    assert code != 0, log
    assert "MIG_STRATEGY" in last_line(log) and "bogus" in last_line(log), log
    for program in PROGRAMS:  # no futile restart: each was started once
        assert log.count(f"spawned: '{program}'") == 1, log


def test_a_kubelet_socket_below_a_file_ends_the_container_at_once_with_the_cause_last(
        make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """KUBELET_SOCKET=/etc/passwd/kubelet.sock: no restart makes a file a directory. It took three
    plugin-server tracebacks and the crash-loop path (8.4 s) to end."""
    blocker = tmp_path / "passwd"
    blocker.write_text("root:x:0:0::/root:/bin/sh\n")
    s = make_stack(env={"KUBELET_SOCKET": str(blocker / "kubelet.sock")})
    s.start()
    code, log = ended(s)
    assert code != 0, log
    assert f"{blocker} is not a directory" in last_line(log), log
    assert "Traceback" not in log, log
    for program in ("plugin-server", "registrar"):
        assert log.count(f"spawned: '{program}'") == 1, log
    assert blocker.read_text() == "root:x:0:0::/root:/bin/sh\n"


def test_no_driver_with_fail_on_init_error_ends_the_container_with_the_cause_last(
        make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    desc = tmp_path / "no-driver.json"
    desc.write_text(json.dumps({"init_error": 9, "devices": []}))
    s = make_stack(fleet=str(desc), env={"FAIL_ON_INIT_ERROR": "true"})
    s.start()
    code, log = ended(s)
    assert code != 0, log
    assert "health-monitor" in last_line(log) and "Driver Not Loaded" in last_line(log), log
    assert log.count("spawned: 'health-monitor'") == 1, log


def test_a_symlinked_run_dir_is_refused_by_the_entry_point(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = make_stack()
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o755)
    s.run_dir.symlink_to(target)
    s.start()
    code, log = ended(s)
    assert code != 0, log
    assert f"run dir {s.run_dir} is a symlink" in last_line(log), log
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and list(target.iterdir()) == []


def test_a_run_dir_of_another_user_is_refused_by_the_entry_point(make_stack) -> None:  # type: ignore[no-untyped-def]
    s = make_stack()
    s.run_dir.mkdir()
    os.chown(s.run_dir, 65534, 65534)
    s.start()
    code, log = ended(s)
    assert code != 0, log
    assert f"run dir {s.run_dir} is owned by uid 65534" in last_line(log), log
