"""The dra-plugin as a real process, with the kubelet's DRA side emulated (devtools.kubelet_simulator.dra:
plugin watcher, DRA calls, health stream, restarts) and the API server emulated (devtools.kube_api:
ResourceClaims), over real gRPC on unix sockets and real HTTP; the health bus is the real publisher with
the states a health-monitor sends. One program per scenario group; the rules of each refusal, the
checkpoint's format and its bounds are unit tests (tests/unit/test_dra_claims.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.bus.messages import DRA_SOCKET, HEALTHY, UNHEALTHY, DeviceState, DraState, HealthEvent, HealthState
from common.pb.dra.v1beta1 import api_pb2 as v1beta1
from common.pb.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from devtools.kube_api import KubeApiEmulator
from devtools.kubelet_simulator.dra import DraKubelet
from devtools.loop_thread import LoopThread
from services.cli import _dra_lines
from tests.conftest import Procs, wait_until
from tests.fakedriver import make_driver_root
from tests.integration.busclient import BusWatch
from tests.integration.fakes import FakeHealthMonitor, gpus

NODE = "node-1"
DRIVER = "gpu.nvidia.com"
CAPS = (39, 40)  # GPU 3's MIG device (GI 1, CI 0): its capability nodes


def devices() -> list[DeviceState]:
    """Five GPUs (minors 0-4); GPU 3 in MIG mode with one MIG device; GPU 4 the device plugin's (DRA_DEVICES)."""
    out = gpus(5)
    out[3] = dataclasses.replace(out[3], mig_enabled=True)
    out.append(DeviceState(id="MIG-3a1b2c3d-0000-4000-8000-000000000001", kind="mig", index="3:0",
                           name="NVIDIA H100 MIG 3g.40gb", health=HEALTHY, reason="", since=0.0, parent=out[3].id,
                           gpu_instance_id=1, compute_instance_id=0, profile="3g.40gb", caps=list(CAPS)))
    return out


class DraNode:
    """The health bus, the API and the kubelet emulated; the dra-plugin started and restarted by the test."""

    def __init__(self, procs: Procs, root: Path) -> None:
        self.procs, self.root = procs, root
        self.run = root / "run"
        self.cdi = root / "cdi"
        self.state_dir = root / "state"
        self.driver = make_driver_root(root / "driver", range(5), CAPS)
        self.devices = devices()
        self.monitor = FakeHealthMonitor(self.run, self.devices)
        self.lt = LoopThread()
        self.api = KubeApiEmulator()
        self.lt.run(self.api.start())
        (root / "kubeconfig").write_text(self.api.kubeconfig())
        self.kubelet = DraKubelet(root / "registry")
        self.lt.run(self.kubelet.start())
        self.env = {"GPU_PLUGIN_RUN_DIR": str(self.run), "GPU_PLUGIN_STATE_DIR": str(self.state_dir),
                    "CDI_SPEC_DIR": str(self.cdi), "NVIDIA_DRIVER_ROOT": str(self.driver),
                    "DRIVER_ROOT_CTR_PATH": str(root / "no-such-mount"), "KUBECONFIG": str(root / "kubeconfig"),
                    "NODE_NAME": NODE, "DRA_ENABLED": "true", "DRA_DEVICES": "0,1,2,3",
                    "KUBELET_REGISTRAR_DIRECTORY_PATH": str(root / "registry"),
                    "KUBELET_PLUGINS_DIRECTORY_PATH": str(root / "plugins")}
        self.p: subprocess.Popen[bytes] | None = None
        self.bus: BusWatch | None = None

    def start(self) -> None:
        self.p = self.procs.start("dra-plugin", "dra-plugin", env=self.env)
        if self.bus is not None:
            self.bus.close()
        self.bus = BusWatch(self.run / DRA_SOCKET, (DraState.TOPIC,))

    def registrations(self) -> int:
        return sum(n.registered for n in self.kubelet.notices)

    def wait_registered(self, count: int = 1) -> None:
        wait_until(lambda: self.call(self.registrations) >= count and DRIVER in self.call(lambda: self.kubelet.plugins),
                   15, f"registration {count} of {DRIVER} at the kubelet")

    def dra_state(self, predicate: Any, timeout: float = 10.0) -> DraState:
        assert self.bus is not None
        msg = self.bus.wait(lambda m: isinstance(m, DraState) and predicate(m), timeout)
        assert isinstance(msg, DraState)
        return msg

    def call(self, fn: Any) -> Any:
        return self.lt.call(fn)

    def claim(self, name: str, devs: list[str] | None, **kw: Any) -> tuple[str, str, str]:
        """A claim in the API allocated `devs`; the reference the kubelet sends for it."""
        obj = self.call(lambda: self.api.claims.add("default", name, devs, pool=kw.pop("pool", NODE), **kw))
        return "default", obj["metadata"]["uid"], name

    def prepare(self, *claims: tuple[str, str, str]) -> dict[str, Any]:
        resp = self.lt.run(self.kubelet.prepare(DRIVER, list(claims)), timeout=60)
        return {uid: resp.claims[uid] for uid in resp.claims}

    def unprepare(self, *claims: tuple[str, str, str]) -> dict[str, str]:
        resp = self.lt.run(self.kubelet.unprepare(DRIVER, list(claims)), timeout=60)
        return {uid: resp.claims[uid].error for uid in resp.claims}

    def health(self, device: str) -> str:
        return str(self.call(lambda: self.kubelet.device_health(DRIVER, NODE, device)))

    def set_health(self, i: int, health: str, reason: str = "") -> None:
        self.devices[i] = dataclasses.replace(self.devices[i], health=health, reason=reason)
        self.monitor.publish(list(self.devices))

    def spec(self, uid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.cdi / f"k8s.gpu.nvidia.com-claim_{uid}.json").read_text())
        return data

    def checkpoint(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "dra-checkpoint.json").read_text())["claims"]
        return data

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
        self.lt.run(self.kubelet.stop())
        self.lt.run(self.api.stop())
        self.lt.close()
        self.monitor.close()


