"""The kubelet's device-manager checkpoint as the dra-plugin reads it: which IDs of ours it holds, and the
GPUs they name (services/dra_plugin/kubelet_devices.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.bus.messages import HealthState
from common.settings import DraDevices
from services.dra_plugin.claims import Allocated, ClaimError, choose
from services.dra_plugin.kubelet_devices import KubeletAllocations, KubeletCheckpointError, device_ids, held_gpus
from services.dra_plugin.names import offered
from services.dra_plugin.pool import build_pool
from tests.unit.test_dra_claims import REF, gpu, mig


def doc(*entries: dict[str, object]) -> bytes:
    return json.dumps({"Data": {"PodDeviceEntries": list(entries), "RegisteredDevices": {}}, "Checksum": 1}).encode()


def entry(resource: str, ids: object) -> dict[str, object]:
    return {"PodUID": "p", "ContainerName": "c", "ResourceName": resource, "DeviceIDs": ids, "AllocResp": ""}


def test_the_ids_of_our_resources_per_numa_node_or_listed_replicas_stripped() -> None:
    got = device_ids(doc(entry("nvidia.com/gpu", {"0": ["GPU-a::1", "GPU-a::2"], "1": ["GPU-b"]}),
                         entry("nvidia.com/mig-1g.10gb", ["MIG-c"]),  # before 1.20: a plain list
                         entry("example.com/fpga", {"0": ["GPU-z"]})))  # another vendor's
    assert got == {"GPU-a", "GPU-b", "MIG-c"}
    assert device_ids(b'{"Data": {"PodDeviceEntries": null, "RegisteredDevices": null}, "Checksum": 0}') == set()


@pytest.mark.parametrize(("data", "why"), [
    (b"{", "not JSON"),
    (b'{"Data": []}', "PodDeviceEntries: not a list"),
    (doc(entry("nvidia.com/gpu", {"0": [1]})), r"DeviceIDs: not lists of strings"),
])
def test_a_checkpoint_that_is_not_the_kubelets_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(KubeletCheckpointError, match=why):
        device_ids(data)


def test_ids_name_gpus_by_uuid_or_index_and_a_mig_device_its_gpu() -> None:
    g = [gpu(0), gpu(1), gpu(2, mig_enabled=True), gpu(3)]
    m = mig(g[2], 1, 0)
    devices = [*g, m]
    assert held_gpus({g[0].id, m.id}, devices) == {g[0].id, g[2].id}
    assert held_gpus({"1", "3:5"}, devices) == {g[1].id, g[3].id}  # index strategy; a MIG index its GPU's
    assert held_gpus({"GPU-unknown", "9"}, devices) == set()


def test_a_held_gpu_is_not_published_nor_prepared() -> None:
    devices = [gpu(0), gpu(1)]
    state = HealthState(nvml_ok=True, error="", driver_version="580.159.04", devices=devices)
    pool = build_pool(state, "node-1", DraDevices(every=True), kubelet_held=frozenset({devices[1].id}))
    assert [d["name"] for d in pool.devices] == ["gpu-0"] and pool.withheld == ("gpu-1",)
    with pytest.raises(ClaimError, match=r"gpu-1 .* is held by a pod through the device plugin"):
        choose([Allocated("gpus", "node-1", "gpu-1")], offered(devices), {}, REF, frozenset({devices[1].id}))


def test_an_unreadable_checkpoint_keeps_the_last_ids_and_is_logged_once(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    store = KubeletAllocations(tmp_path)
    assert not store.read() and store.ids == set()  # none: nothing held
    (tmp_path / "kubelet_internal_checkpoint").write_bytes(doc(entry("nvidia.com/gpu", {"0": ["GPU-a"]})))
    assert store.read() and store.ids == {"GPU-a"}
    (tmp_path / "kubelet_internal_checkpoint").write_bytes(b"{")
    assert not store.read() and not store.read() and store.ids == {"GPU-a"}
    assert sum("cannot be read" in r.message for r in caplog.records) == 1
