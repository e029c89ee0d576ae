"""The simulated NVML answers as the recorded H200 did, and as NVML does around it.

The expected values below are copied from the recording of a real H200 on driver 580.159.04
(nvidia-ml-py 13.610.43); the tests read only the fleets shipped in the package.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from common.nvml.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    MEMORY_ERROR_CORRECTED,
    MEMORY_ERROR_UNCORRECTED,
    NVLINK_STATE_ACTIVE,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNINITIALIZED,
    NVML_NVLINK_MAX_LINKS,
    NVML_TOPOLOGY_INTERNAL,
    NVML_TOPOLOGY_MULTIPLE,
    NVML_TOPOLOGY_NODE,
    NVML_TOPOLOGY_SYSTEM,
    WHOLE_GPU_INSTANCE,
    EventData,
    NvmlBackend,
    NvmlError,
    PciInfo,
)
from devtools.nvml_sim import FLEETS, FaultClient, SimulatedNvml, fleet_path, load_description

# --- the recording (h200-probe.json, h200-nvidia-smi-q.txt) ----------------------------------
REC_DRIVER = "580.159.04"
REC_COUNT = 1
REC_UUID = "GPU-1f62f3ea-d20c-f470-47b7-8f5c74880cbb"
REC_NAME = "NVIDIA H200"
REC_MINOR = 0
REC_BUS_ID = "00000000:00:06.0"
REC_MEMORY_TOTAL = 150754820096
REC_MIG_MODE = (0, 0)
REC_MAX_MIG = 0
REC_SUPPORTED_EVENTS = 65439
REC_ECC_SBE_VOLATILE = 0
REC_ECC_DBE_VOLATILE = 0
REC_TOPO_NUMA_AFFINITY = 0  # nvidia-smi topo -m: "NUMA Affinity 0"
REC_NVLINKS_PROBED = 36  # NvLinkState 0..35: every one "Not Supported"
# Recorded errors, as (what was asked, NVML code).
REC_NUMA_NODE_ID_ERROR = NVML_ERROR_NOT_SUPPORTED
REC_RETIRED_PAGES_PENDING_ERROR = NVML_ERROR_NOT_SUPPORTED
REC_REMAPPED_ROWS = [0, 0, 0, 0]
REC_NVLINK_STATE_ERROR = NVML_ERROR_NOT_SUPPORTED
REC_NVLINK_REMOTE_PCI0_ERROR = NVML_ERROR_NOT_SUPPORTED
REC_MIG_DEVICE0_ERROR = NVML_ERROR_NOT_FOUND
REC_BAD_INDEX_ERROR = NVML_ERROR_INVALID_ARGUMENT
REC_WAIT_TIMEOUT_ERROR = NVML_ERROR_TIMEOUT
REC_DOUBLE_SHUTDOWN_ERROR = NVML_ERROR_UNINITIALIZED
REC_CALL_AFTER_SHUTDOWN_ERROR = NVML_ERROR_UNINITIALIZED

ALL_HEALTH_EVENTS = EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC


def code_of(call: Callable[[], Any]) -> int:
    with pytest.raises(NvmlError) as info:
        call()
    return info.value.code


# --- recorded values ---------------------------------------------------------------------------
RECORDED_VALUES: list[tuple[str, Callable[[NvmlBackend, Any], Any], Any]] = [
    ("driver", lambda n, h: n.system_get_driver_version(), REC_DRIVER),
    ("count", lambda n, h: n.device_get_count(), REC_COUNT),
    ("uuid", lambda n, h: n.device_get_uuid(h), REC_UUID),
    ("name", lambda n, h: n.device_get_name(h), REC_NAME),
    ("minor", lambda n, h: n.device_get_minor_number(h), REC_MINOR),
    ("pci", lambda n, h: n.device_get_pci_info(h), PciInfo(REC_BUS_ID)),
    ("memory", lambda n, h: n.device_get_memory_total(h), REC_MEMORY_TOTAL),
    ("mig_mode", lambda n, h: n.device_get_mig_mode(h), REC_MIG_MODE),
    ("max_mig", lambda n, h: n.device_get_max_mig_device_count(h), REC_MAX_MIG),
    ("events", lambda n, h: n.device_get_supported_event_types(h), REC_SUPPORTED_EVENTS),
    ("sbe", lambda n, h: n.device_get_total_ecc_errors(h, MEMORY_ERROR_CORRECTED), REC_ECC_SBE_VOLATILE),
    ("dbe", lambda n, h: n.device_get_total_ecc_errors(h, MEMORY_ERROR_UNCORRECTED), REC_ECC_DBE_VOLATILE),
    ("sysfs_numa", lambda n, h: n.sysfs_numa_node(REC_BUS_ID), REC_TOPO_NUMA_AFFINITY),
    ("topology_self", lambda n, h: n.device_get_topology_common_ancestor(h, h), NVML_TOPOLOGY_INTERNAL),
]


@pytest.mark.parametrize(("what", "call", "expected"), RECORDED_VALUES, ids=[r[0] for r in RECORDED_VALUES])
def test_h200_answers_the_recorded_value(
    h200: SimulatedNvml, what: str, call: Callable[[NvmlBackend, Any], Any], expected: Any
) -> None:
    handle = h200.device_get_handle_by_index(0)
    assert call(h200, handle) == expected


def _nvlink_state(n: NvmlBackend, h: Any, link: int) -> int:
    return n.device_get_nvlink_state(h, link)


RECORDED_ERRORS: list[tuple[str, Callable[[NvmlBackend, Any], Any], int]] = [
    ("mig_device0", lambda n, h: n.device_get_mig_device_handle_by_index(h, 0), REC_MIG_DEVICE0_ERROR),
    ("bad_index", lambda n, h: n.device_get_handle_by_index(REC_COUNT), REC_BAD_INDEX_ERROR),
    (
        "nvlink_remote_pci0",
        lambda n, h: n.device_get_nvlink_remote_pci_info(h, 0),
        REC_NVLINK_REMOTE_PCI0_ERROR,
    ),
    ("gi_of_a_gpu", lambda n, h: n.device_get_gpu_instance_id(h), NVML_ERROR_INVALID_ARGUMENT),
] + [
    (f"nvlink_state{link}", partial(_nvlink_state, link=link), REC_NVLINK_STATE_ERROR)
    for link in range(REC_NVLINKS_PROBED)
]


@pytest.mark.parametrize(("what", "call", "expected"), RECORDED_ERRORS, ids=[r[0] for r in RECORDED_ERRORS])
def test_h200_raises_the_recorded_error(
    h200: SimulatedNvml, what: str, call: Callable[[NvmlBackend, Any], Any], expected: int
) -> None:
    handle = h200.device_get_handle_by_index(0)
    assert code_of(lambda: call(h200, handle)) == expected


def test_h200_description_keeps_the_answers_without_a_call() -> None:
    """numa_node_id, retired pages and remapped rows have no backend call yet; the data must match."""
    (dev,) = load_description(fleet_path("h200"))["devices"]
    assert dev["numa_node_id"] == {"error": REC_NUMA_NODE_ID_ERROR}
    assert dev["retired_pages_pending"] == {"error": REC_RETIRED_PAGES_PENDING_ERROR}
    assert dev["remapped_rows"] == REC_REMAPPED_ROWS
    assert dev["ecc_mode"] == [1, 1]


def test_h200_registers_the_health_events_as_recorded(h200: SimulatedNvml) -> None:
    handle = h200.device_get_handle_by_index(0)
    event_set = h200.event_set_create()
    for mask in (EVENT_XID_CRITICAL, EVENT_DOUBLE_BIT_ECC, EVENT_SINGLE_BIT_ECC, ALL_HEALTH_EVENTS):
        h200.device_register_events(handle, mask, event_set)  # recorded: each returned None
    h200.event_set_free(event_set)


def test_unsupported_event_registration_is_not_supported(h200: SimulatedNvml) -> None:
    handle = h200.device_get_handle_by_index(0)
    unsupported = 1 << 5  # 0x20 is not in the recorded 65439 (0xFF9F)
    assert REC_SUPPORTED_EVENTS & unsupported == 0
    event_set = h200.event_set_create()
    assert (
        code_of(lambda: h200.device_register_events(handle, unsupported, event_set))
        == NVML_ERROR_NOT_SUPPORTED
    )


def test_nvlink_index_past_the_maximum_is_invalid_argument(h200: SimulatedNvml) -> None:
    handle = h200.device_get_handle_by_index(0)
    assert code_of(lambda: h200.device_get_nvlink_state(handle, -1)) == NVML_ERROR_INVALID_ARGUMENT
    # The H200 has no NVLink: NOT_SUPPORTED wins for any index NVML accepts.
    assert code_of(lambda: h200.device_get_nvlink_state(handle, NVML_NVLINK_MAX_LINKS - 1)) == (
        NVML_ERROR_NOT_SUPPORTED
    )
    assert code_of(lambda: h200.device_get_nvlink_state(handle, NVML_NVLINK_MAX_LINKS)) == (
        NVML_ERROR_INVALID_ARGUMENT
    )


def test_unknown_ecc_error_type_is_invalid_argument(h200: SimulatedNvml) -> None:
    handle = h200.device_get_handle_by_index(0)
    assert code_of(lambda: h200.device_get_total_ecc_errors(handle, 7)) == NVML_ERROR_INVALID_ARGUMENT


# --- lifecycle ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda n: n.system_get_driver_version(),
        lambda n: n.device_get_count(),
        lambda n: n.device_get_handle_by_index(0),
        lambda n: n.event_set_create(),
        lambda n: n.shutdown(),
    ],
    ids=["driver", "count", "handle", "event_set", "shutdown"],
)
def test_calls_before_init_are_uninitialized(call: Callable[[SimulatedNvml], Any]) -> None:
    nvml = SimulatedNvml(fleet_path("h200"))
    assert code_of(lambda: call(nvml)) == NVML_ERROR_UNINITIALIZED


def test_calls_after_shutdown_and_double_shutdown_are_uninitialized() -> None:
    nvml = SimulatedNvml(fleet_path("h200"))
    nvml.init()
    handle = nvml.device_get_handle_by_index(0)
    nvml.shutdown()
    assert code_of(nvml.device_get_count) == REC_CALL_AFTER_SHUTDOWN_ERROR
    assert code_of(lambda: nvml.device_get_uuid(handle)) == REC_CALL_AFTER_SHUTDOWN_ERROR
    assert code_of(nvml.shutdown) == REC_DOUBLE_SHUTDOWN_ERROR


def test_init_error_from_the_description(tmp_path: Path) -> None:
    desc = tmp_path / "broken.json"
    desc.write_text('{"init_error": 9, "devices": []}')
    assert code_of(SimulatedNvml(desc).init) == 9


def test_wait_with_nothing_times_out_after_the_timeout(h200: SimulatedNvml) -> None:
    event_set = h200.event_set_create()
    h200.device_register_events(h200.device_get_handle_by_index(0), ALL_HEALTH_EVENTS, event_set)
    start = time.monotonic()
    assert code_of(lambda: h200.event_set_wait(event_set, 200)) == REC_WAIT_TIMEOUT_ERROR
    elapsed = time.monotonic() - start
    assert 0.18 <= elapsed < 1.0


# --- fault injection over the control socket ---------------------------------------------------
@pytest.fixture
def injected(tmp_path: Path) -> Iterator[tuple[SimulatedNvml, FaultClient]]:
    sock = tmp_path / "sim.sock"
    nvml = SimulatedNvml(fleet_path("h200"), control_socket=sock)
    nvml.init()
    yield nvml, FaultClient(sock, timeout=5.0)
    nvml.shutdown()


def _registered(nvml: SimulatedNvml, mask: int) -> tuple[Any, Any]:
    event_set = nvml.event_set_create()
    handle = nvml.device_get_handle_by_index(0)
    nvml.device_register_events(handle, mask, event_set)
    return event_set, handle


def test_injected_xid_arrives_as_an_event(injected: tuple[SimulatedNvml, FaultClient]) -> None:
    nvml, client = injected
    event_set, _ = _registered(nvml, ALL_HEALTH_EVENTS)
    client.send({"op": "xid", "uuid": REC_UUID, "xid": 48})
    assert nvml.event_set_wait(event_set, 5000) == EventData(
        REC_UUID, EVENT_XID_CRITICAL, 48, WHOLE_GPU_INSTANCE, WHOLE_GPU_INSTANCE
    )


@pytest.mark.parametrize(
    ("kind", "event_type", "error_type"),
    [
        ("dbe", EVENT_DOUBLE_BIT_ECC, MEMORY_ERROR_UNCORRECTED),
        ("sbe", EVENT_SINGLE_BIT_ECC, MEMORY_ERROR_CORRECTED),
    ],
)
def test_injected_ecc_counts_and_arrives(
    injected: tuple[SimulatedNvml, FaultClient], kind: str, event_type: int, error_type: int
) -> None:
    nvml, client = injected
    event_set, handle = _registered(nvml, ALL_HEALTH_EVENTS)
    client.send({"op": "ecc", "uuid": REC_UUID, "kind": kind, "count": 3})
    event = nvml.event_set_wait(event_set, 5000)
    assert (event.uuid, event.event_type) == (REC_UUID, event_type)
    assert nvml.device_get_total_ecc_errors(handle, error_type) == 3


def test_xid_79_loses_the_gpu_until_recover(injected: tuple[SimulatedNvml, FaultClient]) -> None:
    nvml, client = injected
    event_set, handle = _registered(nvml, EVENT_XID_CRITICAL)
    client.send({"op": "xid", "uuid": REC_UUID, "xid": 79})
    assert nvml.event_set_wait(event_set, 5000).event_data == 79
    for call in (
        nvml.device_get_uuid,
        nvml.device_get_name,
        nvml.device_get_pci_info,
        nvml.device_get_mig_mode,
    ):
        assert code_of(partial(call, handle)) == NVML_ERROR_GPU_IS_LOST
    client.send({"op": "recover", "uuid": REC_UUID})
    assert nvml.device_get_uuid(handle) == REC_UUID


def test_lost_op_loses_the_gpu(injected: tuple[SimulatedNvml, FaultClient]) -> None:
    nvml, client = injected
    handle = nvml.device_get_handle_by_index(0)
    client.send({"op": "lost", "uuid": REC_UUID})
    assert code_of(lambda: nvml.device_get_memory_total(handle)) == NVML_ERROR_GPU_IS_LOST


def test_hang_blocks_calls_on_that_gpu_until_recover(tmp_path: Path) -> None:
    sock = tmp_path / "sim.sock"
    nvml = SimulatedNvml(fleet_path("dgx-h100-8"), control_socket=sock)
    nvml.init()
    try:
        client = FaultClient(sock, timeout=5.0)
        stuck, other = nvml.device_get_handle_by_index(2), nvml.device_get_handle_by_index(3)
        client.send({"op": "hang", "uuid": nvml.device_get_uuid(stuck)})
        answers: list[object] = []
        worker = threading.Thread(target=lambda: answers.append(nvml.device_get_pci_info(stuck)), daemon=True)
        worker.start()
        # Another GPU still answers while the hung call blocks: a hang is per GPU, and holds no lock of ours.
        assert nvml.device_get_pci_info(other).bus_id
        worker.join(0.5)
        assert worker.is_alive() and answers == [], "a call on a hung GPU must block"
        client.send({"op": "recover", "uuid": nvml.device_get_uuid(other)})  # another GPU's reset releases nothing
        worker.join(0.5)
        assert worker.is_alive()
        uuid = nvml._gpus[2].uuid  # device_get_uuid(stuck) would block too
        client.send({"op": "recover", "uuid": uuid})
        worker.join(10)
        assert not worker.is_alive() and len(answers) == 1
        assert nvml.device_get_uuid(stuck) == uuid
    finally:
        nvml.shutdown()


def test_freeze_loop_blocks_the_loop_that_initialised_nvml_until_thaw(tmp_path: Path) -> None:
    sock = tmp_path / "sim.sock"
    nvml = SimulatedNvml(fleet_path("h200"), control_socket=sock)
    client = FaultClient(sock, timeout=5.0)
    order: list[str] = []

    def operator(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        client.send({"op": "freeze_loop"})
        # Callbacks run in order: this one runs only once the freeze callback has returned.
        loop.call_soon_threadsafe(order.append, "loop ran")
        time.sleep(0.3)  # room for a loop that is not frozen to run it
        order.append("thawing")
        client.send({"op": "thaw_loop"})
        loop.call_soon_threadsafe(done.set_result, None)

    async def scenario() -> None:
        nvml.init()  # on the loop, as the health-monitor calls it
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        threading.Thread(target=operator, args=(loop, done), daemon=True).start()
        await asyncio.wait_for(done, 30)

    try:
        asyncio.run(scenario())
    finally:
        nvml.shutdown()
    assert order == ["thawing", "loop ran"], "the loop ran while frozen"


def test_freeze_loop_without_a_loop_is_a_clear_error(injected: tuple[SimulatedNvml, FaultClient]) -> None:
    _, client = injected
    with pytest.raises(ValueError, match="not called from an asyncio loop"):
        client.send({"op": "freeze_loop"})


@pytest.mark.parametrize(
    ("cmd", "named"),
    [
        (
            {"op": "xid", "uuid": "GPU-00000000-0000-0000-0000-000000000000", "xid": 48},
            "GPU-00000000-0000-0000-0000-000000000000",
        ),
        ({"op": "melt", "uuid": REC_UUID}, "melt"),
        ({"op": "xid", "uuid": REC_UUID, "xid": -1}, "-1"),
        ({"op": "ecc", "uuid": REC_UUID, "kind": "tbe"}, "ecc"),
    ],
    ids=["unknown_uuid", "bad_op", "bad_xid", "bad_ecc_kind"],
)
def test_fault_client_reports_bad_commands(
    injected: tuple[SimulatedNvml, FaultClient], cmd: dict[str, Any], named: str
) -> None:
    _, client = injected
    with pytest.raises(ValueError, match=named):
        client.send(cmd)


def test_fault_client_without_backend_is_a_connection_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="simulated"):
        FaultClient(tmp_path / "nobody.sock", timeout=1.0).send({"op": "lost", "uuid": REC_UUID})


def test_unregistered_event_type_is_not_delivered(injected: tuple[SimulatedNvml, FaultClient]) -> None:
    nvml, client = injected
    event_set, _ = _registered(nvml, EVENT_XID_CRITICAL)
    client.send({"op": "ecc", "uuid": REC_UUID, "kind": "sbe"})  # SBE not registered: dropped
    client.send({"op": "xid", "uuid": REC_UUID, "xid": 31})
    first = nvml.event_set_wait(event_set, 5000)
    assert (first.event_type, first.event_data) == (EVENT_XID_CRITICAL, 31)
    assert code_of(lambda: nvml.event_set_wait(event_set, 50)) == NVML_ERROR_TIMEOUT


def test_shipped_fleets_all_load() -> None:
    for name in FLEETS:
        nvml = SimulatedNvml(fleet_path(name))
        nvml.init()
        assert nvml.device_get_count() >= 1
        nvml.shutdown()


# --- MIG fleet ---------------------------------------------------------------------------------
MIG_GPUS = {
    6: ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", [1, 2]),
    7: ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", list(range(7, 14))),
}


@pytest.fixture
def mig_fleet(tmp_path: Path) -> Iterator[tuple[SimulatedNvml, FaultClient]]:
    sock = tmp_path / "sim.sock"
    nvml = SimulatedNvml(fleet_path("dgx-h100-8-mig"), control_socket=sock)
    nvml.init()
    yield nvml, FaultClient(sock)
    nvml.shutdown()


def test_mig_fleet_handles_and_instance_ids(mig_fleet: tuple[SimulatedNvml, FaultClient]) -> None:
    nvml, _ = mig_fleet
    assert nvml.device_get_count() == 8
    for index in range(8):
        gpu = nvml.device_get_handle_by_index(index)
        assert nvml.device_get_max_mig_device_count(gpu) == 7
        if index not in MIG_GPUS:
            assert nvml.device_get_mig_mode(gpu) == (0, 0)
            assert (
                code_of(partial(nvml.device_get_mig_device_handle_by_index, gpu, 0)) == NVML_ERROR_NOT_FOUND
            )
            continue
        name, gis = MIG_GPUS[index]
        assert nvml.device_get_mig_mode(gpu) == (1, 1)
        uuids = set()
        for i, gi in enumerate(gis):
            mig = nvml.device_get_mig_device_handle_by_index(gpu, i)
            uuids.add(nvml.device_get_uuid(mig))
            assert nvml.device_get_name(mig) == name
            assert nvml.device_get_gpu_instance_id(mig) == gi
            assert nvml.device_get_compute_instance_id(mig) == 0
            assert nvml.device_get_memory_total(mig) < nvml.device_get_memory_total(gpu)
        assert all(u.startswith("MIG-") for u in uuids) and len(uuids) == len(gis)
        if len(gis) < 7:
            past_last = partial(nvml.device_get_mig_device_handle_by_index, gpu, len(gis))
            assert code_of(past_last) == NVML_ERROR_NOT_FOUND
        assert code_of(partial(nvml.device_get_mig_device_handle_by_index, gpu, 7)) == (
            NVML_ERROR_INVALID_ARGUMENT
        )


def test_xid_on_a_mig_uuid_carries_its_instance_ids(mig_fleet: tuple[SimulatedNvml, FaultClient]) -> None:
    nvml, client = mig_fleet
    gpu = nvml.device_get_handle_by_index(7)
    event_set = nvml.event_set_create()
    nvml.device_register_events(gpu, ALL_HEALTH_EVENTS, event_set)
    mig = nvml.device_get_mig_device_handle_by_index(gpu, 2)
    mig_uuid = nvml.device_get_uuid(mig)
    client.send({"op": "xid", "uuid": mig_uuid, "xid": 94})
    assert nvml.event_set_wait(event_set, 5000) == EventData(
        nvml.device_get_uuid(gpu), EVENT_XID_CRITICAL, 94, 9, 0
    )


# --- topology on the DGX fleet -----------------------------------------------------------------
@pytest.fixture
def dgx() -> Iterator[SimulatedNvml]:
    nvml = SimulatedNvml(fleet_path("dgx-h100-8"))
    nvml.init()
    yield nvml
    nvml.shutdown()


def expected_level(i: int, j: int) -> int:
    if i == j:
        return NVML_TOPOLOGY_INTERNAL
    if i // 2 == j // 2:
        return NVML_TOPOLOGY_MULTIPLE
    if i // 4 == j // 4:
        return NVML_TOPOLOGY_NODE
    return NVML_TOPOLOGY_SYSTEM


def test_dgx_topology_levels(dgx: SimulatedNvml) -> None:
    handles = [dgx.device_get_handle_by_index(i) for i in range(8)]
    for i, a in enumerate(handles):
        for j, b in enumerate(handles):
            assert dgx.device_get_topology_common_ancestor(a, b) == expected_level(i, j), (i, j)


def test_dgx_numa_and_pci(dgx: SimulatedNvml) -> None:
    buses = ["18", "2A", "3A", "5D", "9A", "AB", "BA", "DB"]
    for i, bus in enumerate(buses):
        h = dgx.device_get_handle_by_index(i)
        assert dgx.device_get_name(h) == "NVIDIA H100 80GB HBM3"
        assert dgx.device_get_minor_number(h) == i
        assert dgx.device_get_pci_info(h).bus_id == f"00000000:{bus}:00.0"
        assert dgx.sysfs_numa_node(f"00000000:{bus.lower()}:00.0") == i // 4
        assert dgx.device_get_supported_event_types(h) & ALL_HEALTH_EVENTS == ALL_HEALTH_EVENTS
    assert len({dgx.device_get_uuid(dgx.device_get_handle_by_index(i)) for i in range(8)}) == 8


def test_dgx_nvlinks_go_to_nvswitches(dgx: SimulatedNvml) -> None:
    gpu_buses = {dgx.device_get_pci_info(dgx.device_get_handle_by_index(i)).bus_id for i in range(8)}
    for i in range(8):
        h = dgx.device_get_handle_by_index(i)
        remotes = []
        for link in range(18):
            assert dgx.device_get_nvlink_state(h, link) == NVLINK_STATE_ACTIVE
            remotes.append(dgx.device_get_nvlink_remote_pci_info(h, link).bus_id)
        assert not set(remotes) & gpu_buses  # every far end is a switch, none a GPU
        assert sorted(remotes.count(r) for r in set(remotes)) == [4, 4, 5, 5]
        assert code_of(partial(dgx.device_get_nvlink_state, h, 18)) == NVML_ERROR_NOT_SUPPORTED
        assert code_of(partial(dgx.device_get_nvlink_state, h, NVML_NVLINK_MAX_LINKS)) == (
            NVML_ERROR_INVALID_ARGUMENT
        )


def test_topology_of_an_undescribed_pair_is_not_supported(tmp_path: Path) -> None:
    desc = tmp_path / "two.json"
    desc.write_text(
        '{"devices": ['
        '{"uuid": "GPU-a", "name": "x", "minor": 0, "pci_bus_id": "00000000:01:00.0", "memory_total": 1},'
        '{"uuid": "GPU-b", "name": "x", "minor": 1, "pci_bus_id": "00000000:02:00.0", "memory_total": 1,'
        ' "topology": {"GPU-c": 10}}]}'
    )
    nvml = SimulatedNvml(desc)
    nvml.init()
    a, b = nvml.device_get_handle_by_index(0), nvml.device_get_handle_by_index(1)
    assert code_of(lambda: nvml.device_get_topology_common_ancestor(a, b)) == NVML_ERROR_NOT_SUPPORTED
    assert code_of(lambda: nvml.device_get_nvlink_state(a, 0)) == NVML_ERROR_NOT_SUPPORTED
    nvml.shutdown()