@pytest.fixture
def node(procs: Procs, short_tmp: Path) -> Iterator[DraNode]:
    n = DraNode(procs, short_tmp)
    yield n
    n.close()


def devices_of(answer: Any) -> list[tuple[list[str], str, str, list[str]]]:
    return [(list(d.request_names), d.pool_name, d.device_name, list(d.cdi_device_ids)) for d in answer.devices]


def test_registration_prepare_health_and_unprepare(node: DraNode) -> None:
    node.start()
    node.wait_registered()
    notice = node.call(lambda: node.kubelet.notices[-1])
    assert (notice.driver, notice.service, notice.endpoint) == (DRIVER, "v1.DRAPlugin",
                                                                str(node.root / "plugins" / DRIVER / "dra.sock"))
    assert Path(notice.socket) == node.root / "registry" / "gpu.nvidia.com-reg.sock"
    state = node.dra_state(lambda s: s.registered and s.devices > 0)
    assert state.services == ["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth"]
    assert (state.node, state.devices, state.registration_error) == (NODE, 4, "")  # gpu-0..2 and the MIG device
    # The same program publishes them, the same four, in this node's ResourceSlices.
    node.dra_state(lambda s: s.slices is not None and s.slices.published and s.slices.devices == 4)
    published = node.call(lambda: node.api.resourceslices.of_node(NODE, DRIVER))
    assert sorted(d["name"] for sl in published for d in sl["spec"]["devices"]) == [
        "gpu-0", "gpu-1", "gpu-2", "gpu-3-mig-1-0"]

    # A claim for two GPUs: their CDI devices, and a spec with their nodes and the driver's files.
    two = node.claim("two-gpus", ["gpu-0", "gpu-1"])
    got = node.prepare(two)
    uid = two[1]
    assert got[uid].error == ""
    assert devices_of(got[uid]) == [
        (["gpus"], NODE, f"gpu-{i}", [f"k8s.gpu.nvidia.com/claim={uid}-gpu-{i}"]) for i in (0, 1)]
    spec = node.spec(uid)
    assert spec["kind"] == "k8s.gpu.nvidia.com/claim"
    assert [(d["name"], [(n["path"], n["hostPath"], n["minor"]) for n in d["containerEdits"]["deviceNodes"]])
            for d in spec["devices"]] == [
        (f"{uid}-gpu-{i}", [(f"/dev/nvidia{i}", f"{node.driver}/dev/nvidia{i}", i)]) for i in (0, 1)]
    assert "NVIDIA_VISIBLE_DEVICES=void" in spec["containerEdits"]["env"]
    assert any(m["containerPath"].endswith("libcuda.so.580.159.04") for m in spec["containerEdits"]["mounts"])

    # Idempotent: the same answer from the checkpoint, without reading the API again.
    reads = node.call(lambda: node.api.claims.reads)
    assert devices_of(node.prepare(two)[uid]) == devices_of(got[uid])
    assert node.call(lambda: node.api.claims.reads) == reads
    # The v1beta1 service (a 1.32 or 1.33 kubelet) answers the same.
    with grpc.insecure_channel(f"unix:{notice.endpoint}") as channel:
        old = v1beta1_grpc.DRAPluginStub(channel).NodePrepareResources(
            v1beta1.NodePrepareResourcesRequest(claims=[v1beta1.Claim(namespace="default", uid=uid, name="two-gpus")]),
            timeout=10)
    assert devices_of(old.claims[uid]) == devices_of(got[uid])

    # Refusals, each for its claim only; the good claim of the same call is prepared.
    node.set_health(2, UNHEALTHY, "XID 79 (GPU has fallen off the bus)")
    wait_until(lambda: node.health("gpu-2") == "Unhealthy", 5, "gpu-2 Unhealthy at the kubelet")
    mig = node.claim("mig", ["gpu-3-mig-1-0"])
    bad = {
        "unhealthy": node.claim("on-gpu-2", ["gpu-2"]),
        "in use": node.claim("also-gpu-1", ["gpu-1"]),
        "unknown": node.claim("gpu-9", ["gpu-9"]),
        "whole MIG GPU": node.claim("whole-gpu-3", ["gpu-3"]),
        "device plugin's": node.claim("gpu-4", ["gpu-4"]),
        "other node": node.claim("elsewhere", ["gpu-0"], pool="node-2"),
        "not allocated": node.claim("pending", None),
        "replaced": ("default", "00000000-0000-4000-8000-000000000000", "two-gpus"),
        "missing": ("default", "00000000-0000-4000-8000-000000000001", "no-such-claim"),
    }
    got = node.prepare(mig, *bad.values())
    expected = {"unhealthy": "is Unhealthy: XID 79", "in use": "is prepared for another claim, default/two-gpus",
                "unknown": "gpu-9 is not one this node offers", "whole MIG GPU": "gpu-3 is not one this node offers",
                "device plugin's": "gpu-4 is not one this node offers through DRA",
                "other node": 'pool \'node-2\' is not on this node', "not allocated": "is not allocated",
                "replaced": "got replaced", "missing": "not found"}
    for what, ref in bad.items():
        assert expected[what] in got[ref[1]].error, (what, got[ref[1]].error)
        assert not (node.cdi / f"k8s.gpu.nvidia.com-claim_{ref[1]}.json").exists()
    # A MIG device: its GPU's node and its two capability nodes.
    assert devices_of(got[mig[1]]) == [
        (["gpus"], NODE, "gpu-3-mig-1-0", [f"k8s.gpu.nvidia.com/claim={mig[1]}-gpu-3-mig-1-0"])]
    assert [n["path"] for n in node.spec(mig[1])["devices"][0]["containerEdits"]["deviceNodes"]] == [
        "/dev/nvidia3", f"/dev/nvidia-caps/nvidia-cap{CAPS[0]}", f"/dev/nvidia-caps/nvidia-cap{CAPS[1]}"]

    # The health stream: an XID 79 on a prepared GPU reaches the kubelet within a second.
    assert node.health("gpu-0") == "Healthy"
    at = time.monotonic()
    node.set_health(0, UNHEALTHY, "XID 79 (GPU has fallen off the bus)")
    wait_until(lambda: node.health("gpu-0") == "Unhealthy", 1.0, "gpu-0 Unhealthy at the kubelet within 1 s")
    seen_in = time.monotonic() - at
    node.set_health(0, HEALTHY)
    wait_until(lambda: node.health("gpu-0") == "Healthy", 5, "gpu-0 Healthy again")
    assert seen_in < 1.0, seen_in
    # The health-monitor loses NVML: the devices stay listed, Unknown, until it answers again.
    node.monitor.seq += 1
    node.monitor.send(HealthState(incarnation=node.monitor.incarnation, seq=node.monitor.seq, sent_at=time.time(),
                                  nvml_ok=False, error="NVML_ERROR_DRIVER_NOT_LOADED", driver_version=""))
    wait_until(lambda: node.health("gpu-1") == "Unknown", 5, "gpu-1 Unknown at the kubelet")
    node.monitor.publish(list(node.devices))
    wait_until(lambda: node.health("gpu-1") == "Healthy", 5, "gpu-1 Healthy again")

    # Unprepare: the spec and the record go; twice, and for a claim never prepared, is no error.
    assert node.unprepare(two) == {uid: ""}
    assert not (node.cdi / f"k8s.gpu.nvidia.com-claim_{uid}.json").exists()
    assert uid not in node.checkpoint() and mig[1] in node.checkpoint()
    assert node.unprepare(two, bad["missing"]) == {uid: "", bad["missing"][1]: ""}
    state = node.dra_state(lambda s: s.unprepares >= 3 and s.slices is not None and s.slices.tainted == 1)
    assert [c.name for c in state.claims] == ["mig"] and state.health_streams == 1
    shown = _dra_lines(state)
    assert shown[0] == (f"dra: gpu.nvidia.com on node {NODE}, registered with the kubelet; 4 devices (1 unhealthy); "
                        "1 claims prepared: default/mig; 1 health stream")
    assert shown[1].startswith("dra: ResourceSlices (resource.k8s.io/v1): published, generation ")
    assert "4 devices (1 tainted" in shown[1]
    assert shown[2] == "dra: last claim error: ResourceClaim default/no-such-claim not found"

    # Its registration socket removed (a cleanup of the directory): created again, registered again.
    (node.root / "registry" / "gpu.nvidia.com-reg.sock").unlink()
    node.wait_registered(2)

    # SIGTERM: the sockets go (the kubelet deregisters the plugin), the specs and the record stay.
    assert node.p is not None
    node.p.send_signal(signal.SIGTERM)
    assert node.p.wait(10) == 0
    wait_until(lambda: DRIVER not in node.call(lambda: node.kubelet.plugins), 5, "the plugin deregistered")
    assert not (node.root / "registry" / "gpu.nvidia.com-reg.sock").exists()
    assert (node.cdi / f"k8s.gpu.nvidia.com-claim_{mig[1]}.json").exists()


