"""The registrar with real peers: a plugin-server process, a test-side health publisher and
the kubelet simulator, in-process here so the test can look inside it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import PluginState, RegistrarEvent, RegistrarState
from common.fswatch import file_id
from devtools.kubelet_simulator.simulator import KubeletSimulator
from devtools.loop_thread import LoopThread
from tests.conftest import Procs, wait_until
from tests.integration.busclient import BusWatch
from tests.integration.fakes import FakeHealthMonitor, PluginClient, gpus

RESOURCE = "nvidia.com/gpu"


@dataclasses.dataclass
class Env:
    run: Path
    dp: Path
    procs: Procs
    health: FakeHealthMonitor
    lt: LoopThread
    sim: KubeletSimulator

    def env(self) -> dict[str, str]:
        return {"GPU_PLUGIN_RUN_DIR": str(self.run), "KUBELET_SOCKET": str(self.dp / "kubelet.sock")}

    def start_kubelet(self) -> None:
        self.lt.run(self.sim.start())

    def start_registrar(self, name: str = "rg") -> Any:
        return self.procs.start(name, "registrar", env=self.env())

    def ok_registrations(self) -> int:
        return sum(1 for r in self.sim.registrations if r["ok"])

    def registered_and_streaming(self) -> None:
        """Kubelet and registrar up, the resource held, and the kubelet's stream delivering."""
        self.start_kubelet()
        self.start_registrar()
        wait_until(self.held, 10, "first registration")
        wait_until(lambda: self.sim.clients.get(RESOURCE) is not None and self.sim.clients[RESOURCE].updates > 0,
                   10, "the kubelet's stream running")

    def held(self, allocatable: int = 4) -> bool:
        view = self.sim.resources.get(RESOURCE)
        return bool(view and view.connected and sum(h == "Healthy" for h in view.devices.values()) == allocatable)

    def allocate(self, ids: list[str]) -> Any:
        return self.lt.run(self.sim.allocate(RESOURCE, ids))


@pytest.fixture
def env(procs: Procs, short_tmp: Path) -> Iterator[Env]:
    run, dp = short_tmp / "run", short_tmp / "dp"
    dp.mkdir()
    lt = LoopThread()
    e = Env(run, dp, procs, FakeHealthMonitor(run, gpus(4)), lt, KubeletSimulator(dp))
    procs.start("ps", "plugin-server", env=e.env())
    yield e
    lt.run(e.sim.stop())
    e.health.close()
    lt.close()


