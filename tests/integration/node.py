"""A node for integration tests: the three services as real processes, the kubelet
simulator in-process (so tests can look inside it), all on real sockets in a temp dir."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from devtools.devstack import stack_env
from devtools.kubelet_simulator.simulator import KubeletSimulator
from devtools.loop_thread import LoopThread
from devtools.nvml_sim import fleet_path
from tests.conftest import Procs, wait_until


def fleet_copy(root: Path, fleet: str, change: Any) -> str:
    """A shipped fleet, changed by `change(description)`, written to a file; returns its path."""
    desc = json.loads(fleet_path(fleet).read_text())
    change(desc)
    path = root / f"{fleet}-changed.json"
    path.write_text(json.dumps(desc))
    return str(path)


class Node:
    def __init__(self, procs: Procs, root: Path, fleet: str = "dgx-h100-8", **env: str) -> None:
        self.procs = procs
        self.root = root
        self.run = root / "run"
        self.dp = root / "dp"
        self.dp.mkdir(parents=True, exist_ok=True)
        self.env = stack_env(root, fleet, HEALTH_PROBE_INTERVAL="0.2s", HEALTH_QUIET_PERIOD="1s", **env)
        self.lt = LoopThread()
        self.sim = KubeletSimulator(self.dp)
        self.lt.run(self.sim.start())
        self.services: dict[str, subprocess.Popen[bytes]] = {}
        for name in ("health-monitor", "plugin-server", "registrar"):
            self.start(name)

    def start(self, service: str) -> None:
        self.services[service] = self.procs.start(service, service, env=self.env)

    def cli(self, *args: str, command: str = "gpu-plugin") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(self.procs.env["PATH"].split(":")[0]) / command), *args],
            env={**self.procs.env, **self.env}, capture_output=True, text=True, timeout=60,
        )

    def inject(self, *args: str) -> None:
        out = self.cli("inject", *args, command="gpu-plugin-dev")
        assert out.returncode == 0, out.stderr

    def devices(self, resource: str = "nvidia.com/gpu") -> dict[str, str]:
        view = self.sim.resources.get(resource)
        return dict(view.devices) if view is not None and view.connected else {}

    def wait_devices(self, resource: str = "nvidia.com/gpu", count: int = 8, healthy: int | None = None,
                     timeout: float = 15.0) -> dict[str, str]:
        def ok() -> dict[str, str] | None:
            devs = self.devices(resource)
            good = sum(h == "Healthy" for h in devs.values())
            return devs if len(devs) == count and good == (count if healthy is None else healthy) else None

        result: dict[str, str] = wait_until(ok, timeout, f"{resource}: {count} devices, {healthy} healthy")
        return result

    def wait_health(self, device: str, health: str, resource: str = "nvidia.com/gpu", timeout: float = 15.0) -> None:
        wait_until(lambda: self.devices(resource).get(device) == health, timeout, f"{device} {health} at the kubelet")

    def close(self) -> None:
        self.lt.run(self.sim.stop())
        self.lt.close()
