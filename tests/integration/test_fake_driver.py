"""The product's REAL NVML backend (pynvml over libnvidia-ml) against a stand-in driver with GPUs.

The stand-in (tests/fakenvml/fakenvml.c) is loaded from a driver root exactly as on a node, and
faults are injected into it from outside the process, through its control directory, as the
container image test does through a mounted driver root. The simulated backend is not involved.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from common.bus.messages import HEALTHY, UNHEALTHY, HealthEvent, HealthState, Message
from common.nvml.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    GPU_RECOVERY_ACTION_GPU_RESET,
    NVML_TOPOLOGY_HOSTBRIDGE,
)
from tests.conftest import REPO, wait_until
from tests.fakenvml import (
    DGX_H100_BUS_IDS,
    DGX_H100_UUIDS,
    FAKE_DRIVER_VERSION,
    H100_MEMORY,
    H100_NAME,
    H100_NVLINKS,
    FakeDriver,
    build_gpu_driver_root,
    reset_gpu,
)
from tests.integration.busclient import BusWatch, wait_for_message
from tests.integration.conftest import MakeNode
from tests.integration.node import Node

EVENT_MASK = EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC  # what the monitor registers


def real_backend(driver: FakeDriver) -> dict[str, str]:
    # As the GPU Operator runs the plugin: the host's driver root, mounted in the container elsewhere.
    return {"NVML_BACKEND": "real", "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver",
            "DRIVER_ROOT_CTR_PATH": str(driver.root)}


def health_state(node: Node, predicate: Callable[[HealthState], bool] = lambda s: True,
                 timeout: float = 15.0) -> HealthState:
    def match(m: Message) -> bool:
        return isinstance(m, HealthState) and m.nvml_ok and predicate(m)

    msg = wait_for_message(node.run / "health.sock", match, timeout, topics=("health.state",))
    assert isinstance(msg, HealthState)
    return msg


def watching_events(driver: FakeDriver) -> None:
    """Until the monitor's event set covers every GPU: an XID before that is, as with a real driver,
    never delivered (the monitor publishes its first state before it registers)."""
    wait_until(lambda: driver.registered(EVENT_MASK) == set(range(driver.gpus)), 15.0,
               f"XID and ECC events registered on all {driver.gpus} GPUs")


def test_the_real_backend_discovers_the_stand_ins_eight_h100s(make_node: MakeNode, short_tmp: Path) -> None:
    driver = build_gpu_driver_root(short_tmp / "driver-root", gpus=8)
    node = make_node(**real_backend(driver))
    assert node.wait_devices(count=8) == dict.fromkeys(DGX_H100_UUIDS, HEALTHY)
    s = health_state(node)
    assert (s.nvml_library, s.driver_version, s.error) == (str(driver.library), FAKE_DRIVER_VERSION, "")
    gpus = [d for d in s.devices if d.kind == "gpu"]
    expected = enumerate(zip(DGX_H100_UUIDS, DGX_H100_BUS_IDS, strict=True))
    assert [(d.id, d.index, d.minor, d.pci_bus_id, d.name) for d in gpus] == [
        (uuid, str(i), i, bus, H100_NAME) for i, (uuid, bus) in expected]
    assert {d.memory_mb for d in gpus} == {H100_MEMORY // 2**20}
    assert not any(d.mig_enabled for d in gpus)
    # Every GPU reaches every other through the four NVSwitches; PCIe: switch pairs, then NUMA nodes.
    levels = {(DGX_H100_UUIDS.index(p.a), DGX_H100_UUIDS.index(p.b)): p.level for p in s.links}
    assert len(levels) == 28 and {p.nvlinks for p in s.links} == {H100_NVLINKS}
    assert levels[(0, 1)] == levels[(6, 7)] == 20 and levels[(0, 2)] == levels[(5, 7)] == 40
    assert levels[(0, 4)] == levels[(3, 7)] == 50 and NVML_TOPOLOGY_HOSTBRIDGE not in levels.values()


def test_an_injected_xid_79_makes_its_gpu_unhealthy_at_the_kubelet_and_leaves_the_others(
        make_node: MakeNode, short_tmp: Path) -> None:
    driver = build_gpu_driver_root(short_tmp / "driver-root", gpus=8)
    node = make_node(**real_backend(driver))
    node.wait_devices(count=8)
    watching_events(driver)
    victim = driver.uuids[5]
    with BusWatch(node.run / "health.sock", ("health.event",)) as events:
        driver.inject_xid(victim, 79)
        # The event names the GPU although it no longer answers for its UUID (GPU_IS_LOST).
        event = events.wait(lambda m: isinstance(m, HealthEvent) and m.event == "xid", 15.0)
    assert isinstance(event, HealthEvent) and (event.device, event.xid, event.reason) == (victim, 79, "fatal")
    node.wait_health(victim, UNHEALTHY)
    assert node.devices() == {**dict.fromkeys(driver.uuids, HEALTHY), victim: UNHEALTHY}
    # The probes that followed found it lost, and nothing wrong with the other seven.
    s = health_state(node, lambda s: "GPU lost" in next(d.reason for d in s.devices if d.id == victim))
    assert {d.id: d.health for d in s.devices} == {**dict.fromkeys(driver.uuids, HEALTHY), victim: UNHEALTHY}
    assert "XID 79" in next(d.reason for d in s.devices if d.id == victim)
    assert node.devices() == {**dict.fromkeys(driver.uuids, HEALTHY), victim: UNHEALTHY}


def test_two_gpus_an_xid_48_with_reset_advice_holds_until_the_gpu_is_reset(
        make_node: MakeNode, short_tmp: Path) -> None:
    # The GPU still answers here: only the event says what happened, and the driver's advice keeps it out.
    driver = build_gpu_driver_root(short_tmp / "driver-root", gpus=2)
    node = make_node(**real_backend(driver))
    assert node.wait_devices(count=2) == dict.fromkeys(DGX_H100_UUIDS[:2], HEALTHY)
    watching_events(driver)
    driver.inject(f"action 1 {GPU_RECOVERY_ACTION_GPU_RESET}")
    driver.inject_xid(1, 48)
    node.wait_health(driver.uuids[1], UNHEALTHY)
    held = "XID 48; driver advises: GPU reset"
    first = health_state(node, lambda s: s.devices[1].reason == held)
    # Five probe intervals on (HEALTH_PROBE_INTERVAL 0.2 s): a GPU without the advice would be back.
    s = health_state(node, lambda s: s.sent_at >= first.sent_at + 1.0)
    assert [(d.health, d.reason) for d in s.devices] == [(HEALTHY, ""), (UNHEALTHY, held)]
    assert s.devices[1].xid_count == 1
    reset_gpu(driver.root, 1)
    node.wait_health(driver.uuids[1], HEALTHY)
    assert node.devices() == dict.fromkeys(driver.uuids, HEALTHY)


# What the recorded H200 answered on driver 580.159.04 (/work/shared/fixtures/nvml/h200-probe.json,
# values copied): the stand-in must answer the same calls the same way, errors included.
RECORDED = {
    "driver": FAKE_DRIVER_VERSION, "mig_mode": [0, 0], "max_mig": 0, "supported_events": 65439,
    "remapped_rows": [0, 0, False, False], "retired_pending": 3, "mig_device_0": 6, "bad_index": 2,
    "ecc_dbe_volatile": 0, "ecc_sbe_volatile": 0, "recovery_action": 0, "wait_timeout": 10,
    "double_shutdown": 1, "call_after_shutdown": 1,
}

CONTRACT = """
import json, sys
from common.nvml.backend import NvmlError, MEMORY_ERROR_CORRECTED, MEMORY_ERROR_UNCORRECTED
from common.nvml.real import RealNvml, resolve_library
def code(f):
    try:
        f()
    except NvmlError as e:
        return e.code
    return 0