def test_restarts_of_the_program_and_the_kubelet_keep_prepared_claims(node: DraNode) -> None:
    node.start()
    node.wait_registered()
    first = node.claim("first", ["gpu-0"])
    assert node.prepare(first)[first[1]].error == ""

    # The program is killed while a prepare waits for the API: the kubelet's call fails, and asks again.
    second = node.claim("second", ["gpu-1"])
    node.call(lambda: setattr(node.api.claims, "delay_s", 30.0))
    pending = asyncio.run_coroutine_threadsafe(node.kubelet.prepare(DRIVER, [second]), node.lt.loop)
    wait_until(lambda: any(r.path.endswith("/resourceclaims/second") for r in node.call(lambda: node.api.requests)),
               10, "the plugin reading the second claim")
    assert node.p is not None
    node.p.kill()
    node.p.wait(10)
    with pytest.raises(grpc.RpcError):
        pending.result(10)
    node.call(node.api.claims.release)
    node.start()
    node.wait_registered(2)
    assert node.prepare(second)[second[1]].error == ""
    # The first claim's answer is the checkpoint's: the API is not asked (it now refuses every read).
    reads = node.call(lambda: node.api.claims.reads)
    node.call(lambda: node.api.failures.extend([500] * 5))
    assert devices_of(node.prepare(first)[first[1]]) == [
        (["gpus"], NODE, "gpu-0", [f"k8s.gpu.nvidia.com/claim={first[1]}-gpu-0"])]
    node.call(lambda: node.api.failures.clear())
    assert node.call(lambda: node.api.claims.reads) == reads
    assert sorted(node.checkpoint()) == sorted([first[1], second[1]])
    assert all(c["phase"] == "PrepareCompleted" for c in node.checkpoint().values())
    assert sorted(os.listdir(node.cdi)) == sorted(f"k8s.gpu.nvidia.com-claim_{u}.json" for u in (first[1], second[1]))

    # The kubelet restarts: it registers the plugin again, opens the health stream again, and asks for the
    # claims of its running pods again: the same answers, nothing prepared twice.
    node.dra_state(lambda s: s.health_streams == 1 and s.registered)
    node.lt.run(node.kubelet.restart())
    node.wait_registered(3)
    wait_until(lambda: node.health("gpu-1") == "Healthy", 5, "the health stream open again")
    assert devices_of(node.prepare(second)[second[1]]) == [
        (["gpus"], NODE, "gpu-1", [f"k8s.gpu.nvidia.com/claim={second[1]}-gpu-1"])]
    assert sorted(node.checkpoint()) == sorted([first[1], second[1]])
    state = node.dra_state(lambda s: s.info_calls >= 1 and len(s.claims) == 2)
    assert sorted(c.name for c in state.claims) == ["first", "second"]
    assert node.unprepare(first, second) == {first[1]: "", second[1]: ""}
    assert node.checkpoint() == {} and os.listdir(node.cdi) == []



