"""Shared fixtures: short temp dirs (AF_UNIX paths are limited to 107 bytes), service
processes that are always reaped, and waiting for conditions with deadlines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import DeviceState
from devtools.devstack import spawn, terminate

# The session-wide leak check (a run leaves no process behind): its hooks, registered with this conftest.
from tests.leakcheck import pytest_configure, pytest_runtest_teardown, pytest_sessionfinish  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Polls `predicate` until it returns something truthy; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Procs:
    """Starts `gpu-plugin` subcommands as real processes; kills leftovers at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None,
              command: str = "services.cli") -> subprocess.Popen[bytes]:
        """`gpu-plugin <args>` (or, with command="devtools.cli", `gpu-plugin-dev <args>`)."""
        p = spawn([sys.executable, "-m", command, *args], {**self.env, **(env or {})}, self.root / f"{name}.log")
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
        return terminate(p, timeout)

    def close(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def procs(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    ps = Procs(short_tmp)
    yield ps
    ps.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for name, _ in ps.procs:
            sys.stderr.write(f"--- {name}.log\n{ps.log(name)[-5000:]}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def discovered(fleet: str, now: float = 1.0) -> list[DeviceState]:
    """A simulated fleet's devices as the health-monitor's discovery publishes them."""
    from devtools.nvml_sim import SimulatedNvml, fleet_path
    from services.health_monitor.discovery import discover

    nvml = SimulatedNvml(fleet_path(fleet))
    nvml.init()
    try:
        return discover(nvml, now).devices
    finally:
        nvml.shutdown()