n = RealNvml(library=resolve_library([sys.argv[1]]))
n.init()
h = n.device_get_handle_by_index(0)
out = {
    "driver": n.system_get_driver_version(), "mig_mode": list(n.device_get_mig_mode(h)),
    "max_mig": n.device_get_max_mig_device_count(h), "supported_events": n.device_get_supported_event_types(h),
    "remapped_rows": list(n.device_get_remapped_rows(h)),
    "retired_pending": code(lambda: n.device_get_retired_pages_pending_status(h)),
    "mig_device_0": code(lambda: n.device_get_mig_device_handle_by_index(h, 0)),
    "bad_index": code(lambda: n.device_get_handle_by_index(n.device_get_count())),
    "ecc_dbe_volatile": n.device_get_total_ecc_errors(h, MEMORY_ERROR_UNCORRECTED),
    "ecc_sbe_volatile": n.device_get_total_ecc_errors(h, MEMORY_ERROR_CORRECTED),
    "recovery_action": n.device_get_recovery_action(h),
}
s = n.event_set_create()
n.device_register_events(h, n.device_get_supported_event_types(h), s)
out["wait_timeout"] = code(lambda: n.event_set_wait(s, 50))
n.event_set_free(s)
# Beyond the recording: what a lost GPU answers, in a process started after it was lost.
out["lost"] = [code(lambda: n.device_get_handle_by_index(i)) for i in range(n.device_get_count())]
n.shutdown()
out["double_shutdown"] = code(n.shutdown)
out["call_after_shutdown"] = code(n.device_get_count)
print(json.dumps(out))
"""


def test_the_stand_in_answers_as_the_recorded_driver_and_a_lost_gpu_stays_lost(short_tmp: Path) -> None:
    driver = build_gpu_driver_root(short_tmp / "driver-root", gpus=4)
    driver.inject_xid(2, 79)  # before the process: the driver's state, not the process's
    out = subprocess.run([sys.executable, "-c", CONTRACT, str(driver.root)], capture_output=True, text=True,
                         timeout=60, check=True, cwd=REPO)
    got = json.loads(out.stdout)
    assert got.pop("lost") == [0, 0, 15, 0]  # GPU_IS_LOST for the handle of GPU 2 alone
    assert got == RECORDED
    assert any(line.endswith("init gpus=4") for line in driver.trace())