@pytest.mark.parametrize(("env", "rc", "said"), [
    ({}, 0, "nothing to do: DRA is off"),
    ({"DRA_ENABLED": "maybe"}, 78, "DRA_ENABLED"),
    ({"DRA_ENABLED": "true"}, 78, "DRA_ENABLED needs NODE_NAME"),
], ids=["off", "not-a-boolean", "no-node-name"])
def test_off_by_default_and_refused_without_its_node(procs: Procs, short_tmp: Path, env: dict[str, str], rc: int,
                                                     said: str) -> None:
    """Started with its command line in supervisord.conf (plain words: no shell there), as supervisord starts it:
    off, it says so and exits 0 at once; on, a bad value or no NODE_NAME ends the container (78), named."""
    conf = (Path(__file__).parents[2] / "supervisord.conf").read_text()
    section = conf.split("[program:dra-plugin]", 1)[1]
    command = next(ln for ln in section.splitlines() if ln.startswith("command=")).removeprefix("command=").split()
    base = {k: v for k, v in procs.env.items() if k not in ("DRA_ENABLED", "NODE_NAME")}
    done = subprocess.run(command, env={**base, "GPU_PLUGIN_RUN_DIR": str(short_tmp / "run"),
                                        "KUBELET_REGISTRAR_DIRECTORY_PATH": str(short_tmp / "registry"), **env},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == rc, done.stderr
    assert said in done.stderr, done.stderr
    assert not (short_tmp / "registry").exists()


def test_a_live_socket_of_another_driver_is_left_alone_and_a_dead_one_replaced(node: DraNode) -> None:
    """NVIDIA's DRA driver on the same node serves the same paths: its live socket is not unlinked, the
    plugin ends the container (78) naming it; a socket nobody serves (a killed predecessor's) is replaced,
    owner-only."""
    import socket

    endpoint = node.root / "plugins" / DRIVER / "dra.sock"
    endpoint.parent.mkdir(parents=True)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(endpoint))
        other.listen(8)
        p = node.procs.start("dra-plugin", "dra-plugin", env=node.env)
        assert p.wait(timeout=15) == 78
        said = node.procs.log("dra-plugin")
        assert "is served by another live process, most likely NVIDIA's DRA driver (gpu.nvidia.com)" in said, said
        assert "never awaited" not in said, said
        assert endpoint.exists() and not (node.root / "registry" / f"{DRIVER}-reg.sock").exists()
    finally:
        other.close()  # the file stays: a dead socket now
    node.start()
    node.wait_registered()
    for path in (endpoint, node.root / "registry" / f"{DRIVER}-reg.sock"):
        assert path.stat().st_mode & 0o077 == 0, path  # made under umask 077: the bind is in the window


