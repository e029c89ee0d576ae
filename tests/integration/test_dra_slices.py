"""The dra-plugin's ResourceSlices against the emulated API server (devtools.kube_api, real HTTP through
the real client), fed by a health bus publisher on real sockets: the publisher class runs in the test's
process, on the emulator's loop (no process to start: the program's wiring is the node side's). The
pool's details are unit tests (tests/unit/test_dra_pool.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import UNHEALTHY, DeviceState, HealthEvent
from common.kubeapi import default_client
from common.settings import DraDevices
from devtools.kube_api import KubeApiEmulator, Request
from devtools.loop_thread import LoopThread
from services.dra_plugin.slices import SlicePublisher, SliceStatus
from tests.conftest import discovered, wait_until
from tests.integration.fakes import FakeHealthMonitor

NODE = "node-1"
WRITES = ("POST", "PUT", "DELETE")


def h100s() -> list[DeviceState]:
    return discovered("dgx-h100-8", 1_767_225_600.0)


class Node:
    """The emulated API server and the publisher on one loop; a health bus publisher beside them."""

    def __init__(self, root: Path, *, served: tuple[str, ...] = ("v1", "v1beta2", "v1beta1"), taints: bool = True,
                 taint_none: bool = True, api: Callable[[], KubeApiEmulator] = KubeApiEmulator) -> None:
        self.lt = LoopThread()
        self.emu = api()
        self.slices_api = self.emu.resourceslices
        self.slices_api.served, self.slices_api.taints, self.slices_api.taint_none = list(served), taints, taint_none
        self.lt.run(self.emu.start())
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(self.emu.kubeconfig())
        self.base = h100s()
        self.devices = list(self.base)
        self.monitor = FakeHealthMonitor(root / "run", self.devices)
        self.statuses: list[SliceStatus] = []
        self.publisher = SlicePublisher(NODE, root / "run" / "health.sock", DraDevices(every=True),
                                        client=lambda: default_client(str(kubeconfig)),
                                        on_status=self.statuses.append, retry_min_s=0.05)
        self.task = self.lt.call(lambda: asyncio.ensure_future(self.publisher.run()))

    def call(self, fn: Callable[[], Any]) -> Any:
        return self.lt.call(fn)

    def slices(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call(lambda: self.slices_api.of_node(NODE))
        return found

    def published(self) -> dict[str, dict[str, Any]]:
        """Device name -> device, when the pool is complete: every slice of one generation and count."""
        slices = self.slices()
        pools = {(s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"]) for s in slices}
        if len(pools) != 1 or next(iter(pools))[1] != len(slices):
            return {}
        return {d["name"]: d for s in slices for d in s["spec"]["devices"]}

    def generation(self) -> int:
        return int(self.slices()[0]["spec"]["pool"]["generation"])

    def status(self) -> SliceStatus:
        status: SliceStatus = self.call(lambda: self.publisher.status)
        return status

    def writes(self, since: int = 0) -> list[Request]:
        requests: list[Request] = self.call(lambda: list(self.emu.requests))
        return [r for r in requests[since:] if r.method in WRITES and "resourceslices" in r.path
                and r.query.get("dryRun") != "All"]

    def requests(self) -> int:
        return int(self.call(lambda: len(self.emu.requests)))

    def set(self, i: int, reason: str = "", cordoned: bool = False) -> None:
        """GPU i Unhealthy with the health-monitor's reason text ("" = Healthy again), its state published."""
        self.devices[i] = self.base[i] if not reason else dataclasses.replace(
            self.base[i], health=UNHEALTHY, reason=reason, cordoned=cordoned, since=time.time())
        self.monitor.publish(list(self.devices))

    def close(self) -> None:
        # The publisher first, while the API answers: a task cancelled in the middle of connecting to a server
        # that is gone leaves the HTTP library's connect coroutine unawaited (a warning at a later test).
        async def stop() -> None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

        self.lt.run(stop())
        self.monitor.close()
        self.lt.run(self.emu.stop())
        self.lt.close()


