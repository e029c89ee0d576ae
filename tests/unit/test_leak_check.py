"""The session-wide leak check (tests/leakcheck.py) on a test session of its own, with xdist and
without: a process left running fails the run, is named with the test that started it and is
killed; a test that takes the run ID out of the environment (after which nothing it starts is
tracked) fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import leakcheck
from tests.conftest import REPO, wait_until

INNER = """
import os
import subprocess
from pathlib import Path


def test_leaks() -> None:
    # A session of its own, as a daemon's: no process-group kill reaches it.
    p = subprocess.Popen(["sleep", "300"], start_new_session=True)
    Path(PID_FILE).write_text(str(p.pid))


def test_untracks() -> None:
    del os.environ["GPU_PLUGIN_TEST_RUN"]


def test_clean() -> None:
    subprocess.run(["true"], check=True)
"""


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


@pytest.mark.parametrize("mode", [["-p", "no:xdist"], ["-n", "2"]], ids=["without xdist", "with xdist"])
def test_a_leaked_process_fails_the_run_and_is_killed(short_tmp: Path, mode: list[str]) -> None:
    pid_file = short_tmp / "leaked.pid"
    (short_tmp / "test_inner.py").write_text(INNER.replace("PID_FILE", repr(str(pid_file))))
    (short_tmp / "pytest.ini").write_text("[pytest]\n")
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.leakcheck", "-p", "no:cacheprovider",
                              *mode, "-q", "test_inner.py"], cwd=short_tmp,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
        pid = int(pid_file.read_text())
        text = out.stdout + out.stderr
        assert out.returncode == pytest.ExitCode.TESTS_FAILED, text
        assert "leak check: FAILED" in out.stdout, text
        assert f"pid {pid}: sleep 300  [started during test_inner.py::test_leaks (call)]" in out.stdout, text
        assert "ERROR at teardown of test_untracks" in out.stdout, text
        assert "the test removed or changed GPU_PLUGIN_TEST_RUN in os.environ" in out.stdout, text
        assert "3 passed, 1 error" in out.stdout, text
        wait_until(lambda: not alive(pid), 10, "the leaked process killed by the check")
    finally:
        # Also when the inner run timed out: its sleep carries the inner run's ID, not ours.
        if pid_file.exists() and alive(leaked := int(pid_file.read_text())):
            os.kill(leaked, signal.SIGKILL)


def test_this_run_is_leak_checked(request: pytest.FixtureRequest) -> None:
    """The suite's own run has the check: tests/conftest.py registers its hooks and the run ID is set."""
    hooks = {name: [impl.function for impl in getattr(request.config.hook, name).get_hookimpls()]
             for name in ("pytest_configure", "pytest_runtest_teardown", "pytest_sessionfinish")}
    assert all(getattr(leakcheck, name) in impls for name, impls in hooks.items()), hooks
    assert os.environ.get(leakcheck.MARKER), "the controller sets the run ID before any test starts"
