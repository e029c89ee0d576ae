"""Every fault and recovery path, from an injected fault to the device list the kubelet
simulator holds, through the real health-monitor, plugin-server and registrar."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HealthEvent, HealthState
from tests.conftest import wait_until
from tests.integration.busclient import BusWatch
from tests.integration.node import Node, fleet_copy

GPU = "nvidia.com/gpu"


def health_state(node: Node) -> HealthState:
    with BusWatch(node.run / "health.sock", ("health.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, HealthState))
    assert isinstance(msg, HealthState)
    return msg


@pytest.mark.parametrize(
    ("fault", "unhealthy"),
    [
        (("xid", "79"), True),
        (("xid", "48"), True),
        (("ecc", "dbe"), True),
        (("lost",), True),
        (("remap",), True),
        (("remap", "pending"), True),
        (("xid", "13"), False),
        (("ecc", "sbe"), False),
    ],
    ids=["xid79-lost", "xid48-dbe", "ecc-dbe", "lost-probe", "remap-failure", "remap-pending", "xid13-app",
         "ecc-sbe"],
)
def test_fault_reaches_the_kubelet_and_recovers(make_node: Any, fault: tuple[str, ...], unhealthy: bool) -> None:
    node = make_node()
    ids = list(node.wait_devices())
    victim = ids[2]
    with BusWatch(node.run / "health.sock", ("health.",)) as w:
        node.inject(fault[0], victim, *fault[1:])
        if unhealthy:
            node.wait_health(victim, "Unhealthy")
            assert sum(h == "Unhealthy" for h in node.devices().values()) == 1, "only the victim"
            # The driver now advises a reset (or the GPU is gone): it must stay out of service.
            assert node.devices()[victim] == "Unhealthy"
            node.inject("recover", victim)
            node.wait_health(victim, "Healthy")
            back = w.wait(lambda m: isinstance(m, HealthEvent) and m.event == "transition" and m.new == "Healthy")
            assert isinstance(back, HealthEvent) and back.reason == "recovered" and back.device == victim
        else:
            w.wait(lambda m: isinstance(m, HealthEvent) and m.event in ("xid", "ecc") and m.device == victim)
            state = health_state(node)
            dev = next(d for d in state.devices if d.id == victim)
            assert dev.health == "Healthy" and (dev.xid_count, dev.sbe_count) in ((1, 0), (0, 1))
            assert node.wait_devices()[victim] == "Healthy"


def test_driver_advice_keeps_the_device_out_until_reset(make_node: Any) -> None:
    node = make_node()
    victim = next(iter(node.wait_devices()))
    node.inject("xid", victim, "48")
    node.wait_health(victim, "Unhealthy")
    wait_until(lambda: "driver advises: GPU reset" in next(
        d.reason for d in health_state(node).devices if d.id == victim), 10, "the advice in the reason")
    assert node.devices()[victim] == "Unhealthy"


def test_without_driver_advice_a_quiet_period_of_clean_probes_recovers(make_node: Any, short_tmp: Path) -> None:
    fleet = fleet_copy(short_tmp, "dgx-h100-8", lambda d: [dev.pop("recovery_action") for dev in d["devices"]])
    node = make_node(fleet)
    victim = list(node.wait_devices())[1]
    t0 = time.monotonic()
    node.inject("xid", victim, "48")
    node.wait_health(victim, "Unhealthy")
    node.wait_health(victim, "Healthy", timeout=15)
    assert time.monotonic() - t0 >= 1.0, "not before the quiet period"


def test_recovery_policy_never_keeps_nvidias_behaviour(make_node: Any, short_tmp: Path) -> None:
    fleet = fleet_copy(short_tmp, "dgx-h100-8", lambda d: [dev.pop("recovery_action") for dev in d["devices"]])
    node = make_node(fleet, HEALTH_RECOVERY="never")
    victim = list(node.wait_devices())[1]
    node.inject("xid", victim, "48")
    node.wait_health(victim, "Unhealthy")
    # Three quiet periods of clean probes: auto would have recovered long before.
    with pytest.raises(AssertionError):
        node.wait_health(victim, "Healthy", timeout=3.0)


def test_mig_instance_and_whole_gpu_events_reach_the_right_mig_devices(make_node: Any) -> None:
    node = make_node("dgx-h100-8-mig", MIG_STRATEGY="mixed")
    small = node.wait_devices("nvidia.com/mig-1g.10gb", count=7)
    large = node.wait_devices("nvidia.com/mig-3g.40gb", count=2)
    assert len(node.wait_devices(GPU, count=6)) == 6
    state = health_state(node)
    parent_of = {d.id: d.parent for d in state.devices if d.kind == "mig"}
    one = sorted(small)[0]
    node.inject("xid", one, "94")
    node.wait_health(one, "Unhealthy", "nvidia.com/mig-1g.10gb")
    assert sum(h == "Unhealthy" for h in node.devices("nvidia.com/mig-1g.10gb").values()) == 1
    node.inject("recover", parent_of[one])
    node.wait_health(one, "Healthy", "nvidia.com/mig-1g.10gb")

    gpu = parent_of[sorted(large)[0]]
    node.inject("xid", gpu, "79")
    node.wait_devices("nvidia.com/mig-3g.40gb", count=2, healthy=0)
    assert all(h == "Healthy" for h in node.devices("nvidia.com/mig-1g.10gb").values())


def test_mig_strategy_none_offers_whole_gpus_and_a_broken_instance_breaks_its_gpu(make_node: Any) -> None:
    node = make_node("dgx-h100-8-mig")
    node.wait_devices(GPU, count=8)
    state = health_state(node)
    mig = next(d for d in state.devices if d.kind == "mig")
    node.inject("xid", mig.id, "94")
    node.wait_health(mig.parent, "Unhealthy")
    assert sum(h == "Unhealthy" for h in node.devices().values()) == 1


def test_failed_event_wait_recreates_the_set_without_marking_devices(make_node: Any) -> None:
    node = make_node()
    ids = list(node.wait_devices())
    with BusWatch(node.run / "health.sock", ("health.event",)) as w:
        node.inject("event_error", ids[0])
        event = w.wait(lambda m: isinstance(m, HealthEvent) and m.event == "nvml")
        assert isinstance(event, HealthEvent) and "event set re-created" in event.reason
    assert all(h == "Healthy" for h in node.wait_devices().values())
    node.inject("xid", ids[4], "79")  # the new event set still delivers
    node.wait_health(ids[4], "Unhealthy")


def test_event_registration_not_supported_keeps_the_gpu_healthy_and_probed(make_node: Any, short_tmp: Path) -> None:
    def no_events(d: dict[str, Any]) -> None:
        d["devices"][3]["supported_events"] = {"error": 3}

    node = make_node(fleet_copy(short_tmp, "dgx-h100-8", no_events))
    ids = list(node.wait_devices())
    assert "event registration failed" in node.procs.log("health-monitor")
    node.inject("ecc", ids[3], "dbe")  # no event can arrive: the probe sees the DBE counter move
    node.wait_health(ids[3], "Unhealthy")
    node.inject("lost", ids[3])
    node.inject("recover", ids[3])
    node.wait_health(ids[3], "Healthy")


def test_cordon_survives_restarts_and_uncordon_returns_the_device(make_node: Any) -> None:
    node = make_node()
    victim = list(node.wait_devices())[6]
    out = node.cli("cordon", victim, "--reason", "bad fan")
    assert out.returncode == 0, out.stderr
    node.wait_health(victim, "Unhealthy")
    assert next(d for d in health_state(node).devices if d.id == victim).reason == "cordoned: bad fan"
    for service in ("health-monitor", "plugin-server", "registrar"):
        node.services[service].kill()
        node.services[service].wait(10)
        node.start(service)
    node.wait_devices(healthy=7)
    assert node.devices()[victim] == "Unhealthy"
    assert node.cli("uncordon", victim).returncode == 0
    node.wait_health(victim, "Healthy")
    bad = node.cli("cordon", "GPU-does-not-exist")
    assert bad.returncode == 2 and "unknown device GPU-does-not-exist" in bad.stderr


def test_monitor_only_xids_are_reported_and_keep_the_device(make_node: Any, short_tmp: Path) -> None:
    config = short_tmp / "config.yaml"
    config.write_text("version: v1\nhealth:\n  xids:\n    monitorOnly: [94]\n")
    node = make_node(CONFIG_FILE=str(config))
    victim = list(node.wait_devices())[5]
    with BusWatch(node.run / "health.sock", ("health.event",)) as w:
        node.inject("xid", victim, "94")
        event = w.wait(lambda m: isinstance(m, HealthEvent) and m.event == "xid")
    assert isinstance(event, HealthEvent) and event.reason == "monitor-only" and event.xid == 94
    assert node.wait_devices()[victim] == "Healthy"


def test_no_nvml_without_fail_on_init_error_advertises_nothing_and_says_why(make_node: Any, short_tmp: Path) -> None:
    fleet = fleet_copy(short_tmp, "dgx-h100-8", lambda d: d.update(init_error=12))
    node = make_node(fleet, FAIL_ON_INIT_ERROR="false")
    with BusWatch(node.run / "health.sock", ("health.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, HealthState))
    assert isinstance(msg, HealthState) and not msg.nvml_ok and "libnvidia-ml.so.1" in msg.error
    status = node.cli("status")
    assert "FAILED" in status.stdout and "NVML Shared Library Not Found" in status.stdout
    assert node.sim.registrations == [] and node.devices() == {}


def test_status_and_bus_tail_show_health(make_node: Any) -> None:
    node = make_node()
    ids = list(node.wait_devices())
    node.inject("xid", ids[1], "79")
    node.wait_health(ids[1], "Unhealthy")
    status = node.cli("status")
    row = next(line for line in status.stdout.splitlines() if ids[1] in line)
    assert "Unhealthy" in row and "XID 79" in row
    tail = node.cli("bus", "tail", "--topic", "health.state", "--device", ids[1], "--count", "1", "--timeout", "10")
    assert tail.returncode == 0 and tail.stdout.startswith("health.state ") and ids[1] in tail.stdout


def test_a_malformed_cordon_file_keeps_every_device_out_and_the_monitor_running(make_node: Any) -> None:
    node = make_node()
    victim = list(node.wait_devices())[4]
    assert node.cli("cordon", victim).returncode == 0
    node.wait_health(victim, "Unhealthy")
    (node.root / "state" / "cordons.json").write_text('{"GPU-x": {"reason": "r", "time": "yesterday"}}')
    wait_until(lambda: "every device is kept out of service" in node.procs.log("health-monitor"), 10,
               "the error logged")
    assert node.services["health-monitor"].poll() is None
    node.wait_devices(healthy=0)  # the file may have named any of them
    assert node.devices()[victim] == "Unhealthy"