def test_kubelet_absent_at_start_then_appearing(env: Env) -> None:
    env.start_registrar()
    with BusWatch(env.run / "registrar.sock", ("registrar.state",)) as w:
        w.wait(lambda m: isinstance(m, RegistrarState) and m.kubelet == "absent" and m.pending == [RESOURCE])
    env.start_kubelet()
    wait_until(env.held, 10, "the kubelet holding 4 healthy GPUs")
    assert env.ok_registrations() == 1
    with BusWatch(env.run / "registrar.sock", ("registrar.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, RegistrarState) and m.registrations != [])
    assert isinstance(msg, RegistrarState)
    assert msg.kubelet == "present" and msg.pending == [] and not msg.registrations[0].adopted


def test_kubelet_restart_reregisters_exactly_once(env: Env) -> None:
    env.start_kubelet()
    env.start_registrar()
    wait_until(env.held, 10, "first registration")
    with BusWatch(env.run / "registrar.sock", ("registrar.state",)) as w:  # the registrar's own count (metrics)
        for n in range(2, 5):
            # The kubelet counts a Register before its answer reaches the registrar: a restart in between
            # would abandon the call the registrar is still waiting on (rightly: that kubelet is gone).
            w.wait(lambda m, n=n: isinstance(m, RegistrarState) and m.registers == n - 1)
            env.lt.run(env.sim.restart())
            wait_until(lambda n=n: env.held() and env.ok_registrations() >= n, 10, f"registration {n}")
            assert env.ok_registrations() == n
            ids = list(env.sim.resources[RESOURCE].devices)
            assert env.allocate(ids[:1]).envs["NVIDIA_VISIBLE_DEVICES"] == ids[0]
        w.wait(lambda m: isinstance(m, RegistrarState) and (m.registers, m.kubelet_restarts) == (4, 3))
    assert env.sim.disconnects == 0, "no registration was ever replaced under a live stream"


def test_registrar_restart_alone_does_not_disturb_the_kubelet(env: Env) -> None:
    env.start_kubelet()
    first = env.start_registrar()
    wait_until(env.held, 10, "first registration")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    ids = list(env.sim.resources[RESOURCE].devices)
    assert env.allocate(ids[:1]).envs  # no registrar: the kubelet still has a working endpoint
    env.start_registrar("rg2")
    with BusWatch(env.run / "registrar.sock", ("registrar.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, RegistrarState) and m.registrations != [])
    assert isinstance(msg, RegistrarState) and msg.registrations[0].adopted
    assert env.ok_registrations() == 1 and env.sim.disconnects == 0 and env.held()
    assert env.allocate(ids[:2]).envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids[:2])
    # Adoption is not blindness: a later kubelet restart is still followed.
    env.lt.run(env.sim.restart())
    wait_until(lambda: env.held() and env.ok_registrations() == 2, 10, "re-registration after adoption")


def test_refusing_kubelet_is_retried_with_backoff_and_reported_once(env: Env) -> None:
    env.sim.refuse = "registration refused for the test"
    env.start_kubelet()
    env.start_registrar()
    with BusWatch(env.run / "registrar.sock", ("registrar.",)) as w:
        w.wait(lambda m: isinstance(m, RegistrarState) and m.kubelet == "refusing" and "refused" in m.last_error)
        seen_at = len(env.sim.registrations)
        wait_until(lambda: len(env.sim.registrations) >= seen_at + 3, 10, "several retries")
        env.sim.refuse = None
        wait_until(env.held, 10, "registration once the kubelet accepts")
        w.wait(lambda m: isinstance(m, RegistrarEvent) and m.event == "registered")
        w.wait(lambda m: isinstance(m, RegistrarState) and m.registers == 1 and m.register_failures >= 3)
        repeated = [m for m in w.seen if isinstance(m, RegistrarEvent) and m.event == "failed"]
    assert len(repeated) <= 1, "a repeated failure is reported once, not per retry"
    assert env.procs.log("rg").count("registering nvidia.com/gpu failed") == 1


def test_plugin_server_restart_is_registered_once_more(env: Env) -> None:
    env.start_kubelet()
    env.start_registrar()
    wait_until(env.held, 10, "first registration")
    ps = env.procs.procs[0][1]
    os.kill(ps.pid, signal.SIGKILL)
    ps.wait(10)
    env.procs.start("ps2", "plugin-server", env=env.env())
    wait_until(lambda: env.held() and env.ok_registrations() == 2, 15, "re-registration of the new endpoint")
    ids = list(env.sim.resources[RESOURCE].devices)
    assert env.allocate(ids[:1]).envs




def test_a_kubelet_that_drops_the_stream_gets_a_new_registration(env: Env) -> None:
    env.registered_and_streaming()
    env.lt.run(env.sim.drop(RESOURCE))
    assert not env.held()
    wait_until(lambda: env.held() and env.ok_registrations() == 2, 15, "a new registration after the drop")
    assert "stopped streaming" in env.procs.log("rg")


def test_sigterm_while_kubelet_sock_vanishes_always_stops_the_registrar(env: Env) -> None:
    # The kubelet going away wakes the reconcile loop at the very moment SIGTERM cancels it; a
    # wait that swallows that cancellation (asyncio.wait_for on 3.11) left the registrar running.
    env.start_kubelet()
    kubelet_sock = env.dp / "kubelet.sock"
    for trial in range(20):
        name = f"rg{trial}"
        rg = env.start_registrar(name)
        wait_until(lambda name=name: "absent -> present" in env.procs.log(name), 30, f"{name} seeing the kubelet")
        kubelet_sock.unlink()
        rg.send_signal(signal.SIGTERM)
        wait_until(lambda rg=rg: rg.poll() is not None, 30, f"{name} exiting after SIGTERM (trial {trial})")
        assert rg.returncode == 0, env.procs.log(name)
        env.lt.run(env.sim.restart())


def _endpoint_on_disk(env: Env) -> bool:
    """plugin.state announces the endpoint with the identity of the socket file really there."""
    with BusWatch(env.run / "plugin.sock", ("plugin.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, PluginState))
    assert isinstance(msg, PluginState)
    on_disk = file_id(env.dp / "nvidia-gpu.sock")
    return bool(on_disk) and [e.socket_id for e in msg.endpoints] == [on_disk]


def test_a_burst_of_kubelet_restarts_leaves_the_endpoint_served(env: Env) -> None:
    env.start_kubelet()
    env.start_registrar()
    wait_until(env.held, 10, "first registration")

    async def burst() -> None:
        for _ in range(300):  # a crash-looping kubelet: hundreds of restarts within about a second
            await env.sim.restart()

    env.lt.run(burst(), timeout=120)
    wait_until(env.held, 30, "the kubelet holding the resource again after the burst")
    wait_until(lambda: _endpoint_on_disk(env), 30, "plugin.state naming the socket file on disk")


def test_kubelet_restarts_5_ms_apart_never_leave_a_register_waiting_out_its_timeout(env: Env) -> None:
    env.start_kubelet()
    env.start_registrar()
    wait_until(env.held, 10, "first registration")

    async def restarts() -> None:
        for _ in range(4):
            await env.sim.restart()
            await asyncio.sleep(0.005)  # the crash-looping kubelet's own pace, not a wait for a condition

    for n in range(40):  # a Register caught by a restart is a race: give it many chances
        before = env.ok_registrations()
        env.lt.run(restarts())
        wait_until(lambda before=before: env.held() and env.ok_registrations() > before, 30, f"round {n}: held again")
    # A Register sent to a kubelet that then went away is abandoned when kubelet.sock is
    # replaced; none may sit until its deadline (that was a 12 s outage).
    assert "DEADLINE_EXCEEDED" not in env.procs.log("rg")


def test_a_stray_stream_does_not_hide_a_kubelet_drop(env: Env) -> None:
    env.registered_and_streaming()
    stray = PluginClient(env.dp / "nvidia-gpu.sock")  # e.g. an operator's debugging client
    try:
        stray.watch()
        stray.next_update()
        env.lt.run(env.sim.drop(RESOURCE))
        wait_until(lambda: env.held() and env.ok_registrations() == 2, 30, "a new registration after the drop")
        assert stray.updates.empty(), "the stray client was left alone"
    finally:
        stray.close()
    assert "stopped streaming" in env.procs.log("rg")


def test_after_adoption_a_stray_stream_does_not_hide_a_kubelet_drop(env: Env) -> None:
    env.start_kubelet()
    first = env.start_registrar()
    wait_until(env.held, 10, "first registration")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    env.start_registrar("rg2")
    with BusWatch(env.run / "registrar.sock", ("registrar.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, RegistrarState) and m.registrations != [])
    assert isinstance(msg, RegistrarState) and msg.registrations[0].adopted
    stray = PluginClient(env.dp / "nvidia-gpu.sock")
    try:
        stray.watch()
        stray.next_update()
        env.lt.run(env.sim.drop(RESOURCE))
        wait_until(lambda: env.held() and env.ok_registrations() == 2, 30, "a new registration after the drop")
    finally:
        stray.close()
    assert "stopped streaming" in env.procs.log("rg2")


def test_a_kubelet_sock_nobody_listens_on_is_named_in_the_error(env: Env) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(env.dp / "kubelet.sock"))  # a kubelet that died without removing its socket
    dead.close()
    env.start_registrar()
    with BusWatch(env.run / "registrar.sock", ("registrar.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, RegistrarState) and m.kubelet == "refusing")
    assert isinstance(msg, RegistrarState)
    assert str(env.dp / "kubelet.sock") in msg.last_error and "/proc/self/fd" not in msg.last_error
    env.start_kubelet()  # replaces the dead socket file
    wait_until(env.held, 30, "registration with the kubelet that came up")