def test_stale_records_of_claims_gone_from_the_api_are_removed(short_tmp: Path) -> None:
    """A record whose unprepare never came: removed with its spec once the API says its claim is gone or
    its name is another claim's; a claim still there, a young record, or an API that does not answer
    clearly keeps its record. Over real HTTP to the emulated API server, the plugin in this process."""
    from common.dra_checkpoint import COMPLETED, Checkpoint, Entry, PreparedDevice
    from common.kubeapi import default_client
    from common.settings import resolve
    from services.dra_plugin.kubelet_devices import KubeletAllocations
    from services.dra_plugin.plugin import DraPlugin
    from tests.unit.test_dra_claims import Board

    settings = resolve(environ={"GPU_PLUGIN_STATE_DIR": str(short_tmp / "state"),
                                "CDI_SPEC_DIR": str(short_tmp / "cdi"), "GPU_PLUGIN_RUN_DIR": str(short_tmp / "run")})

    async def run() -> None:
        api = KubeApiEmulator()
        await api.start()
        try:
            (short_tmp / "kubeconfig").write_text(api.kubeconfig())
            kept = api.claims.add("default", "kept", ["gpu-0"])
            api.claims.add("default", "replaced", ["gpu-1"])  # the name now holds another claim
            old, young = 1.0, time.time()

            def entry(uid: str, name: str, since: float) -> Entry:
                dev = PreparedDevice(("gpus",), NODE, "gpu-0", "GPU-x", (f"k8s.gpu.nvidia.com/claim={uid}-gpu-0",))
                return Entry(uid, "default", name, COMPLETED, (dev,), since)

            uids = {n: f"7e5a3c1d-0000-4000-8000-00000000000{i}" for i, n in enumerate(["gone", "replaced", "young"])}
            store = Checkpoint(settings.state_dir)
            store.put(entry(kept["metadata"]["uid"], "kept", old))
            store.put(entry(uids["gone"], "gone", old))
            store.put(entry(uids["replaced"], "replaced", old))
            store.put(entry(uids["young"], "young", young))  # not in the API either, but too young to question
            settings.cdi_spec_dir.mkdir(parents=True)
            spec = settings.cdi_spec_dir / f"k8s.gpu.nvidia.com-claim_{uids['gone']}.json"
            spec.write_text("{}")
            plugin = DraPlugin(settings, NODE, Board(), short_tmp / "health.sock",  # type: ignore[arg-type]
                               KubeletAllocations(settings.device_plugin_dir),
                               http=lambda: default_client(str(short_tmp / "kubeconfig")))
            plugin.checkpoint.load()
            assert sorted(await plugin.clean_stale()) == sorted([uids["gone"], uids["replaced"]])
            assert sorted(plugin.checkpoint.entries) == sorted([kept["metadata"]["uid"], uids["young"]])
            assert not spec.exists()
            again = Checkpoint(settings.state_dir)
            again.load()
            assert again.entries == plugin.checkpoint.entries
            # The API away: nothing is removed on a guess.
            await api.stop()
            plugin.checkpoint.put(entry(uids["gone"], "gone", old))
            assert await plugin.clean_stale() == []
            assert uids["gone"] in plugin.checkpoint.entries
            if plugin._http is not None:
                await plugin._http.aclose()
        finally:
            await api.stop()

    asyncio.run(run())