@pytest.fixture
def make(short_tmp: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(**kw: Any) -> Node:
        nodes.append(Node(short_tmp, **kw))
        return nodes[-1]

    yield start
    for n in nodes:
        n.close()


def taints(devices: dict[str, dict[str, Any]], name: str) -> list[tuple[str, str, str]]:
    return [(t["key"], t.get("value", ""), t["effect"]) for t in devices.get(name, {}).get("taints", [])]


def test_eight_gpus_xid_taint_recovery_and_slices_deleted_behind_our_back(make: Callable[..., Node]) -> None:
    node = make()
    devices = wait_until(lambda: len(node.published()) == 8 and node.published(), 10, "8 GPUs published")
    assert sorted(devices) == [f"gpu-{i}" for i in range(8)]
    assert devices["gpu-3"]["attributes"]["productName"] == {"string": "NVIDIA H100 80GB HBM3"}
    assert devices["gpu-3"]["capacity"]["memory"] == {"value": "81559Mi"}
    assert node.status().api_version == "v1" and node.status().published
    first = node.generation()

    # XID 79 -> the taint within a second of the health-monitor's state; the other GPUs untouched.
    started = time.monotonic()
    node.set(2, "XID 79")
    devices = wait_until(lambda: taints(node.published(), "gpu-2") and node.published(), 1.0, "the XID 79 taint")
    took = time.monotonic() - started
    assert taints(devices, "gpu-2") == [("gpu.nvidia.com/xid", "79", "NoSchedule")], took
    assert not any(taints(devices, f"gpu-{i}") for i in (0, 1, 3, 4, 5, 6, 7))
    assert node.generation() > first and node.status().tainted == 1

    # Recovery (the monitor's next state): the taint goes. A state that changes nothing writes nothing.
    node.set(2)
    wait_until(lambda: len(node.published()) == 8 and not taints(node.published(), "gpu-2"), 2, "the taint removed")
    wait_until(lambda: node.status().tainted == 0, 2, "status: nothing tainted")
    before = node.requests()
    node.monitor.publish(list(node.devices))  # a new seq, the same devices
    node.set(5, "cordoned: fan", cordoned=True)  # then a change: exactly one write for both
    wait_until(lambda: taints(node.published(), "gpu-5") == [("gpu.nvidia.com/cordon", "", "NoSchedule")], 2,
               "the cordon taint")
    assert len(node.writes(before)) == 1

    # The kubelet, starting, deletes the node's slices (DeleteCollection by node name): written again at
    # once, one generation further.
    generation = node.generation()
    wipe = urllib.request.Request(f"{node.emu.url}/apis/resource.k8s.io/v1/resourceslices?"
                                  f"{urllib.parse.urlencode({'fieldSelector': f'spec.nodeName={NODE}'})}",
                                  method="DELETE")
    with urllib.request.urlopen(wipe, timeout=5) as answer:
        assert len(json.load(answer)["items"]) == 1
    devices = wait_until(lambda: len(node.published()) == 8 and node.published(), 2, "the slices written again")
    assert taints(devices, "gpu-5") == [("gpu.nvidia.com/cordon", "", "NoSchedule")]
    assert node.generation() > generation and node.status().deleted_behind == 1
    # One slice deleted by another client: the same.
    name = node.slices()[0]["metadata"]["name"]
    node.call(lambda: node.slices_api.delete_behind(name))
    wait_until(lambda: len(node.published()) == 8, 2, "the slice written again")
    assert node.status().deleted_behind == 2 and node.status().error == ""


def test_a_v1beta1_server_without_taints_gets_unhealthy_devices_left_out(make: Callable[..., Node]) -> None:
    """Kubernetes 1.32 (or 1.33 without DRADeviceTaints): a taint would be dropped and the device stay
    schedulable, so an Unhealthy device is not published until it recovers."""
    node = make(served=("v1beta1",), taints=False)
    wait_until(lambda: len(node.published()) == 8, 10, "8 GPUs published")
    assert node.status().api_version == "v1beta1"
    assert all("/v1beta1/" in r.path and b'"basic"' in r.body for r in node.writes() if r.method != "DELETE")
    node.set(1, "ECC DBE")
    devices = wait_until(lambda: len(node.published()) == 7 and node.published(), 2, "GPU 1 left out")
    assert "gpu-1" not in devices and not any("taints" in d for d in devices.values())
    status = node.status()
    assert status.left_out == ("gpu-1",) and "left out" in status.taints
    node.set(1)
    wait_until(lambda: len(node.published()) == 8, 2, "GPU 1 back")
    assert node.status().left_out == ()


def test_a_server_without_effect_none_and_one_that_stops_keeping_taints(make: Callable[..., Node]) -> None:
    node = make(served=("v1beta2", "v1beta1"), taint_none=False)
    wait_until(lambda: len(node.published()) == 8, 10, "8 GPUs published")
    assert node.status().api_version == "v1beta2"
    node.monitor.send(HealthEvent(time=time.time(), device=node.base[4].id, event="xid", xid=94, reason="monitor-only"))
    node.set(0, "XID 48")
    wait_until(lambda: taints(node.published(), "gpu-0"), 2, "the XID 48 taint")
    assert "without effect None" in node.status().taints
    assert not taints(node.published(), "gpu-4") and node.status().error == ""
    # The server stops keeping taints (DRADeviceTaints turned off, the server restarted): the next write's
    # answer shows it, the capabilities are found again and the Unhealthy devices left out.
    node.call(lambda: setattr(node.slices_api, "taints", False))
    node.set(1, "GPU lost")
    devices = wait_until(lambda: len(node.published()) == 6 and node.published(), 5, "GPUs 0 and 1 left out")
    assert "gpu-0" not in devices and "gpu-1" not in devices and "left out" in node.status().taints
    wait_until(lambda: node.status().error == "", 2, "the error cleared")


def test_the_api_away_and_back_gets_the_latest_state_once(make: Callable[..., Node]) -> None:
    node = make()
    wait_until(lambda: len(node.published()) == 8, 10, "8 GPUs published")
    node.lt.run(node.emu.stop())
    node.set(0, "XID 79")
    wait_until(lambda: node.status().error, 5, "the failure reported")
    node.set(0)  # recovered while the API was away
    node.set(3, "GPU lost")
    since = node.requests()
    node.lt.run(node.emu.start())  # the same port
    devices = wait_until(lambda: taints(node.published(), "gpu-3") and node.published(), 10, "the latest state")
    assert not taints(devices, "gpu-0")
    assert [r.method for r in node.writes(since)] == ["PUT"]  # one write of what is true now
    wait_until(lambda: node.status().error == "" and node.status().published, 2, "the error cleared")

    # Injected failures, and a write that loses a race to another writer (409): retried, then converged.
    node.call(lambda: node.emu.failures.extend([500, 503]))
    node.set(3)
    wait_until(lambda: len(node.published()) == 8 and not taints(node.published(), "gpu-3"), 10, "after 500, 503")
    name = node.slices()[0]["metadata"]["name"]

    def race() -> None:
        node.slices_api.version += 1  # another writer's update: the resourceVersion moves on
        node.slices_api.objects[name]["metadata"]["resourceVersion"] = str(node.slices_api.version)

    node.call(race)
    node.set(6, "row-remap failure")
    wait_until(lambda: taints(node.published(), "gpu-6") == [("gpu.nvidia.com/row-remap", "failed", "NoSchedule")],
               5, "written after the conflict")
    assert node.status().error == "" and all(d["attributes"]["uuid"]["string"].startswith("GPU-")
                                             for d in node.published().values())

    # An answer about another node (a field selector not honoured, a misrouted answer) is refused, not
    # taken for ours: a failed pass, retried until the answers are right again.
    node.call(lambda: setattr(node.slices_api, "fault", "other-node"))
    node.set(6)
    wait_until(lambda: "not of gpu.nvidia.com on node-1" in node.status().error, 5, "the answer refused")
    assert not node.status().published
    node.call(lambda: setattr(node.slices_api, "fault", None))
    wait_until(lambda: len(node.published()) == 8 and not taints(node.published(), "gpu-6"), 5, "after the fault")


class RacingApi(KubeApiEmulator):
    """The kubelet's cleanup between a write and its answer: the slice a create or update stored is deleted at once
    by another client, and the write is answered only after the watch has told both (the order a busy client can
    read them in: two connections)."""

    def __init__(self) -> None:
        super().__init__()
        self.races = 0  # writes to race, from now

    async def _send(self, writer: asyncio.StreamWriter, code: int, body: dict[str, Any], headers: str = "") -> bool:
        meta = body.get("metadata") or {}
        if self.races and code in (200, 201) and body.get("kind") == "ResourceSlice" and \
                meta.get("uid") != "uid-dry-run" and meta.get("name") in self.resourceslices.objects:
            self.races -= 1
            self.resourceslices.delete_behind(meta["name"])
            await asyncio.sleep(0.2)  # the emulated server's slowness: its answer after its watch events
        return await super()._send(writer, code, body, headers)


def test_a_slice_deleted_before_its_write_is_answered_is_written_again(make: Callable[..., Node]) -> None:
    """A write's answer read after the watch told that the slice was deleted is not taken for what the API holds:
    the slice is written again (it stayed missing until the watch was renewed, 5 min)."""
    node = make(api=RacingApi)
    emu = node.emu
    assert isinstance(emu, RacingApi)
    wait_until(lambda: len(node.published()) == 8, 10, "8 GPUs published")
    # A create raced: the kubelet's cleanup, the slice written again, and that one deleted at once too.
    node.call(lambda: setattr(emu, "races", 1))
    node.call(lambda: node.slices_api.wipe(NODE))
    wait_until(lambda: node.call(lambda: emu.races) == 0 and len(node.published()) == 8, 5,
               "the raced create written again")
    assert node.call(lambda: node.publisher.stale_answers) == 1, "the create's answer came after the delete"
    # An update raced: a change of health written, and the slice deleted before the answer.
    node.call(lambda: setattr(emu, "races", 1))
    node.set(2, "XID 79")
    devices = wait_until(lambda: node.call(lambda: emu.races) == 0 and taints(node.published(), "gpu-2")
                         and node.published(), 5, "the raced update written again")
    assert len(devices) == 8 and node.status().error == ""
    assert node.call(lambda: node.publisher.stale_answers) == 2, "the update's answer came after the delete"


@pytest.mark.parametrize("metadata", [
    {"ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "uid-node", "controller": True}]},
    {"labels": {"app.kubernetes.io/managed-by": "nvidia-dra-driver-gpu"}},
], ids=["owned-by-the-node", "another-manager"])
def test_slices_of_another_writer_are_left_alone_and_the_conflict_reported(make: Callable[..., Node],
                                                                           metadata: dict[str, Any]) -> None:
    """Another gpu.nvidia.com driver's slice appears on this node (NVIDIA's, started after us): nothing more is
    written, updated or deleted, its slice untouched, the conflict in the status (the bus); once it is gone the
    pool is ours again. Our slices carry our label."""
    node = make()
    wait_until(lambda: len(node.published()) == 8 and node.status().published, 10, "the pool published")
    ours = {s["metadata"]["name"] for s in node.slices()}
    assert {s["metadata"]["labels"]["app.kubernetes.io/managed-by"] for s in node.slices()} == {"gpu-device-plugin-dra"}
    since = len(node.call(lambda: list(node.emu.requests)))
    foreign = node.call(lambda: node.slices_api.create_behind(NODE, "gpu.nvidia.com", metadata))
    wait_until(lambda: "not written by this plugin" in node.status().error, 10, "the conflict reported")
    assert f"({foreign})" in node.status().error and not node.status().published
    node.set(2, "XID 79")  # a change that would be written: it is not, while the other driver is there
    wait_until(lambda: node.call(lambda: node.publisher._state is not None
                                 and node.publisher._state.devices[2].health == UNHEALTHY), 10, "the state heard")
    assert node.writes(since) == []
    assert {s["metadata"]["name"] for s in node.slices()} == ours | {foreign}
    node.call(lambda: node.slices_api.delete_behind(foreign))
    wait_until(lambda: node.status().published and taints(node.published(), "gpu-2"), 10, "the pool ours again")
    assert node.status().deleted_behind == 0 and node.status().error == ""
