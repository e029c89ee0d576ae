"""End to end: per-node configuration as in the pod. The config-manager init container selects the
first config, then the shipped supervisord.conf runs the services and the kube-agent, which follows
the node label at the emulated API server; the kubelet simulator (a process) sees the result."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.devstack import GROUP, RESOURCE, DevStack
from devtools.kube_api import KubeApiEmulator
from devtools.loop_thread import LoopThread
from tests.conftest import wait_until
from tests.e2e.conftest import held
from tests.integration.test_kube_agent import LABEL, TS4, TS8, config_map

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[DevStack, KubeApiEmulator, LoopThread]]:
    lt = LoopThread()
    emu = KubeApiEmulator()
    lt.run(emu.start())

    async def add() -> None:
        emu.add_node("node-1", {})

    lt.run(add())
    src = tmp_path / "available-configs"
    config_map(src, {"default": "version: v1\n", "ts-4": TS4, "ts-8": TS8})
    (tmp_path / "kubeconfig").write_text(emu.kubeconfig())
    conf = tmp_path / "config"
    conf.mkdir()
    env = {"CONFIG_FILE": str(conf / "config.yaml"), "CONFIG_FILE_SRCDIR": str(src), "NODE_NAME": "node-1",
           "NODE_LABEL": LABEL, "FALLBACK_STRATEGIES": "named,single", "KUBECONFIG": str(tmp_path / "kubeconfig")}
    init = subprocess.run([str(BIN / "config-manager")], env={**os.environ, **env, "ONESHOT": "true",
                                                                "CONFIG_FILE_DST": env["CONFIG_FILE"]},
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    stack = DevStack(fleet="dgx-h100-8", env=env)
    stack.start()
    try:
        yield stack, emu, lt
    finally:
        stack.stop()
        stack.cleanup()
        lt.run(emu.stop())
        lt.close()


def label(lt: LoopThread, emu: KubeApiEmulator, value: str | None) -> None:
    async def set_it() -> None:
        emu.set_label("node-1", LABEL, value)

    lt.run(set_it())


def test_label_change_reaches_the_kubelet_without_a_restart(
        cluster: tuple[DevStack, KubeApiEmulator, LoopThread]) -> None:
    stack, emu, lt = cluster
    held(stack)
    pids = {p: stack.pid(p) for p in ("health-monitor", "plugin-server", "registrar")}
    wait_until(lambda: "RUNNING" in stack.ctl("status", f"{GROUP}:kube-agent", check=False), 30, "kube-agent up")
    label(lt, emu, "ts-4")
    held(stack, timeout=30, allocatable=32, capacity=32)
    label(lt, emu, "ts-8")
    held(stack, timeout=30, allocatable=64, capacity=64)
    out = subprocess.run([str(BIN / "gpu-plugin"), "status", "--timeout", "20"], env=stack.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (f"per-node config: node node-1, label ts-8, selected ts-8 (node label {LABEL}=ts-8); API reachable"
            in out.stdout), out.stdout
    label(lt, emu, None)
    state = held(stack, timeout=30)
    assert all("::" not in i for i in state["resources"][RESOURCE]["devices"])
    assert {p: stack.pid(p) for p in pids} == pids, "no service restarted"


def test_without_per_node_configuration_the_kube_agent_is_left_alone(stack: DevStack) -> None:
    held(stack)
    wait_until(lambda: "EXITED" in stack.ctl("status", f"{GROUP}:kube-agent", check=False), 30, "kube-agent exited")
    assert stack.supervisord is not None and stack.supervisord.poll() is None
    assert "per-node configuration is off" in stack.logs()
