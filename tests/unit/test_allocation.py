"""Allocate answers, GetPreferredAllocation choices and the device table, as NVIDIA's plugin gives them."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, HealthState
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import Settings, resolve
from services.plugin_server.allocation import (
    MAX_REPORTED_IDS,
    AllocationError,
    container_response,
)
from services.plugin_server.device_table import (
    GPU_RESOURCE,
    PluginDevice,
    ResourceTable,
    build_resources,
    socket_name,
)
from services.plugin_server.servicer import preferred

UUIDS = [
    "GPU-0b5c1d2e-0000-4000-8000-000000000000",
    "GPU-1b5c1d2e-1111-4111-8111-111111111111",
    "GPU-2b5c1d2e-2222-4222-8222-222222222222",
    "GPU-3b5c1d2e-3333-4333-8333-333333333333",
]


def _gpu(n: int, health: str = HEALTHY, numa: int | None = 0) -> DeviceState:
    return DeviceState(
        id=UUIDS[n],
        kind="gpu",
        index=str(n),
        name="NVIDIA H100 80GB HBM3",
        health=health,
        reason="",
        since=1700000000.0,
        minor=n,
        pci_bus_id=f"00000000:{0x18 + n:02X}:00.0",
        numa_node=numa,
        memory_mb=81559,
    )


def _mig(gpu: int, n: int) -> DeviceState:
    return DeviceState(
        id=f"MIG-{gpu}{n}000000-aaaa-4bbb-8ccc-dddddddddddd",
        kind="mig",
        index=f"{gpu}:{n}",
        name="NVIDIA H100 80GB HBM3 MIG 1g.10gb",
        health=HEALTHY,
        reason="",
        since=1700000000.0,
        parent=UUIDS[gpu],
        gpu_instance_id=n,
        compute_instance_id=0,
        profile="1g.10gb",
        numa_node=0,
    )


DEVICES = {d.id: PluginDevice(d.id, d.health, d.numa_node, d) for d in (_gpu(n) for n in range(4))}


def _settings(**environ: str) -> Settings:
    return resolve(environ=environ)


# id, environ, requested indices into UUIDS, expected envs, expected mount container paths
ALLOCATIONS: list[tuple[str, dict[str, str], list[int], dict[str, str], list[str]]] = [
    ("envvar-uuid-one", {}, [2], {"NVIDIA_VISIBLE_DEVICES": UUIDS[2]}, []),
    ("envvar-uuid-two", {"DEVICE_LIST_STRATEGY": "envvar"}, [0, 3],
     {"NVIDIA_VISIBLE_DEVICES": f"{UUIDS[0]},{UUIDS[3]}"}, []),
    ("envvar-uuid-order-kept", {}, [3, 1], {"NVIDIA_VISIBLE_DEVICES": f"{UUIDS[3]},{UUIDS[1]}"}, []),
    ("envvar-index", {"DEVICE_ID_STRATEGY": "index"}, [0, 1], {"NVIDIA_VISIBLE_DEVICES": "0,1"}, []),
    ("envvar-index-one", {"DEVICE_ID_STRATEGY": "index"}, [3], {"NVIDIA_VISIBLE_DEVICES": "3"}, []),
    ("volume-mounts-uuid", {"DEVICE_LIST_STRATEGY": "volume-mounts"}, [0, 2],
     {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
     [f"/var/run/nvidia-container-devices/{UUIDS[0]}", f"/var/run/nvidia-container-devices/{UUIDS[2]}"]),
    ("volume-mounts-index", {"DEVICE_LIST_STRATEGY": "volume-mounts", "DEVICE_ID_STRATEGY": "index"}, [1],
     {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
     ["/var/run/nvidia-container-devices/1"]),
    ("envvar+volume-mounts", {"DEVICE_LIST_STRATEGY": "envvar,volume-mounts"}, [0, 2],
     {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
     [f"/var/run/nvidia-container-devices/{UUIDS[0]}", f"/var/run/nvidia-container-devices/{UUIDS[2]}"]),
    ("volume-mounts+envvar", {"DEVICE_LIST_STRATEGY": "volume-mounts,envvar"}, [3],
     {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
     [f"/var/run/nvidia-container-devices/{UUIDS[3]}"]),
]


@pytest.mark.parametrize(
    ("environ", "requested", "envs", "mounts"),
    [a[1:] for a in ALLOCATIONS],
    ids=[a[0] for a in ALLOCATIONS],
)
def test_container_response(
    environ: dict[str, str], requested: list[int], envs: dict[str, str], mounts: list[str]
) -> None:
    resp = container_response(GPU_RESOURCE, [UUIDS[i] for i in requested], DEVICES, _settings(**environ))
    assert dict(resp.envs) == envs
    assert [(m.container_path, m.host_path, m.read_only) for m in resp.mounts] == [
        (path, "/dev/null", False) for path in mounts
    ]
    assert list(resp.devices) == []
    assert dict(resp.annotations) == {}
    assert list(resp.cdi_devices) == []


@pytest.mark.parametrize(
    "requested", [[0], [0, 1, 2, 3], [2, 0]], ids=["one", "all", "out-of-order"]
)
def test_envvar_plus_volume_mounts_answers_exactly_as_volume_mounts(requested: list[int]) -> None:
    ids = [UUIDS[i] for i in requested]
    both = container_response(GPU_RESOURCE, ids, DEVICES, _settings(DEVICE_LIST_STRATEGY="envvar,volume-mounts"))
    alone = container_response(GPU_RESOURCE, ids, DEVICES, _settings(DEVICE_LIST_STRATEGY="volume-mounts"))
    assert both == alone
    assert both.SerializeToString(deterministic=True) == alone.SerializeToString(deterministic=True)


def test_unhealthy_device_is_refused_and_named() -> None:
    # The kubelet hands out only devices it saw healthy; one that turned unhealthy since is refused
    # with its name rather than handed to a container that would fail on it.
    devices = {**DEVICES, UUIDS[0]: PluginDevice(UUIDS[0], UNHEALTHY, 0, _gpu(0, UNHEALTHY))}
    with pytest.raises(AllocationError) as err:
        container_response(GPU_RESOURCE, [UUIDS[1], UUIDS[0]], devices, _settings())
    assert str(err.value) == (
        f'invalid allocation request for "nvidia.com/gpu": invalid request: unhealthy device: {UUIDS[0]}'
    )
    assert dict(container_response(GPU_RESOURCE, [UUIDS[1]], devices, _settings()).envs) == {
        "NVIDIA_VISIBLE_DEVICES": UUIDS[1]
    }


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(AllocationError) as err:
        container_response(GPU_RESOURCE, [UUIDS[1], UUIDS[1]], DEVICES, _settings())
    assert str(err.value) == (
        f'invalid allocation request for "nvidia.com/gpu": invalid request: duplicate device: {UUIDS[1]}'
    )


UNKNOWN: list[tuple[str, str, list[str], str]] = [
    ("one-unknown", GPU_RESOURCE, ["GPU-nope"],
     'invalid allocation request for "nvidia.com/gpu": invalid request: unknown device: GPU-nope'),
    ("unknown-among-known", GPU_RESOURCE, [UUIDS[0], "GPU-nope", UUIDS[1]],
     'invalid allocation request for "nvidia.com/gpu": invalid request: unknown device: GPU-nope'),
    ("two-unknown", GPU_RESOURCE, ["GPU-a", UUIDS[0], "GPU-b"],
     'invalid allocation request for "nvidia.com/gpu": invalid request: unknown device: GPU-a, GPU-b'),
    ("other-resource", "nvidia.com/mig-1g.10gb", ["MIG-x"],
     'invalid allocation request for "nvidia.com/mig-1g.10gb": invalid request: unknown device: MIG-x'),
    ("replica-id-of-unknown", GPU_RESOURCE, [f"{UUIDS[0]}::1"],
     f'invalid allocation request for "nvidia.com/gpu": invalid request: unknown device: {UUIDS[0]}::1'),
]


@pytest.mark.parametrize(
    ("resource", "ids", "message"), [u[1:] for u in UNKNOWN], ids=[u[0] for u in UNKNOWN]
)
def test_unknown_ids_are_named(resource: str, ids: list[str], message: str) -> None:
    with pytest.raises(AllocationError) as err:
        container_response(resource, ids, DEVICES, _settings())
    assert str(err.value) == message


def test_empty_request_is_an_error() -> None:
    with pytest.raises(AllocationError, match=r'^invalid allocation request for "nvidia.com/gpu": invalid request'):
        container_response(GPU_RESOURCE, [], DEVICES, _settings())


def test_huge_unknown_request_keeps_the_message_short() -> None:
    ids = [f"GPU-bogus-{n:05d}" for n in range(10_000)]
    with pytest.raises(AllocationError) as err:
        container_response(GPU_RESOURCE, ids, DEVICES, _settings())
    message = str(err.value)
    named = [i for i in ids if i in message]
    assert 1 <= len(named) <= MAX_REPORTED_IDS <= 10
    assert named == ids[: len(named)]
    assert len(message) < 1000
    assert message.startswith(
        'invalid allocation request for "nvidia.com/gpu": invalid request: unknown device: GPU-bogus-00000'
    )


# ---- GetPreferredAllocation ----

PREFERRED: list[tuple[str, list[str], list[str], int, list[str]]] = [
    ("plain", ["a", "b", "c", "d"], [], 2, ["a", "b"]),
    ("must-include-first", ["a", "b", "c", "d"], ["c"], 2, ["c", "a"]),
    ("must-include-not-in-available", ["a", "b"], ["z"], 2, ["z", "a"]),
    ("must-include-fills-size", ["a", "b", "c"], ["b", "c"], 2, ["b", "c"]),
    ("must-include-over-size-kept", ["a", "b", "c"], ["c", "b", "a"], 2, ["c", "b", "a"]),
    ("must-include-duplicates", ["a", "b", "c"], ["b", "b"], 2, ["b", "a"]),
    ("available-duplicates", ["a", "a", "b"], [], 2, ["a", "b"]),
    ("size-larger-than-available", ["a", "b"], [], 5, ["a", "b"]),
    ("size-zero", ["a", "b"], [], 0, []),
    ("size-zero-must-include", ["a", "b"], ["b"], 0, ["b"]),
    ("nothing-available", [], [], 3, []),
    ("exact", ["a", "b", "c"], ["a"], 3, ["a", "b", "c"]),
]


@pytest.mark.parametrize(
    ("available", "must_include", "size", "expected"),
    [p[1:] for p in PREFERRED],
    ids=[p[0] for p in PREFERRED],
)
def test_preferred(available: list[str], must_include: list[str], size: int, expected: list[str]) -> None:
    assert preferred(available, must_include, size) == expected


_dev_ids = st.text(alphabet="abcdefgh", min_size=1, max_size=2)


@settings(max_examples=500, deadline=None)
@given(
    available=st.lists(_dev_ids, max_size=12),
    must_include=st.lists(_dev_ids, max_size=6),
    size=st.integers(min_value=-2, max_value=16),
)
def test_preferred_property(available: list[str], must_include: list[str], size: int) -> None:
    out = preferred(available, must_include, size)
    must = list(dict.fromkeys(must_include))
    pool = list(dict.fromkeys(must + available))
    assert len(out) == len(set(out)), "no duplicates"
    assert out[: len(must)] == must, "must_include first, in order, always kept"
    assert set(out) <= set(pool), "only from available + must_include"
    assert len(out) == max(len(must), min(max(size, 0), len(pool))), "size respected"
    rest = out[len(must):]
    assert rest == [d for d in pool if d not in must][: len(rest)], "ties broken by the order of available"


# ---- device table ----


@pytest.mark.parametrize(
    ("resource", "name"),
    [
        ("nvidia.com/gpu", "nvidia-gpu.sock"),
        ("nvidia.com/gpu.shared", "nvidia-gpu.shared.sock"),
        ("nvidia.com/mig-1g.10gb", "nvidia-mig-1g.10gb.sock"),
        ("nvidia.com/mig-3g.40gb", "nvidia-mig-3g.40gb.sock"),
    ],
    ids=["gpu", "shared", "mig-1g", "mig-3g"],
)
def test_socket_name(resource: str, name: str) -> None:
    assert socket_name(resource) == name


def _state(devices: list[DeviceState]) -> HealthState:
    return HealthState(
        incarnation="i", seq=1, sent_at=1.0, nvml_ok=True, error="", driver_version="580.159.04", devices=devices
    )


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ([], {}),
        ([_gpu(0), _gpu(1, UNHEALTHY, None)],
         {GPU_RESOURCE: [(UUIDS[0], HEALTHY, 0), (UUIDS[1], UNHEALTHY, None)]}),
        ([_gpu(2, numa=1), _mig(0, 1), _gpu(0)],
         {GPU_RESOURCE: [(UUIDS[2], HEALTHY, 1), (UUIDS[0], HEALTHY, 0)]}),
    ],
    ids=["empty", "gpus-in-order", "mig-none-skips-mig-devices"],
)
def test_build_resources_mig_none(devices: list[DeviceState], expected: dict[str, list[tuple]]) -> None:
    out = build_resources(_state(devices), _settings())
    assert {r: [(d.id, d.health, d.numa_node) for d in devs] for r, devs in out.items()} == expected
    by_id = {d.id: d for d in devices}
    for devs in out.values():
        for d in devs:
            assert d.device is by_id[d.id]


def _pd(n: int, health: str = HEALTHY, numa: int | None = 0) -> PluginDevice:
    return PluginDevice(UUIDS[n], health, numa, _gpu(n, health, numa))


# each step: the device list given to update, whether it changed
UPDATES: list[tuple[str, list[tuple[list[PluginDevice], bool]]]] = [
    ("first-empty-unchanged", [([], False)]),
    ("first-list", [([_pd(0), _pd(1)], True)]),
    ("same-again", [([_pd(0), _pd(1)], True), ([_pd(0), _pd(1)], False)]),
    ("health-change", [([_pd(0), _pd(1)], True), ([_pd(0), _pd(1, UNHEALTHY)], True), ([_pd(0), _pd(1)], True)]),
    ("numa-change", [([_pd(0, numa=0)], True), ([_pd(0, numa=None)], True), ([_pd(0, numa=None)], False)]),
    ("device-removed", [([_pd(0), _pd(1)], True), ([_pd(0)], True), ([], True), ([], False)]),
    ("order-change", [([_pd(0), _pd(1)], True), ([_pd(1), _pd(0)], True)]),
]


@pytest.mark.parametrize("steps", [u[1] for u in UPDATES], ids=[u[0] for u in UPDATES])
def test_resource_table_update(steps: list[tuple[list[PluginDevice], bool]]) -> None:
    async def scenario() -> None:
        table = ResourceTable(GPU_RESOURCE)
        version = table.version
        assert version == 0
        for devices, changed in steps:
            assert await table.update(devices) is changed
            if changed:
                assert table.version == version + 1
            else:
                assert table.version == version
            version = table.version
            assert list(table.devices) == [d.id for d in devices]
            assert [(d.ID, d.health) for d in table.response.devices] == [(d.id, d.health) for d in devices]
            assert [[n.ID for n in d.topology.nodes] for d in table.response.devices] == [
                [] if d.numa_node is None else [d.numa_node] for d in devices
            ]
            assert table.healthy == sum(1 for d in devices if d.health == HEALTHY)

    asyncio.run(scenario())


def test_resource_table_update_wakes_waiters_only_on_change() -> None:
    async def scenario() -> None:
        table = ResourceTable(GPU_RESOURCE)
        await table.update([_pd(0)])
        seen = table.version
        waiter = asyncio.ensure_future(table.wait_changed(seen))
        await asyncio.sleep(0)  # one turn of the loop (not a timed wait): the waiter is now waiting
        assert await table.update([_pd(0)]) is False
        await asyncio.sleep(0)
        assert not waiter.done()
        assert await table.update([_pd(0, UNHEALTHY)]) is True
        await asyncio.wait_for(waiter, 5)
        assert table.version == seen + 1
        assert isinstance(table.response, pb.ListAndWatchResponse)

    asyncio.run(scenario())
