"""Drop-in compatibility, end to end at the kubelet simulator: the same config files and
environment as NVIDIA's plugin give the same resources and Allocate answers, and preferred
allocation follows the topology."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HealthState
from common.lifecycle import EX_CONFIG
from tests.conftest import Procs, wait_until
from tests.fakedriver import VERSION, make_driver_root
from tests.integration.busclient import BusWatch
from tests.integration.node import Node, fleet_copy

GPU = "nvidia.com/gpu"


def gpu_order(node: Node) -> list[str]:
    with BusWatch(node.run / "health.sock", ("health.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, HealthState) and m.nvml_ok)
    assert isinstance(msg, HealthState)
    return [d.id for d in msg.devices if d.kind == "gpu"]


def preferred(node: Node, resource: str, available: list[str], must: list[str], size: int) -> list[str]:
    return node.lt.run(node.sim.preferred(resource, available, must, size))


def test_preferred_allocation_follows_the_topology(make_node: Any) -> None:
    node = make_node()
    node.wait_devices()
    g = gpu_order(node)
    # The DGX fleet: all pairs share 18 NVLinks through NVSwitches; (0,1), (2,3), ... sit under
    # one PCIe switch pair, 0-3 on NUMA node 0 and 4-7 on node 1.
    shuffled = [g[i] for i in (6, 3, 0, 5, 2, 7, 1, 4)]
    assert set(preferred(node, GPU, shuffled, [], 2)) in ({g[0], g[1]}, {g[2], g[3]}, {g[4], g[5]}, {g[6], g[7]})
    assert set(preferred(node, GPU, shuffled, [], 4)) in (set(g[:4]), set(g[4:]))
    assert preferred(node, GPU, shuffled, [g[5]], 2) == [g[5], g[4]]
    assert set(preferred(node, GPU, [g[0], g[2], g[4], g[6]], [], 2)) == {g[0], g[2]}, "same NUMA node wins"


def test_time_slicing_replicas_share_their_gpus_health(make_node: Any) -> None:
    config = """version: v1
sharing:
  timeSlicing:
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""
    node = make_node(config=config)
    devices = node.wait_devices(count=32)
    g = gpu_order(node)
    assert sorted(devices) == sorted(f"{u}::{n}" for u in g for n in range(4))
    node.inject("xid", g[2], "79")
    wait_until(lambda: [i for i, h in node.devices().items() if h == "Unhealthy"] == [f"{g[2]}::{n}" for n in range(4)],
               15, "all four replicas of GPU 2 unhealthy")
    one = node.lt.run(node.sim.allocate(GPU, [f"{g[0]}::1"]))
    assert dict(one.envs) == {"NVIDIA_VISIBLE_DEVICES": g[0]}
    with pytest.raises(Exception, match="maximum request size for shared resources is 1; found 2"):
        node.lt.run(node.sim.allocate(GPU, [f"{g[0]}::1", f"{g[1]}::1"]))
    available = [f"{u}::{n}" for u in g[:2] for n in range(4)]
    spread = preferred(node, GPU, available, [], 2)
    assert {i.split("::")[0] for i in spread} == {g[0], g[1]}, "distributed: two different GPUs"


def test_rename_by_default_serves_a_shared_resource(make_node: Any) -> None:
    config = """version: v1
sharing:
  timeSlicing:
    renameByDefault: true
    resources:
    - name: nvidia.com/gpu
      replicas: 2
      devices: [0, 1]
"""
    node = make_node(config=config, SHARED_DEVICES_ALLOCATION_POLICY="packed")
    shared = node.wait_devices("nvidia.com/gpu.shared", count=4)
    node.wait_devices(GPU, count=6)
    assert (node.dp / "nvidia-gpu.shared.sock").exists()
    g = gpu_order(node)
    assert sorted(shared) == sorted(f"{u}::{n}" for u in g[:2] for n in range(2))
    packed = preferred(node, "nvidia.com/gpu.shared", sorted(shared), [], 2)
    assert len({i.split("::")[0] for i in packed}) == 1, "packed: one GPU"


def test_mig_single_strategy(make_node: Any, short_tmp: Path) -> None:
    def only_gpu7(d: dict[str, Any]) -> None:
        d["devices"] = [d["devices"][7]]

    node = make_node(fleet_copy(short_tmp, "dgx-h100-8-mig", only_gpu7), MIG_STRATEGY="single")
    devices = node.wait_devices(count=7)
    assert all(i.startswith("MIG-") for i in devices)
    resp = node.lt.run(node.sim.allocate(GPU, sorted(devices)[:1]))
    assert resp.envs["NVIDIA_VISIBLE_DEVICES"].startswith("MIG-")


