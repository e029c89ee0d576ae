"""The DRA pool as plain code: health states in, ResourceSlice contents out (services.dra_plugin.pool).
Devices come from the simulated fleets as the health-monitor discovers them; the attribute names and
types are NVIDIA's DRA driver's (kubernetes-sigs/dra-driver-nvidia-gpu, cmd/gpu-kubelet-plugin)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, HealthEvent, HealthState
from common.settings import DraDevices, resolve
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.dra_plugin import pool as dp
from services.dra_plugin.pool import Capabilities, Held, MonitorOnlyXids, build_pool, plan, served
from services.health_monitor.discovery import discover
from services.plugin_server.device_table import build_resources

NODE = "gpu-node-7"
ALL = DraDevices(every=True)
SINCE = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NVIDIA_GPU_ATTRIBUTES = {  # name -> value type, as NVIDIA's GpuInfo.Attributes() and its earlier releases
    "type": "string", "uuid": "string", "productName": "string", "architecture": "string",
    "cudaComputeCapability": "version", "driverVersion": "version", "cudaDriverVersion": "version",
    "resource.kubernetes.io/pciBusID": "string", "pcieBusID": "string", "index": "int", "minor": "int",
}
NVIDIA_MIG_ATTRIBUTES = {  # CommonAttributesMig plus uuid, and the earlier releases' indexes
    "type": "string", "uuid": "string", "parentUUID": "string", "profile": "string", "productName": "string",
    "architecture": "string", "cudaComputeCapability": "version", "driverVersion": "version",
    "cudaDriverVersion": "version", "resource.kubernetes.io/pciBusID": "string", "pcieBusID": "string",
    "index": "int", "parentIndex": "int",
}
NVIDIA_MIG_CAPACITY = {"multiprocessors", "copyEngines", "decoders", "encoders", "jpegEngines", "ofaEngines", "memory"}


def fleet(name: str) -> list[DeviceState]:
    nvml = SimulatedNvml(fleet_path(name))
    nvml.init()
    try:
        return [dataclasses.replace(d, since=SINCE) for d in discover(nvml, SINCE).devices]
    finally:
        nvml.shutdown()


@pytest.fixture(scope="module")
def h100() -> list[DeviceState]:
    return fleet("dgx-h100-8")


@pytest.fixture(scope="module")
def mig() -> list[DeviceState]:
    return fleet("dgx-h100-8-mig")


def state(devices: list[DeviceState], **kw: Any) -> HealthState:
    return HealthState(incarnation="h", seq=1, sent_at=1.0, nvml_ok=True, error="", driver_version="580.159.04",
                       devices=devices, cuda_driver_version=13000, **kw)


def by_name(pool: dp.Pool) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in pool.devices}


def types_of(attrs: dict[str, dict[str, Any]]) -> dict[str, str]:
    out = {}
    for name, value in attrs.items():
        assert len(value) == 1, f"{name}: exactly one of int, bool, string, version"
        out[name] = next(iter(value))
    return out


def unhealthy(d: DeviceState, reason: str, cordoned: bool = False) -> DeviceState:
    return dataclasses.replace(d, health=UNHEALTHY, reason=reason, cordoned=cordoned, since=SINCE + 60)


# -- devices ----------------------------------------------------------------------------------------

def test_eight_gpus_with_nvidias_attribute_names(h100: list[DeviceState]) -> None:
    pool = build_pool(state(h100), NODE, ALL)
    devices = by_name(pool)
    assert list(devices) == [f"gpu-{i}" for i in range(8)]
    gpu0 = devices["gpu-0"]
    assert {k: v for k, v in types_of(gpu0["attributes"]).items() if k != "resource.kubernetes.io/numaNode"} \
        == NVIDIA_GPU_ATTRIBUTES
    a = {k: next(iter(v.values())) for k, v in gpu0["attributes"].items()}
    assert a == {
        "type": "gpu", "uuid": "GPU-f039c560-d7cc-5c7c-54f1-dd371541d642", "productName": "NVIDIA H100 80GB HBM3",
        "architecture": "Hopper", "cudaComputeCapability": "9.0.0", "driverVersion": "580.159.4",
        "cudaDriverVersion": "13.0.0", "resource.kubernetes.io/pciBusID": "0000:18:00.0",
        "pcieBusID": "0000:18:00.0", "index": 0, "minor": 0, "resource.kubernetes.io/numaNode": 0,
    }
    # 85520809984 bytes, as NVIDIA's resource.NewQuantity(memoryBytes, BinarySI) reads back: 81559Mi
    assert gpu0["capacity"] == {"memory": {"value": "81559Mi"}}
    assert "taints" not in gpu0
    assert [len(c) for c in pool.chunks] == [8]
    spec = pool.spec(pool.chunks[0], 3, 1)
    assert spec["driver"] == "gpu.nvidia.com" and spec["nodeName"] == NODE
    assert spec["pool"] == {"name": NODE, "generation": 3, "resourceSliceCount": 1}


def test_mig_enabled_gpus_offer_their_mig_devices(mig: list[DeviceState]) -> None:
    devices = by_name(build_pool(state(mig), NODE, ALL))
    assert [n for n in devices if "-mig-" not in n] == [f"gpu-{i}" for i in range(6)]  # 6 and 7: MIG mode
    migs = [n for n in devices if "-mig-" in n]
    assert migs == ["gpu-6-mig-1-0", "gpu-6-mig-2-0", *(f"gpu-7-mig-{gi}-0" for gi in range(7, 14))]
    m = devices["gpu-6-mig-2-0"]
    assert {k: v for k, v in types_of(m["attributes"]).items() if k != "resource.kubernetes.io/numaNode"} \
        == NVIDIA_MIG_ATTRIBUTES
    a = {k: next(iter(v.values())) for k, v in m["attributes"].items()}
    assert a["type"] == "mig" and a["uuid"] == "MIG-9b30e738-d772-c048-4f47-77a9a2fe0a0f"
    assert a["parentUUID"] == "GPU-930bc548-4e27-0432-876f-a3553ef2f53f" and a["profile"] == "3g.40gb"
    assert (a["productName"], a["architecture"], a["cudaComputeCapability"]) == ("NVIDIA H100 80GB HBM3", "Hopper",
                                                                                 "9.0.0")
    assert (a["index"], a["parentIndex"], a["resource.kubernetes.io/pciBusID"]) == (1, 6, "0000:ba:00.0")
    assert set(m["capacity"]) == NVIDIA_MIG_CAPACITY
    assert {k: v["value"] for k, v in m["capacity"].items()} == {
        "multiprocessors": "60", "copyEngines": "3", "decoders": "3", "encoders": "0", "jpegEngines": "3",
        "ofaEngines": "0", "memory": "40448Mi"}
    for d in devices.values():  # the API's bound
        assert len(d["attributes"]) + len(d["capacity"]) <= 32


def test_dra_and_the_device_plugin_split_the_gpus(mig: list[DeviceState]) -> None:
    """Under every selection, each GPU (or its MIG devices) is offered by exactly one of the two."""
    for selection in ("none", "all", "0,7", "6", "GPU-f039c560-d7cc-5c7c-54f1-dd371541d642,3"):
        settings = resolve(environ={"MIG_STRATEGY": "mixed", "DRA_DEVICES": selection})
        plugin = {d.id for devices in build_resources(state(mig), settings).values() for d in devices}
        dra = {next(iter(d["attributes"]["uuid"].values()))
               for d in build_pool(state(mig), NODE, settings.dra_devices).devices}
        assert not plugin & dra, selection
        assert plugin | dra == {d.id for d in served(mig, ALL).values()}, selection
    assert build_pool(state(mig), NODE, DraDevices()).chunks == []  # none: no slice at all


def test_more_than_128_devices_split_into_slices_of_one_pool() -> None:
    gpus = [DeviceState(id=f"GPU-{i:08x}-0000-0000-0000-000000000000", kind="gpu", index=str(i), name="NVIDIA H100",
                        health=HEALTHY, reason="", since=SINCE, minor=i, pci_bus_id=f"00000001:{i:02x}:00.0",
                        memory_mb=81559, compute_major=9, compute_minor=0) for i in range(150)]
    pool = build_pool(state(gpus), NODE, ALL)
    assert [len(c) for c in pool.chunks] == [128, 22]
    writes, generation = plan([], pool)
    assert [w.verb for w in writes] == ["create", "create"] and generation == 1
    assert [w.spec["pool"] for w in writes if w.spec] == [{"name": NODE, "generation": 1, "resourceSliceCount": 2}] * 2
    names = [d["name"] for w in writes if w.spec for d in w.spec["devices"]]
    assert names == [f"gpu-{i}" for i in range(150)]
    # A tainted device lowers the API's bound to 64 per slice.
    gpus[3] = unhealthy(gpus[3], "XID 79")
    assert [len(c) for c in build_pool(state(gpus), NODE, ALL).chunks] == [64, 64, 22]


# -- health as taints --------------------------------------------------------------------------------

def taints(pool: dp.Pool, name: str) -> list[dict[str, Any]]:
    return list(by_name(pool)[name].get("taints", []))


def test_xid_79_taints_and_recovery_clears(h100: list[DeviceState]) -> None:
    faulty = [unhealthy(d, "XID 79") if d.index == "2" else d for d in h100]
    pool = build_pool(state(faulty), NODE, ALL)
    assert taints(pool, "gpu-2") == [{"key": "gpu.nvidia.com/xid", "value": "79", "effect": "NoSchedule",
                                      "timeAdded": "2026-01-01T00:01:00Z"}]
    assert pool.tainted == 1 and all("taints" not in d for d in pool.devices if d["name"] != "gpu-2")
    recovered = [dataclasses.replace(d, health=HEALTHY, reason="recovered") if d.index == "2" else d for d in faulty]
    assert build_pool(state(recovered), NODE, ALL).tainted == 0


@pytest.mark.parametrize(("reason", "cordoned", "expected"), [
    ("ECC DBE", False, [("gpu.nvidia.com/ecc", "dbe")]),
    ("GPU lost", False, [("gpu.nvidia.com/gpu-lost", "")]),
    ("NVML nvmlDeviceGetPciInfo hung for 12 s", False, [("gpu.nvidia.com/nvml-hung", "nvmlDeviceGetPciInfo")]),
    ("probe failed: NVMLError_Unknown", False, [("gpu.nvidia.com/probe-failed", "")]),
    ("row remap pending (GPU reset needed)", False, [("gpu.nvidia.com/row-remap", "pending")]),
    ("row-remap failure", False, [("gpu.nvidia.com/row-remap", "failed")]),
    ("retired pages pending (GPU reset needed)", False, [("gpu.nvidia.com/retired-pages", "")]),
    ("something new", False, [("gpu.nvidia.com/unhealthy", "")]),
    ("XID 48; driver advises: reset the GPU", False, [("gpu.nvidia.com/xid", "48")]),
    ("cordoned: fan noise; loud", True, [("gpu.nvidia.com/cordon", "")]),
    ("cordoned: fan; XID 79; ECC DBE", True,
     [("gpu.nvidia.com/xid", "79"), ("gpu.nvidia.com/ecc", "dbe"), ("gpu.nvidia.com/cordon", "")]),
    ("XID 79; XID 48", False, [("gpu.nvidia.com/xid", "79")]),  # one taint per key: the first
])
def test_each_cause_its_taint(h100: list[DeviceState], reason: str, cordoned: bool,
                              expected: list[tuple[str, str]]) -> None:
    devices = [unhealthy(h100[0], reason, cordoned), *h100[1:]]
    got = taints(build_pool(state(devices), NODE, ALL), "gpu-0")
    assert [(t["key"], t.get("value", "")) for t in got] == expected
    assert {t["effect"] for t in got} == {"NoSchedule"}


def test_a_mig_device_is_tainted_for_its_own_reason(mig: list[DeviceState]) -> None:
    devices = [unhealthy(d, "XID 79") if d.id == "GPU-5a20cdd2-88f7-7505-15b6-a96180636b05" or
               d.parent == "GPU-5a20cdd2-88f7-7505-15b6-a96180636b05" else d for d in mig]
    pool = build_pool(state(devices), NODE, ALL)
    assert {d["name"] for d in pool.devices if "taints" in d} == {f"gpu-7-mig-{gi}-0" for gi in range(7, 14)}


def test_monitor_only_xids_are_shown_with_effect_none(h100: list[DeviceState]) -> None:
    xids = MonitorOnlyXids(keep_s=600.0)
    event = HealthEvent(time=SINCE + 5, device=h100[1].id, event="xid", xid=94, reason="monitor-only")
    assert xids.on_event(event) and not xids.on_event(dataclasses.replace(event, time=SINCE + 50))  # a repeat
    assert not xids.on_event(dataclasses.replace(event, reason="fatal"))  # the state says those
    pool = build_pool(state(h100), NODE, ALL, monitor_only=xids.current(SINCE + 60))
    assert taints(pool, "gpu-1") == [{"key": "gpu.nvidia.com/xid", "value": "94", "effect": "None",
                                      "timeAdded": "2026-01-01T00:00:05Z"}]
    assert xids.next_expiry() == SINCE + 650  # 600 s after the last one
    assert xids.current(SINCE + 650) == {}
    # A fatal fault on the same device: its NoSchedule taint, the None one under the same key gives way.
    xids.on_event(event)
    both = build_pool(state([h100[0], unhealthy(h100[1], "ECC DBE"), *h100[2:]]), NODE, ALL,
                      monitor_only=xids.current(SINCE + 6))
    assert [(t["key"], t["effect"]) for t in taints(both, "gpu-1")] == [("gpu.nvidia.com/ecc", "NoSchedule"),
                                                                       ("gpu.nvidia.com/xid", "None")]
    # A server without effect None: not shown (the device is healthy and stays published).
    old = build_pool(state(h100), NODE, ALL, Capabilities(taints=True, none_effect=False), xids.current(SINCE + 6))
    assert old.tainted == 0 and len(old.devices) == 8


def test_without_taints_unhealthy_devices_are_left_out(mig: list[DeviceState]) -> None:
    devices = [unhealthy(d, "cordoned: fan", cordoned=True) if d.index == "1" else
               unhealthy(d, "ECC DBE") if d.index == "6:0" else d for d in mig]
    pool = build_pool(state(devices), NODE, ALL, Capabilities(taints=False, none_effect=False))
    assert pool.left_out == ["gpu-1", "gpu-6-mig-1-0"] and pool.tainted == 0 and pool.wants_taints
    assert "gpu-1" not in by_name(pool) and "gpu-6-mig-2-0" in by_name(pool)
    assert len(pool.devices) == 15 - 2


# -- what the API holds -------------------------------------------------------------------------------

def held(name: str, devices: list[dict[str, Any]], generation: int = 4, count: int = 1, pool: str = NODE) -> Held:
    return Held(name, "100", pool, generation, count, devices)


def test_plan_converges_from_what_the_api_holds(h100: list[DeviceState]) -> None:
    pool = build_pool(state(h100), NODE, ALL)
    # As the API answers: a quantity in another form of the same value, fields of a newer server.
    answered = [{**d, "capacity": {"memory": {"value": "85520809984"}}, "allowMultipleAllocations": False}
                for d in pool.devices]
    assert plan([held("s-1", answered)], pool, floor=2) == ([], 4)
    # A device changed: a new generation past every one seen, the slice rewritten.
    faulty = build_pool(state([unhealthy(h100[0], "XID 79"), *h100[1:]]), NODE, ALL)
    writes, generation = plan([held("s-1", answered)], faulty, floor=2)
    assert generation == 5 and [(w.verb, w.name, w.version) for w in writes] == [("update", "s-1", "100")]
    # Duplicates, another pool's slice (a renamed node), an older generation: one slice of the new one.
    writes, generation = plan([held("s-2", answered, generation=9), held("s-1", answered),
                               held("s-0", [], pool="old-name")], pool, floor=2)
    assert generation == 10
    assert [(w.verb, w.name) for w in writes] == [("update", "s-0"), ("delete", "s-1"), ("delete", "s-2")]
    # Nothing left to offer: the slices go.
    empty = build_pool(state(h100), NODE, DraDevices())
    assert plan([held("s-1", answered)], empty, floor=4) == ([dp.Write("delete", "s-1", "100")], 4)
    # A count or generation out of step (a slice deleted behind our back) is a change too.
    assert plan([held("s-1", answered, count=2)], pool)[0][0].verb == "update"


def test_value_forms() -> None:
    assert [dp.quantity(n) for n in (0, 16, 1000, 1023, 1024, 85520809984, 81 << 30, 1025)] == \
        ["0", "16", "1k", "1023", "1Ki", "81559Mi", "81Gi", "1025"]
    assert [dp.parse_quantity(q) for q in ("81559Mi", "85520809984", "1k", "2Gi", "1.5Gi")] == \
        [85520809984, 85520809984, 1000, 2 << 30, "1.5Gi"]
    assert [dp.semver(v) for v in ("580.159.04", "580.95", "550", "1.2.3.4", "r580", "")] == \
        ["580.159.4", "580.95.0", "550.0.0", "", "", ""]
    assert dp.pci_bus_id("00000000:3B:00.0") == "0000:3b:00.0" and dp.pci_bus_id("0001:DB:00.1") == "0001:db:00.1"
    assert dp.pci_bus_id("garbage") == ""
    assert [dp.architecture(*cc) for cc in ((9, 0), (8, 0), (8, 6), (8, 9), (7, 0), (7, 5), (10, 0), (12, 0),
                                            (-1, -1))] == \
        ["Hopper", "Ampere", "Ampere", "Ada Lovelace", "Volta", "Turing", "Blackwell", "Blackwell", ""]