def kubelet_checkpoint(path: Path, entries: list[tuple[str, list[str]]]) -> None:
    """The kubelet's device-manager checkpoint as it writes it (by rename): (resource, IDs) per container."""
    doc = {"Data": {"PodDeviceEntries": [
        {"PodUID": f"pod-{i}", "ContainerName": "main", "ResourceName": resource, "DeviceIDs": {"0": ids},
         "AllocResp": "Cg=="} for i, (resource, ids) in enumerate(entries)],
        "RegisteredDevices": {"nvidia.com/gpu": []}}, "Checksum": 1234}
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "tmp-checkpoint").write_text(json.dumps(doc))
    os.replace(path.parent / "tmp-checkpoint", path)


def test_gpus_a_device_plugin_pod_holds_are_withheld_until_it_lets_go(node: DraNode) -> None:
    """DRA turned on while an nvidia.com/gpu pod holds GPU 1 (a replica of it): gpu-1 is left out of the
    slices and a claim for it refused, named; when the kubelet's checkpoint no longer lists it, it is
    published and prepared. Another vendor's IDs are not ours."""
    dp = node.root / "dp"
    node.env["DEVICE_PLUGIN_DIR"] = str(dp)
    path = dp / "kubelet_internal_checkpoint"
    kubelet_checkpoint(path, [("nvidia.com/gpu", [f"{node.devices[1].id}::2"]), ("example.com/fpga", ["0"])])
    node.start()
    node.wait_registered()
    node.dra_state(lambda s: s.slices is not None and s.slices.published and s.slices.devices == 3)
    published = node.call(lambda: node.api.resourceslices.of_node(NODE, DRIVER))
    assert sorted(d["name"] for sl in published for d in sl["spec"]["devices"]) == ["gpu-0", "gpu-2", "gpu-3-mig-1-0"]
    claim = node.claim("on-gpu-1", ["gpu-1"])
    error = node.prepare(claim)[claim[1]].error
    assert f"device gpu-1 ({node.devices[1].id}) is held by a pod through the device plugin" in error, error
    kubelet_checkpoint(path, [("example.com/fpga", ["0"])])  # the pod is gone
    node.dra_state(lambda s: s.slices is not None and s.slices.published and s.slices.devices == 4)
    got = node.prepare(claim)[claim[1]]
    assert got.error == "" and [d.device_name for d in got.devices] == ["gpu-1"]


