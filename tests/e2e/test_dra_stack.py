"""End to end: DRA beside the device plugin under the shipped supervisord.conf, on a simulated 8-GPU box: DRA on
for three GPUs (DRA_DEVICES, as the chart's dra.devices sets it), the device plugin's kubelet simulator (a process)
holding the other five, the kubelet's DRA side (devtools.kubelet_simulator.dra) and the API server
(devtools.kube_api) emulated in the test's process. One stack: registration, the node's ResourceSlices, a claim
prepared, an XID as a taint and on the health stream, and the pod's SIGTERM."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devtools.devstack import RESOURCE, DevStack
from devtools.kube_api import KubeApiEmulator
from devtools.kubelet_simulator.dra import DraKubelet
from devtools.loop_thread import LoopThread
from devtools.nvml_sim import fleet_path
from tests.conftest import wait_until
from tests.e2e.conftest import held
from tests.fakedriver import make_driver_root

pytestmark = pytest.mark.e2e

NODE = "node-1"
DRIVER = "gpu.nvidia.com"
FLEET = "dgx-h100-8"
DRA = (5, 6, 7)  # NVML indexes: DRA_DEVICES


def test_dra_beside_the_device_plugin_prepares_taints_streams_health_and_stops_with_0() -> None:
    uuids = [d["uuid"] for d in json.loads(fleet_path(FLEET).read_text())["devices"]]
    lt = LoopThread()
    api = KubeApiEmulator()
    lt.run(api.start())
    stack = DevStack(fleet=FLEET)
    (stack.root / "kubeconfig").write_text(api.kubeconfig())
    # The claims' CDI specs read the GPUs' device nodes under the driver root: a stand-in with real nodes.
    driver = make_driver_root(stack.root / "driver", range(len(uuids)))
    stack.env.update({
        "DRA_ENABLED": "true", "DRA_DEVICES": ",".join(map(str, DRA)), "NODE_NAME": NODE,
        "KUBECONFIG": str(stack.root / "kubeconfig"),
        "KUBELET_REGISTRAR_DIRECTORY_PATH": str(stack.root / "registry"),
        "KUBELET_PLUGINS_DIRECTORY_PATH": str(stack.root / "plugins"),
        "CDI_SPEC_DIR": str(stack.root / "cdi"), "NVIDIA_DRIVER_ROOT": str(driver),
        "DRIVER_ROOT_CTR_PATH": str(stack.root / "no-such-mount")})
    kubelet = DraKubelet(stack.root / "registry")
    lt.run(kubelet.start())

    def call(fn: Any) -> Any:
        return lt.call(fn)

    def published() -> dict[str, dict[str, Any]]:
        return {d["name"]: d for s in call(lambda: api.resourceslices.of_node(NODE, DRIVER))
                for d in s["spec"]["devices"]}

    failed = True
    try:
        stack.start()
        # The device plugin offers the five GPUs DRA does not serve, and only those.
        state = held(stack, capacity=5, allocatable=5)
        assert sorted(state["resources"][RESOURCE]["devices"]) == sorted(u for i, u in enumerate(uuids)
                                                                         if i not in DRA)
        # The dra-plugin registers with the kubelet's plugin watcher and publishes exactly the DRA GPUs.
        # The kubelet's notice is recorded once the plugin has been told, after the plugin is taken in.
        notices = wait_until(lambda: call(lambda: list(kubelet.notices)), 20, "the dra-plugin's registration")
        assert [(n.driver, n.service, n.registered) for n in notices] == [(DRIVER, "v1.DRAPlugin", True)]
        assert DRIVER in call(lambda: kubelet.plugins)
        devices = wait_until(lambda: len(published()) == len(DRA) and published(), 20, "the DRA GPUs' slices")
        assert {name: d["attributes"]["uuid"]["string"] for name, d in devices.items()} == {
            f"gpu-{i}": uuids[i] for i in DRA}
        assert not any(d.get("taints") for d in devices.values())

        # A claim for two GPUs, allocated in the API: prepared, its CDI spec naming their device nodes.
        claim = call(lambda: api.claims.add("default", "two-gpus", ["gpu-5", "gpu-6"], pool=NODE))
        ref = ("default", claim["metadata"]["uid"], "two-gpus")
        answer = lt.run(kubelet.prepare(DRIVER, [ref]), timeout=60).claims[ref[1]]
        assert answer.error == ""
        assert [(d.device_name, list(d.cdi_device_ids)) for d in answer.devices] == [
            (f"gpu-{i}", [f"k8s.gpu.nvidia.com/claim={ref[1]}-gpu-{i}"]) for i in (5, 6)]
        spec = json.loads((stack.root / "cdi" / f"k8s.gpu.nvidia.com-claim_{ref[1]}.json").read_text())
        assert [[n["path"] for n in d["containerEdits"]["deviceNodes"]] for d in spec["devices"]] == [
            ["/dev/nvidia5"], ["/dev/nvidia6"]]
        wait_until(lambda: call(lambda: kubelet.device_health(DRIVER, NODE, "gpu-6")) == "Healthy", 10,
                   "gpu-6 Healthy on the health stream")

        # XID 79 on a claimed DRA GPU, from the simulated driver: a taint on it in its slice, and Unhealthy on
        # the kubelet's DRA health stream (a pod's status); the device plugin's GPUs are untouched.
        stack.inject("xid", uuids[6], "79")
        devices = wait_until(lambda: published().get("gpu-6", {}).get("taints") and published(), 10,
                             "the XID 79 taint on gpu-6")
        assert [(t["key"], t["value"], t["effect"]) for t in devices["gpu-6"]["taints"]] == [
            ("gpu.nvidia.com/xid", "79", "NoSchedule")]
        assert not any(d.get("taints") for name, d in devices.items() if name != "gpu-6")
        wait_until(lambda: call(lambda: kubelet.device_health(DRIVER, NODE, "gpu-6")) == "Unhealthy", 10,
                   "gpu-6 Unhealthy on the health stream")
        assert call(lambda: kubelet.device_health(DRIVER, NODE, "gpu-5")) == "Healthy"
        held(stack, capacity=5, allocatable=5)

        # The pod's SIGTERM: every program stops and the entry point exits 0; the dra-plugin's sockets go, so
        # the kubelet deregisters it; the slices stay for a restart to adopt.
        assert stack.stop() == 0, stack.logs()
        wait_until(lambda: DRIVER not in call(lambda: kubelet.plugins), 10, "the dra-plugin deregistered")
        assert list((stack.root / "registry").iterdir()) == []
        assert len(published()) == len(DRA)
        failed = False
    finally:
        stack.stop()
        lt.run(kubelet.stop())  # before its directory goes with the stack's
        lt.run(api.stop())
        lt.close()
        stack.finish(failed)
