"""Node health in the API: the kube-agent as a real process, fed by a health bus publisher (the real
publisher, with the states and events a health-monitor sends), writing to the emulated API server
(devtools.kube_api) over real HTTP. One agent per scenario group; the policy's details are unit
tests (tests/unit/test_node_health_policy.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import KUBE_SOCKET, UNHEALTHY, DeviceState, HealthEvent, KubeState
from common.kubeapi import Http, default_client
from services.cli import _node_health_line
from services.kube_agent.board import KubeBoard
from services.kube_agent.node_events import BURST
from services.kube_agent.reporter import NodeHealth
from tests.conftest import Procs, wait_until
from tests.integration.busclient import BusWatch
from tests.integration.fakes import EmulatedApi, FakeHealthMonitor, gpus

NODE = "node-1"
READY = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
         "lastHeartbeatTime": "2026-12-01T00:00:00Z", "lastTransitionTime": "2026-11-01T00:00:00Z"}


class Api(EmulatedApi):
    def __init__(self) -> None:
        super().__init__()
        self.lt.call(lambda: self.emu.add_node(NODE))
        # Another writer's condition (the kubelet's): it must stay as it is.
        self.lt.call(lambda: self.emu.nodes[NODE].setdefault("status", {}).update(conditions=[dict(READY)]))

    def condition(self) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.call(lambda: self.emu.condition(NODE, "GPUUnhealthy"))
        return found

    def events(self, reason: str = "") -> list[dict[str, Any]]:
        return [e for e in self.call(lambda: [dict(e) for e in self.emu.events_of()])
                if not reason or e["reason"] == reason]

    def writes(self) -> int:
        return len(self.call(self.emu.writes))


@pytest.fixture
def api() -> Iterator[Api]:
    a = Api()
    yield a
    a.close()


class Node:
    """The health bus (a publisher as the health-monitor's) and the kube-agent with node health on."""

    def __init__(self, procs: Procs, root: Path, api: Api) -> None:
        self.run = root / "run"
        self.devices = gpus(4)
        self.monitor = FakeHealthMonitor(self.run, self.devices)
        (root / "kubeconfig").write_text(api.emu.kubeconfig())
        self.env = {"GPU_PLUGIN_RUN_DIR": str(self.run), "NODE_NAME": NODE, "KUBECONFIG": str(root / "kubeconfig"),
                    "HEALTH_NODE_CONDITION": "true", "HEALTH_NODE_EVENTS": "true",
                    "GPU_PLUGIN_WATCHDOG_TIMEOUT": "30s"}
        self.procs = procs
        self.p: subprocess.Popen[bytes] | None = None
        self.bus: BusWatch | None = None

    def start(self) -> None:
        self.p = self.procs.start("kube-agent", "kube-agent", env=self.env)
        self.bus = BusWatch(self.run / KUBE_SOCKET, (KubeState.TOPIC,))

    def restart(self) -> None:
        if self.bus is not None:
            self.bus.close()
        self.start()

    def fault(self, i: int, reason: str, xid: int = 0) -> None:
        """Device i Unhealthy: the state first, then the driver event, as the health-monitor sends them."""
        self.devices[i] = dataclasses.replace(self.devices[i], health=UNHEALTHY, reason=reason)
        self.monitor.publish(list(self.devices))
        if xid:
            self.monitor.send(HealthEvent(time=time.time(), device=self.devices[i].id, event="xid", xid=xid,
                                          reason="fatal"))

    def cordon(self, i: int, on: bool) -> None:
        self.devices[i] = dataclasses.replace(gpus(4)[i], health=UNHEALTHY, reason="cordoned: fan", cordoned=True) \
            if on else gpus(4)[i]
        self.monitor.publish(list(self.devices))

    def recover(self, i: int) -> None:
        self.devices[i] = gpus(4)[i]
        self.monitor.publish(list(self.devices))

    def state(self, predicate: Callable[[KubeState], bool], timeout: float = 10.0) -> KubeState:
        assert self.bus is not None
        msg = self.bus.wait(lambda m: isinstance(m, KubeState) and predicate(m), timeout)
        assert isinstance(msg, KubeState)
        return msg

    def running(self) -> None:
        assert self.p is not None and self.p.poll() is None, f"the kube-agent exited ({self.p and self.p.returncode})"

    def rss_kb(self) -> int:
        assert self.p is not None
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
        self.monitor.close()


@pytest.fixture
def node(procs: Procs, short_tmp: Path, api: Api) -> Iterator[Node]:
    n = Node(procs, short_tmp, api)
    yield n
    n.close()


def device_label(d: DeviceState) -> str:
    return f"GPU {d.index} ({d.id})"


def test_rbac_then_fault_recovery_and_a_storm(node: Node, api: Api) -> None:
    # RBAC not granted: the reason on the bus, the agent serves on.
    api.call(lambda: api.emu.forbidden.update({"nodes/status", "events"}))
    node.start()
    node.fault(2, "GPU lost")  # a fault to report while refused (an Event and the condition wait)
    st = node.state(lambda m: "node condition GPUUnhealthy: HTTP 403" in m.node_health_error)
    assert st.parts == ["node health"] and st.node_condition == ""
    node.running()
    assert "node health: API WRITES FAILING (the node serves on; retrying): node condition GPUUnhealthy: HTTP 403" \
        in _node_health_line(st)  # what `gpu-plugin status` prints of it
    api.call(api.emu.forbidden.clear)  # the chart's RBAC applied: written on the next retry
    node.state(lambda m: m.node_condition == "True" and not m.node_health_error, timeout=15)
    node.recover(2)
    wait_until(lambda: (api.condition() or {}).get("status") == "False", 5, "condition False")
    cond = api.condition()
    assert cond is not None and cond["reason"] == "AllGPUsHealthy"
    assert api.call(lambda: api.emu.condition(NODE, "Ready")) == READY  # another writer's: untouched
    healthy_since = cond["lastTransitionTime"]

    # XID 79 -> condition True and a Warning Event within 1 s.
    t0 = time.monotonic()
    node.fault(0, "XID 79", xid=79)
    cond = wait_until(lambda: c if (c := api.condition()) and c["status"] == "True" else None, 5, "condition True")
    warnings = wait_until(lambda: api.events("GPUUnhealthy"), 5, "a GPUUnhealthy Event")
    assert time.monotonic() - t0 < 1.0
    assert (cond["reason"], cond["message"]) == ("GpuLost", f"{device_label(node.devices[0])}: XID 79")
    event = warnings[-1]
    assert (event["type"], event["involvedObject"], event["source"]) == (
        "Warning", {"kind": "Node", "name": NODE, "uid": NODE}, {"component": "gpu-device-plugin", "host": NODE})
    assert event["metadata"]["namespace"] == "default" and "XID 79" in event["message"]
    wait_until(lambda: api.events("XidError"), 5, "an XidError Event")
    assert cond["lastTransitionTime"] >= healthy_since

    # Recovery -> False and a Normal Event.
    node.recover(0)
    wait_until(lambda: (api.condition() or {}).get("status") == "False", 5, "condition False again")
    recovered = wait_until(lambda: [e for e in api.events("GPURecovered") if node.devices[0].id in e["message"]], 5,
                           "a GPURecovered Event")
    assert recovered[0]["type"] == "Normal"

    # 10 000 XIDs on one GPU: a bounded number of writes, one Event counting them, memory flat.
    state = node.state(lambda m: m.node_events_pending == 0)
    before, rss = api.writes(), node.rss_kb()
    gpu1 = node.devices[1].id
    storm = [HealthEvent(time=time.time(), device=gpu1, event="xid", xid=94, reason="monitor-only")] * 10_000

    def flood() -> None:
        for e in storm:
            node.monitor.pub.publish(e)

    node.monitor.lt.call(flood)
    xids = wait_until(lambda: [e for e in api.events("XidError") if gpu1 in e["message"]
                               and e.get("count", 0) >= BURST], 10, "the storm's Event counted")
    node.state(lambda m: m.node_events_written > state.node_events_written + 1)
    assert len(xids) == 1 and api.writes() - before <= BURST + 2
    assert node.rss_kb() - rss < 8 << 10
    node.running()

    # A restart of the agent is not a change of the GPUs' health: the Node's transition time stays
    # (made older than this test, so that a time taken at the restart cannot match it).
    since = "2026-01-01T00:00:00Z"

    def backdate() -> None:
        for c in api.emu.nodes[NODE]["status"]["conditions"]:
            if c["type"] == "GPUUnhealthy":
                c["lastTransitionTime"] = since

    api.call(backdate)
    assert node.p is not None and node.procs.stop(node.p) == 0
    patches = len([r for r in api.call(api.emu.writes) if r.path.endswith("/status")])
    node.restart()
    wait_until(lambda: len([r for r in api.call(api.emu.writes) if r.path.endswith("/status")]) > patches, 10,
               "the restarted agent's first condition write")
    assert (api.condition() or {})["lastTransitionTime"] == since


def test_api_down_during_a_fault_converges_without_stale_events(node: Node, api: Api) -> None:
    node.start()
    wait_until(lambda: (api.condition() or {}).get("status") == "False", 10, "the first condition")
    api.lt.run(api.emu.stop())  # the API server goes away
    node.fault(0, "XID 79", xid=79)
    node.state(lambda m: m.node_health_error != "")
    node.recover(0)
    node.fault(0, "XID 79; GPU lost")
    node.cordon(1, True)
    node.cordon(1, False)
    api.lt.run(api.emu.start())  # back, on the same port
    cond = wait_until(lambda: c if (c := api.condition()) and c["status"] == "True" else None, 15, "condition True")
    assert cond["reason"] == "GpuLost" and cond["message"].endswith("XID 79, GPU lost")
    node.state(lambda m: m.node_events_pending == 0 and not m.node_health_error, timeout=15)
    # Each device's latest news only: GPU 0 Unhealthy with what it has now, not its first fault and
    # recovery; GPU 1 uncordoned, not the cordon before.
    assert [e["message"] for e in api.events("GPUUnhealthy")] == [
        f"{device_label(node.devices[0])} Unhealthy: XID 79, GPU lost"]
    assert api.events("GPURecovered") == [] and api.events("GPUCordoned") == []
    assert len(api.events("GPUUncordoned")) == 1 and len(api.events("XidError")) == 1

    # Connections cut after the writes were applied (the client cannot know): the condition is
    # written again, the Event's second create finds it there (409) and is not made twice.
    api.call(lambda: setattr(api.emu, "cuts", 2))
    node.fault(2, "XID 48", xid=48)
    wait_until(lambda: "XID 48" in (api.condition() or {}).get("message", ""), 10, "GPU 2 in the condition")
    node.state(lambda m: m.node_events_pending == 0 and not m.node_health_error, timeout=10)
    assert api.call(lambda: api.emu.cuts) == 0
    said = [(e["reason"], e["message"]) for e in api.events()]
    assert len(said) == len(set(said)) and len([r for r, m in said if "XID 48" in m]) == 2  # GPUUnhealthy, XidError

    # Too many requests: the server's Retry-After is honoured, then the write goes through.
    api.call(lambda: (setattr(api.emu, "retry_after", 1), api.emu.failures.append(429)))
    t0 = time.monotonic()
    node.recover(0)
    node.recover(2)
    node.state(lambda m: "HTTP 429" in m.node_health_error)
    wait_until(lambda: (api.condition() or {}).get("status") == "False", 10, "condition False after the 429")
    node.state(lambda m: m.node_condition == "False" and not m.node_health_error)
    assert time.monotonic() - t0 >= 1.0
    node.running()


def test_a_node_larger_than_a_few_mib_is_written_once(node: Node, api: Api) -> None:
    """The status patch answers with the whole Node, read within common.kubeapi's bound (8 MiB) as
    every answer: a 3 MiB Node (a cluster that raised etcd's limit) was a write that landed, taken
    for a failed one and sent again, forever."""
    api.call(lambda: api.emu.nodes[NODE]["metadata"].setdefault("annotations", {}).update(big="x" * (3 << 20)))
    node.start()
    st = node.state(lambda m: m.node_condition == "False" or m.node_health_error != "")
    assert (st.node_condition, st.node_health_error) == ("False", "")
    assert len([r for r in api.call(api.emu.writes) if r.path.endswith("/status")]) == 1
    node.running()


# An exec credential plugin (as cloud providers' kubeconfigs name one) that fails its first run, then
# gives a token: the first request's credentials are refused by their plugin (a ConfigError).
TOKEN_ONCE = """#!/bin/sh
if [ -e "$1" ]; then
  printf '{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","status":{"token":"t"}}'
else
  : > "$1"; echo "not logged in" >&2; exit 1
fi
"""


def test_a_client_dropped_after_a_config_error_is_closed(short_tmp: Path, api: Api) -> None:
    """The writer's next request builds a new client; the old one is closed with its connections,
    not left open until the garbage collector finds it."""
    run = short_tmp / "run"
    monitor = FakeHealthMonitor(run, gpus(2))
    plugin = short_tmp / "token.sh"
    plugin.write_text(TOKEN_ONCE)
    plugin.chmod(0o700)
    kubeconfig = json.loads(api.emu.kubeconfig())
    kubeconfig["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                               "command": str(plugin), "args": [str(short_tmp / "ran")]}}
    (short_tmp / "kubeconfig").write_text(json.dumps(kubeconfig))
    clients: list[Http] = []

    def client() -> Http:
        clients.append(default_client(str(short_tmp / "kubeconfig")))
        return clients[-1]

    class Bus:
        def publish_state(self, state: KubeState) -> KubeState:
            return state

    health = NodeHealth(NODE, run / "health.sock", KubeBoard(Bus(), NODE, ["node health"]), condition=True,
                        events=False, client=client)
    try:
        api.lt.spawn(health.run())
        wait_until(lambda: (api.condition() or {}).get("status") == "False", 10, "the condition, on the second try")
        assert len(clients) == 2 and clients[0].is_closed and not clients[1].is_closed
    finally:
        monitor.close()