def test_a_silent_health_bus_makes_the_devices_unknown_until_it_speaks_again(node: DraNode) -> None:
    """The dra-plugin times the bus's silence from the last state (no turn every second at idle): past
    GPU_PLUGIN_STALE_AFTER the devices read Unknown at the kubelet; the next state makes them Healthy."""
    node.env["GPU_PLUGIN_STALE_AFTER"] = "3s"  # the fake monitor's heartbeat is 1 s: stale only when silent
    node.start()
    node.wait_registered()
    wait_until(lambda: node.health("gpu-1") == "Healthy", 5, "gpu-1 Healthy at the kubelet")
    node.monitor.close()  # the health-monitor gone silent
    wait_until(lambda: node.health("gpu-1") == "Unknown", 10, "gpu-1 Unknown once the bus is stale")
    node.monitor = FakeHealthMonitor(node.run, node.devices)
    node.monitor.publish(list(node.devices))
    wait_until(lambda: node.health("gpu-1") == "Healthy", 10, "gpu-1 Healthy once the bus speaks again")


def test_a_monitor_only_xid_reaches_the_slices_through_the_one_health_subscriber(node: DraNode) -> None:
    """The program follows the health bus once and hands each message to its ResourceSlices writer too: a
    monitor-only XID (an event, not a state) becomes an effect-None taint on that device's slice entry."""
    node.start()
    node.wait_registered()
    node.dra_state(lambda s: s.slices is not None and s.slices.published and s.slices.devices == 4)
    victim = next(d for d in node.devices if d.kind == "gpu" and d.index == "1")
    node.monitor.send(HealthEvent(time=time.time(), device=victim.id, event="xid", xid=94, reason="monitor-only"))

    def tainted() -> list[tuple[str, str, str]]:
        slices = node.call(lambda: node.api.resourceslices.of_node(NODE, DRIVER))
        devices = {d["name"]: d for sl in slices for d in sl["spec"]["devices"]}
        return [(t["key"], t.get("value", ""), t["effect"]) for t in devices.get("gpu-1", {}).get("taints", [])]

    wait_until(lambda: tainted() == [("gpu.nvidia.com/xid", "94", "None")], 10, "the monitor-only XID's taint")
