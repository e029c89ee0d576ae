"""The health-monitor alone: a real process on the simulated backend, observed on the bus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HEALTHY, UNHEALTHY, HealthEvent, HealthState, Message
from common.version import VERSION
from tests.conftest import Procs, wait_until
from tests.integration.busclient import BusWatch, wait_for_message


def start_monitor(procs: Procs, root: Path, fleet: str, name: str = "hm", **env: str) -> Path:
    run = root / "run"
    procs.start(name, "health-monitor", env={"GPU_PLUGIN_RUN_DIR": str(run), "NVML_BACKEND": "simulated",
                                              "SIMULATED_DEVICES": fleet, **env})
    return run


def state(run: Path, predicate=lambda s: True, timeout: float = 15.0) -> HealthState:  # type: ignore[no-untyped-def]
    def match(m: Message) -> bool:
        return isinstance(m, HealthState) and m.nvml_ok and predicate(m)

    msg = wait_for_message(run / "health.sock", match, timeout, topics=("health.state",))
    assert isinstance(msg, HealthState)
    return msg


def health(s: HealthState) -> dict[str, str]:
    return {d.id: d.health for d in s.devices}


def inject(procs: Procs, run: Path, *args: str) -> None:
    p = procs.start("inject", "inject", *args, env={"GPU_PLUGIN_RUN_DIR": str(run)}, command="devtools.cli")
    assert p.wait(30) == 0, procs.log("inject")


def test_discovers_the_fleet_and_publishes_it(procs: Procs, short_tmp: Path) -> None:
    run = start_monitor(procs, short_tmp, "dgx-h100-8")
    s = state(run)
    gpus = [d for d in s.devices if d.kind == "gpu"]
    assert [d.index for d in gpus] == [str(i) for i in range(8)]
    assert {d.numa_node for d in gpus[:4]} == {0} and {d.numa_node for d in gpus[4:]} == {1}
    assert all(d.health == HEALTHY and d.minor == int(d.index) for d in gpus)
    assert s.driver_version
    assert s.plugin_version == VERSION == "0.1.0"
    assert (run.stat().st_mode & 0o777) == 0o700


def test_h200_recording_is_discovered_as_the_real_driver_reported_it(procs: Procs, short_tmp: Path) -> None:
    run = start_monitor(procs, short_tmp, "h200")
    (gpu,) = state(run).devices
    assert gpu.id == "GPU-1f62f3ea-d20c-f470-47b7-8f5c74880cbb"
    assert (gpu.name, gpu.pci_bus_id, gpu.minor) == ("NVIDIA H200", "00000000:00:06.0", 0)


@pytest.mark.parametrize(
    ("xid", "fatal"), [(79, True), (48, True), (13, False), (31, False), (43, False), (109, False)],
    ids=lambda v: str(v),
)
def test_xid_policy_decides_health(procs: Procs, short_tmp: Path, xid: int, fatal: bool) -> None:
    run = start_monitor(procs, short_tmp, "dgx-h100-8")
    victim = state(run).devices[2].id
    with BusWatch(run / "health.sock", ("health.event",)) as events:
        inject(procs, run, "xid", victim, str(xid))
        event = events.wait(lambda m: isinstance(m, HealthEvent) and m.event == "xid")
    assert isinstance(event, HealthEvent) and event.xid == xid and event.device == victim
    s = state(run)
    assert health(s)[victim] == (UNHEALTHY if fatal else HEALTHY)
    assert sum(h == UNHEALTHY for h in health(s).values()) == (1 if fatal else 0)
    if fatal:
        assert next(d for d in s.devices if d.id == victim).reason == f"XID {xid}"


def test_transition_is_an_event_with_old_new_and_reason(procs: Procs, short_tmp: Path) -> None:
    run = start_monitor(procs, short_tmp, "dgx-h100-8")
    victim = state(run).devices[0].id
    with BusWatch(run / "health.sock", ("health.event",)) as events:
        inject(procs, run, "ecc", victim, "dbe")
        event = events.wait(lambda m: isinstance(m, HealthEvent) and m.event == "transition")
    assert isinstance(event, HealthEvent)
    assert (event.device, event.old, event.new, event.reason) == (victim, HEALTHY, UNHEALTHY, "ECC DBE")


def test_mig_instance_xid_hits_only_its_instance_and_whole_gpu_xid_hits_all(procs: Procs, short_tmp: Path) -> None:
    run = start_monitor(procs, short_tmp, "dgx-h100-8-mig")
    s = state(run)
    migs = [d for d in s.devices if d.kind == "mig"]
    assert migs, "the MIG fleet lists MIG devices"
    one = migs[0]
    siblings = [m for m in migs if m.parent == one.parent and m.id != one.id]
    inject(procs, run, "xid", one.id, "94")
    s = state(run, lambda s: health(s)[one.id] == UNHEALTHY)
    assert all(health(s)[m.id] == HEALTHY for m in siblings)
    assert health(s)[one.parent] == HEALTHY

    other_gpu = next(m.parent for m in migs if m.parent != one.parent)
    inject(procs, run, "xid", other_gpu, "48")
    s = state(run, lambda s: health(s)[other_gpu] == UNHEALTHY)
    assert all(health(s)[m.id] == UNHEALTHY for m in migs if m.parent == other_gpu)


def test_dp_disable_healthchecks_all_keeps_devices_healthy(procs: Procs, short_tmp: Path) -> None:
    run = start_monitor(procs, short_tmp, "dgx-h100-8", DP_DISABLE_HEALTHCHECKS="all")
    victim = state(run).devices[1].id
    with BusWatch(run / "health.sock", ("health.event",)) as events:
        inject(procs, run, "xid", victim, "79")
        events.wait(lambda m: isinstance(m, HealthEvent) and m.event == "xid")
    assert health(state(run))[victim] == HEALTHY


def test_second_monitor_cannot_take_over_the_bus(procs: Procs, short_tmp: Path) -> None:
    run = start_monitor(procs, short_tmp, "dgx-h100-8")
    first = state(run)
    second = procs.start("hm2", "health-monitor", env={"GPU_PLUGIN_RUN_DIR": str(run), "NVML_BACKEND": "simulated"})
    assert second.wait(30) != 0
    assert "another process publishes" in procs.log("hm2")
    assert state(run).incarnation == first.incarnation


def _broken_fleet(root: Path) -> Path:
    desc = root / "broken.json"
    desc.write_text(json.dumps({"init_error": 9, "devices": []}))
    return desc


def test_nvml_init_failure_exits_with_the_cause_when_fail_on_init_error(procs: Procs, short_tmp: Path) -> None:
    start_monitor(procs, short_tmp, str(_broken_fleet(short_tmp)))
    p = procs.procs[-1][1]
    assert p.wait(30) != 0
    log = procs.log("hm")
    assert "nvml init failed: Driver Not Loaded" in log and "kernel driver" in log


def test_nvml_init_failure_is_published_and_retried_without_fail_on_init_error(procs: Procs, short_tmp: Path) -> None:
    run = start_monitor(procs, short_tmp, str(_broken_fleet(short_tmp)), FAIL_ON_INIT_ERROR="false")
    msg = wait_for_message(run / "health.sock", lambda m: isinstance(m, HealthState), topics=("health.state",))
    assert isinstance(msg, HealthState)
    assert not msg.nvml_ok and "Driver Not Loaded" in msg.error and msg.devices == []
    assert procs.procs[-1][1].poll() is None
    wait_until(lambda: procs.log("hm").count("retrying NVML") >= 2, 10, "a second init attempt")


def test_a_hung_nvml_call_marks_its_gpu_and_names_the_call_while_the_others_are_watched(
    procs: Procs, short_tmp: Path
) -> None:
    run = start_monitor(procs, short_tmp, "dgx-h100-8", HEALTH_PROBE_INTERVAL="0.5s")
    ids = [d.id for d in state(run).devices]
    stuck, xid_victim, remap_victim = ids[2], ids[5], ids[6]

    def reason(s: HealthState, dev: str) -> str:
        return next(d.reason for d in s.devices if d.id == dev)

    inject(procs, run, "hang", stuck)
    s = state(run, lambda s: health(s)[stuck] == UNHEALTHY, timeout=60)
    assert reason(s, stuck).startswith("NVML nvmlDeviceGetPciInfo hung for "), reason(s, stuck)
    assert [d for d in ids if health(s)[d] == UNHEALTHY] == [stuck]
    # The other GPUs are still watched: events arrive, and probes (a pending row remap is seen only by one) run.
    inject(procs, run, "xid", xid_victim, "48")
    inject(procs, run, "remap", remap_victim, "pending")
    s = state(run, lambda s: health(s)[xid_victim] == UNHEALTHY and health(s)[remap_victim] == UNHEALTHY,
              timeout=60)
    assert reason(s, xid_victim).startswith("XID 48")
    assert reason(s, remap_victim) == "row remap pending (GPU reset needed)"
    assert "hung for" in reason(s, stuck)
    assert sorted(d for d in ids if health(s)[d] == UNHEALTHY) == sorted([stuck, xid_victim, remap_victim])
    # Released (a GPU reset), the GPU answers again and recovers; it was never restarted.
    inject(procs, run, "recover", stuck)
    s = state(run, lambda s: health(s)[stuck] == HEALTHY, timeout=60)
    assert reason(s, stuck) == "recovered"
    assert procs.procs[0][1].poll() is None


def test_status_says_stale_with_the_age_when_the_monitor_lives_but_is_silent(procs: Procs, short_tmp: Path) -> None:
    from devtools.nvml_sim import SIM_CONTROL_SOCKET, FaultClient

    run = start_monitor(procs, short_tmp, "dgx-h100-8", GPU_PLUGIN_WATCHDOG_TIMEOUT="600", GPU_PLUGIN_STALE_AFTER="1s")
    state(run)
    wait_until(lambda: (run / "health-monitor.alive").exists(), 30, "the monitor's first answered watchdog check")
    FaultClient(run / SIM_CONTROL_SOCKET).send({"op": "freeze_loop"})

    def status() -> tuple[int, str]:
        p = procs.start("status", "status", "--timeout", "2", env={"GPU_PLUGIN_RUN_DIR": str(run),
                                                                    "GPU_PLUGIN_STALE_AFTER": "1s"})
        code = p.wait(60)
        return code, procs.log("status")

    code, out = status()
    assert code == 1 and "STALE" in out and "no health state" not in out, out
    assert "health-monitor" in out and "s ago" in out, out
    # With no publisher at all, status says so (not STALE).
    procs.procs[0][1].kill()
    procs.procs[0][1].wait()
    (procs.root / "status.log").unlink()
    code, out = status()
    assert code == 2 and "no health state" in out and "STALE" not in out, out


def test_a_gpu_hanging_in_event_registration_leaves_the_others_watched(short_tmp: Path) -> None:
    """Registration at start is per GPU under the probe deadline: one wedged GPU's
    nvmlDeviceRegisterEvents must not keep probes and events of the others from starting."""
    import asyncio
    import threading

    from common.bus.sockets import BusPublisher
    from devtools.nvml_sim import SimulatedNvml, fleet_path
    from services.health_monitor.model import RecoveryPolicy
    from services.health_monitor.monitor import HealthMonitor
    from services.health_monitor.xid_policy import XidPolicy

    release = threading.Event()
    victim: list[str] = []

    class HangingRegistration(SimulatedNvml):
        def device_register_events(self, handle: Any, event_types: int, event_set: Any) -> None:
            if victim and self.device_get_uuid(handle) == victim[0]:
                release.wait(60)  # as a wedged GPU's call does
            super().device_register_events(handle, event_types, event_set)

    async def run() -> None:
        nvml = HangingRegistration(fleet_path("dgx-h100-8"))
        pub = BusPublisher(short_tmp / "health.sock")
        states: list[HealthState] = []
        publish = pub.publish_state

        def record(state: HealthState) -> HealthState:
            sent = publish(state)
            states.append(sent)
            return sent

        pub.publish_state = record  # type: ignore[method-assign]
        monitor = HealthMonitor(nvml, pub, XidPolicy(), recovery=RecoveryPolicy("auto", 0.1, 1.0),
                                probe_deadline=0.5)
        nvml.init()
        gpus = [nvml.device_get_uuid(nvml.device_get_handle_by_index(i)) for i in range(8)]
        victim.append(gpus[3])
        stop = asyncio.Event()
        task = asyncio.create_task(monitor.run(stop))
        loop = asyncio.get_running_loop()

        async def until(predicate: Any, what: str) -> None:
            deadline = loop.time() + 20
            while not predicate():
                assert loop.time() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.05)

        try:
            await until(lambda: any(s.nvml_ok and s.devices for s in states), "the first state")
            nvml.inject({"op": "lost", "uuid": gpus[5]})  # while GPU 3 still hangs in registration
            await until(lambda: any(d.id == gpus[5] and d.health == UNHEALTHY for d in states[-1].devices),
                        "GPU 5 Unhealthy at the bus")
        finally:
            release.set()
            stop.set()
            await asyncio.wait_for(task, 10)
            pub.close()

    asyncio.run(run())


def test_a_gpu_hanging_in_discovery_is_listed_unhealthy_and_the_others_served(short_tmp: Path) -> None:
    """Discovery runs per GPU under the probe deadline: a wedged GPU is listed with the hung call
    named, instead of the monitor's loop freezing (and its watchdog restarting it, forever)."""
    import asyncio
    import threading

    from common.bus.sockets import BusPublisher
    from devtools.nvml_sim import SimulatedNvml, fleet_path
    from services.health_monitor.model import RecoveryPolicy
    from services.health_monitor.monitor import HealthMonitor
    from services.health_monitor.xid_policy import XidPolicy

    release = threading.Event()

    class HangingName(SimulatedNvml):
        def device_get_name(self, handle: Any) -> str:
            if self.device_get_minor_number(handle) == 2:
                release.wait(60)  # as a wedged GPU's call does
            return super().device_get_name(handle)

    async def run() -> HealthState:
        pub = BusPublisher(short_tmp / "health.sock")
        states: list[HealthState] = []
        publish = pub.publish_state

        def record(state: HealthState) -> HealthState:
            states.append(publish(state))
            return states[-1]

        pub.publish_state = record  # type: ignore[method-assign]
        monitor = HealthMonitor(HangingName(fleet_path("dgx-h100-8")), pub, XidPolicy(),
                                recovery=RecoveryPolicy("auto", 0.1, 1.0), probe_deadline=0.5)
        stop = asyncio.Event()
        task = asyncio.create_task(monitor.run(stop))
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + 20
            while not any(s.nvml_ok and s.devices for s in states):
                assert loop.time() < deadline, "no state published while one GPU hangs in discovery"
                await asyncio.sleep(0.05)
            return next(s for s in states if s.nvml_ok and s.devices)
        finally:
            release.set()
            stop.set()
            await asyncio.wait_for(task, 10)
            pub.close()

    first = asyncio.run(run())
    gpus = {d.index: d for d in first.devices if d.kind == "gpu"}
    assert len(gpus) == 8
    assert gpus["2"].health == UNHEALTHY and "NVML discovery hung" in gpus["2"].reason
    assert all(d.health == HEALTHY for i, d in gpus.items() if i != "2")