def test_mig_single_strategy_rejects_a_mixed_node_with_a_clear_error(procs: Procs, short_tmp: Path) -> None:
    node = Node(procs, short_tmp, "dgx-h100-8-mig", MIG_STRATEGY="single")
    try:
        assert node.services["plugin-server"].wait(30) == EX_CONFIG
        assert "MIG strategy single: all GPUs must have MIG enabled" in procs.log("plugin-server")
    finally:
        node.close()


def test_cdi_strategies_write_the_spec_and_answer_with_cdi_names(make_node: Any, short_tmp: Path) -> None:
    dev_root = make_driver_root(short_tmp / "driver", range(8))
    cdi_dir = short_tmp / "cdi"
    node = make_node(DEVICE_LIST_STRATEGY="cdi-annotations,cdi-cri", NVIDIA_DRIVER_ROOT=str(dev_root),
                     CDI_SPEC_DIR=str(cdi_dir))
    node.wait_devices()
    g = gpu_order(node)
    spec = json.loads((cdi_dir / "k8s.device-plugin.nvidia.com-gpu.json").read_text())
    assert spec["kind"] == "k8s.device-plugin.nvidia.com/gpu" and spec["cdiVersion"] == "0.5.0"
    assert sorted(d["name"] for d in spec["devices"]) == sorted(g)
    mounts = [m["containerPath"] for m in spec["containerEdits"]["mounts"]]
    assert f"/usr/lib/x86_64-linux-gnu/libcuda.so.{VERSION}" in mounts, "the driver's libraries are in the spec"
    resp = node.lt.run(node.sim.allocate(GPU, g[:2]))
    names = [f"k8s.device-plugin.nvidia.com/gpu={u}" for u in g[:2]]
    assert [c.name for c in resp.cdi_devices] == names
    ((key, value),) = resp.annotations.items()
    assert key.startswith("cdi.k8s.io/nvidia-device-plugin_") and value == ",".join(names)
    assert "NVIDIA_VISIBLE_DEVICES" not in resp.envs
    node.procs.stop(node.services["plugin-server"])
    assert not (cdi_dir / "k8s.device-plugin.nvidia.com-gpu.json").exists(), "removed on exit"


def test_cdi_without_driver_files_fails_at_start(procs: Procs, short_tmp: Path) -> None:
    node = Node(procs, short_tmp, DEVICE_LIST_STRATEGY="cdi-cri", NVIDIA_DRIVER_ROOT=str(short_tmp / "nodriver"))
    try:
        assert node.services["plugin-server"].wait(30) == EX_CONFIG
        log = procs.log("plugin-server")
        assert "nvidiactl" in log and "no libcuda.so.* or libnvidia-ml.so.*" in log
    finally:
        node.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("version: v1\nflags:\n  migStrategy: bogus\n", "mig_strategy (config file key flags.migStrategy): 'bogus'"),
        ("version: v2\n", "version: 'v2' is not supported"),
        ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 1\n",
         "sharing.timeSlicing.resources[0].replicas: 1 must be an integer >= 2"),
        ("version: v1\nflags:\n  plugin:\n    deviceListStrategy: [envvar, bogus]\n", "'bogus' is not one of"),
    ],
    ids=["mig-strategy", "version", "replicas", "list-strategy"],
)
def test_a_bad_config_file_stops_every_service_naming_the_key(
    procs: Procs, short_tmp: Path, config: str, message: str
) -> None:
    path = short_tmp / "bad.yaml"
    path.write_text(config)
    for service in ("health-monitor", "plugin-server", "registrar"):
        p = procs.start(service, service, env={"CONFIG_FILE": str(path), "GPU_PLUGIN_RUN_DIR": str(short_tmp / "r")})
        assert p.wait(30) == EX_CONFIG, "a bad setting is permanent: supervisord must not restart the service"
        assert message in procs.log(service), procs.log(service)


def test_mps_is_served_under_nvidia_s_name(make_node: Any, short_tmp: Path) -> None:
    # This config used to be accepted and served without sharing ("MPS is not served yet").
    from tests.integration.test_mps import mps_node

    config = "version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n"
    node = mps_node(make_node, short_tmp, config=config)
    devices = node.wait_devices(count=16, timeout=60)
    assert all("::" in d for d in devices)
    assert "MPS is not served yet" not in node.procs.log("plugin-server")
