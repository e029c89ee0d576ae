"""The health rules in-process, with a fake clock: every fault, recovery, MIG-placement and
policy rule, without processes, sockets or waiting. The inventories come from the real
discovery code run against the simulated driver."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from common.bus.messages import HEALTHY, UNHEALTHY, HealthEvent
from common.cordons import Cordon
from common.nvml.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    GPU_RECOVERY_ACTION_GPU_RESET,
    GPU_RECOVERY_ACTION_NONE,
    WHOLE_GPU_INSTANCE,
    EventData,
)
from common.settings import HealthConfig
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.health_monitor.discovery import Inventory, discover
from services.health_monitor.model import HealthModel, Probe, RecoveryPolicy
from services.health_monitor.xid_policy import XidPolicy

PROBE_S = 10.0
QUIET_S = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def inventory(fleet: str) -> Inventory:
    nvml = SimulatedNvml(fleet_path(fleet))
    nvml.init()
    try:
        return discover(nvml, 1_700_000_000.0)
    finally:
        nvml.shutdown()


@pytest.fixture(scope="module")
def plain() -> Inventory:
    return inventory("dgx-h100-8")


@pytest.fixture(scope="module")
def mig() -> Inventory:
    return inventory("dgx-h100-8-mig")


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    yield FakeClock()


def model_of(inv: Inventory, clock: FakeClock, *, policy: XidPolicy | None = None, recovery: str = "auto",
             health: HealthConfig | None = None) -> HealthModel:
    m = HealthModel(policy or XidPolicy(), RecoveryPolicy(recovery, PROBE_S, QUIET_S), health, clock)
    m.load_inventory(inv)
    assert m.refresh() is False, "a freshly discovered healthy node has nothing to change"
    return m


def gpus(inv: Inventory) -> list[str]:
    return list(inv.handles)


def xid(uuid: str | None, n: int, gi: int = WHOLE_GPU_INSTANCE, ci: int = WHOLE_GPU_INSTANCE) -> EventData:
    return EventData(uuid, EVENT_XID_CRITICAL, n, gi, ci)


def clean(gpu: str, action: int | None = None, dbe: int | None = 0) -> Probe:
    return Probe(gpu, recovery_action=action, dbe_total=dbe)


def unhealthy(m: HealthModel) -> set[str]:
    return {d.id for d in m.devices.values() if d.health == UNHEALTHY}


def transitions(events: list[HealthEvent]) -> list[tuple[str, str, str]]:
    return [(e.device, e.new, e.reason) for e in events if e.event == "transition"]


# -- events ----------------------------------------------------------------------------
def test_fatal_xid_marks_its_gpu_and_publishes_the_event_then_the_transition(plain: Inventory,
                                                                            clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[2]
    m.apply_event(xid(victim, 79))
    assert m.refresh() is True
    assert unhealthy(m) == {victim}
    dev = m.devices[victim]
    assert (dev.reason, dev.xid_count, dev.since) == ("XID 79", 1, clock.wall)
    events = m.take_events()
    assert (events[0].event, events[0].xid, events[0].reason) == ("xid", 79, "fatal")
    assert transitions(events) == [(victim, UNHEALTHY, "XID 79")]
    assert m.take_events() == [], "events are handed out once"


@pytest.mark.parametrize(("n", "fatal"), [(13, False), (31, False), (48, True), (79, True), (94, True)])
def test_default_xid_policy(plain: Inventory, clock: FakeClock, n: int, fatal: bool) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[0]
    m.apply_event(xid(victim, n))
    m.refresh()
    assert (victim in unhealthy(m)) is fatal
    assert m.devices[victim].xid_count == 1, "every XID is counted, fatal or not"


def test_configured_policy_overrides(plain: Inventory, clock: FakeClock) -> None:
    policy = XidPolicy(config_fatal=frozenset({13}), monitor_only=frozenset({79}))
    m = model_of(plain, clock, policy=policy)
    a, b = gpus(plain)[:2]
    m.apply_event(xid(a, 13))
    m.apply_event(xid(b, 79))
    m.refresh()
    assert unhealthy(m) == {a}


def test_an_event_naming_no_device_hits_every_gpu(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    m.apply_event(xid(None, 79))
    m.refresh()
    assert unhealthy(m) == set(gpus(plain))


def test_ecc_policy(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    a, b = gpus(plain)[:2]
    m.apply_event(EventData(a, EVENT_SINGLE_BIT_ECC, 0))
    m.apply_event(EventData(b, EVENT_DOUBLE_BIT_ECC, 0))
    m.refresh()
    assert unhealthy(m) == {b}
    assert (m.devices[a].sbe_count, m.devices[b].dbe_count) == (1, 1)

    strict = model_of(plain, clock, health=HealthConfig(ecc_single_bit="fatal", ecc_double_bit="report"))
    strict.apply_event(EventData(a, EVENT_SINGLE_BIT_ECC, 0))
    strict.apply_event(EventData(b, EVENT_DOUBLE_BIT_ECC, 0))
    strict.refresh()
    assert unhealthy(strict) == {a}


def test_health_checks_disabled_count_but_never_mark(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock, policy=XidPolicy(checks_enabled=False))
    victim = gpus(plain)[0]
    m.apply_event(EventData(victim, EVENT_DOUBLE_BIT_ECC, 0))
    m.apply_probes([Probe(victim, {"lost": "GPU lost"})])
    m.refresh()
    assert unhealthy(m) == set()
    assert m.devices[victim].dbe_count == 1


# -- MIG placement -----------------------------------------------------------------------
def test_instance_event_marks_only_its_mig_device(mig: Inventory, clock: FakeClock) -> None:
    m = model_of(mig, clock)
    gpu = next(g for g, kids in mig.children.items() if len(kids) > 1)
    kids = [m.devices[c] for c in mig.children[gpu]]
    target = kids[1]
    m.apply_event(xid(gpu, 79, target.gpu_instance_id, target.compute_instance_id))
    m.refresh()
    assert unhealthy(m) == {target.id}


def test_whole_gpu_event_marks_the_gpu_and_every_mig_device_on_it(mig: Inventory, clock: FakeClock) -> None:
    m = model_of(mig, clock)
    gpu = next(g for g, kids in mig.children.items() if kids)
    m.apply_event(xid(gpu, 79))
    m.refresh()
    assert unhealthy(m) == {gpu, *mig.children[gpu]}
    assert all(m.devices[c].reason == "XID 79" for c in mig.children[gpu]), "children inherit the GPU's reason"


def test_event_on_unknown_instance_falls_back_to_the_gpu(mig: Inventory, clock: FakeClock) -> None:
    m = model_of(mig, clock)
    gpu = next(g for g, kids in mig.children.items() if kids)
    m.apply_event(xid(gpu, 79, gi=99, ci=0))
    m.refresh()
    assert gpu in unhealthy(m)


def test_mig_ecc_dbe_counted_once_on_the_gpu_counter(mig: Inventory, clock: FakeClock) -> None:
    m = model_of(mig, clock)
    gpu = next(g for g, kids in mig.children.items() if kids)
    child = m.devices[mig.children[gpu][0]]
    m.apply_probes([clean(gpu, dbe=5)])
    m.apply_event(EventData(child.id, EVENT_DOUBLE_BIT_ECC, 0, child.gpu_instance_id, child.compute_instance_id))
    m.apply_probes([clean(gpu, dbe=6)])
    m.refresh()
    assert m.devices[child.id].dbe_count == 1
    assert m.devices[gpu].dbe_count == 0, "the probe saw the DBE the event already reported"


# -- probes ------------------------------------------------------------------------------
def test_probed_faults_clear_when_the_probe_stops_seeing_them(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[3]
    m.apply_probes([Probe(victim, {"remap": "row remap pending"})])
    assert m.refresh() and unhealthy(m) == {victim}
    m.apply_probes([clean(victim)])
    assert m.refresh() and unhealthy(m) == set()
    assert transitions(m.take_events())[-1] == (victim, HEALTHY, "recovered")


def test_probe_finds_a_dbe_the_events_missed(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[1]
    m.apply_probes([clean(victim, dbe=0)])
    m.apply_probes([clean(victim, dbe=2)])
    m.refresh()
    assert unhealthy(m) == {victim}
    assert m.devices[victim].dbe_count == 2


def test_discovery_failures_stay_out_until_rediscovered(plain: Inventory, clock: FakeClock) -> None:
    broken = dataclasses.replace(plain.devices[0], health=UNHEALTHY, reason="GPU lost")
    inv = dataclasses.replace(plain, devices=[broken, *plain.devices[1:]])
    m = HealthModel(XidPolicy(), RecoveryPolicy("auto", PROBE_S, QUIET_S), None, clock)
    m.load_inventory(inv)
    m.refresh()
    assert unhealthy(m) == {broken.id}
    clock.advance(QUIET_S * 10)
    m.apply_probes([clean(broken.id, action=GPU_RECOVERY_ACTION_NONE)])
    m.refresh()
    assert unhealthy(m) == {broken.id}, "it lacks what Allocate needs: a clean probe does not make it whole"
    assert m.devices[broken.id].reason == "GPU lost (at discovery; restart the plugin to rediscover)"


# -- recovery ----------------------------------------------------------------------------
def test_quiet_period_recovery_without_driver_advice(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[0]
    m.apply_event(xid(victim, 79))
    m.refresh()
    clock.advance(QUIET_S - 1)
    m.apply_probes([clean(victim)])
    assert m.refresh() is False and unhealthy(m) == {victim}, "not before the quiet period"
    clock.advance(1)
    m.apply_probes([clean(victim)])
    assert m.refresh() is True and unhealthy(m) == set()
    assert transitions(m.take_events())[-1] == (victim, HEALTHY, "recovered")


def test_a_new_fault_restarts_the_quiet_period(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[0]
    m.apply_event(xid(victim, 79))
    clock.advance(QUIET_S - 5)
    m.apply_event(xid(victim, 48))
    clock.advance(10)
    m.apply_probes([clean(victim)])
    m.refresh()
    assert unhealthy(m) == {victim}


def test_driver_advice_none_recovers_after_one_probe_interval(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[0]
    m.apply_event(xid(victim, 79))
    m.apply_probes([clean(victim, action=GPU_RECOVERY_ACTION_NONE)])
    m.refresh()
    assert unhealthy(m) == {victim}
    clock.advance(PROBE_S)
    m.apply_probes([clean(victim, action=GPU_RECOVERY_ACTION_NONE)])
    m.refresh()
    assert unhealthy(m) == set()


def test_driver_advising_a_reset_keeps_the_device_out_and_says_so(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[0]
    m.apply_event(xid(victim, 79))
    clock.advance(QUIET_S * 10)
    m.apply_probes([clean(victim, action=GPU_RECOVERY_ACTION_GPU_RESET)])
    m.refresh()
    assert unhealthy(m) == {victim}
    assert "driver advises: GPU reset" in m.devices[victim].reason
    clock.advance(PROBE_S)
    m.apply_probes([clean(victim, action=GPU_RECOVERY_ACTION_NONE)])
    m.refresh()
    assert unhealthy(m) == set(), "the advice clears with the fault"


def test_recovery_of_a_gpu_clears_its_mig_devices(mig: Inventory, clock: FakeClock) -> None:
    m = model_of(mig, clock)
    gpu = next(g for g, kids in mig.children.items() if kids)
    m.apply_event(xid(gpu, 79))
    m.refresh()
    clock.advance(QUIET_S)
    m.apply_probes([clean(gpu)])
    m.refresh()
    assert unhealthy(m) == set()


def test_policy_never_keeps_every_fault(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock, recovery="never")
    victim = gpus(plain)[0]
    m.apply_event(xid(victim, 79))
    for _ in range(3):
        clock.advance(QUIET_S * 3)
        m.apply_probes([clean(victim, action=GPU_RECOVERY_ACTION_NONE)])
    m.refresh()
    assert unhealthy(m) == {victim}


# -- cordons -----------------------------------------------------------------------------
def test_cordon_and_uncordon(mig: Inventory, clock: FakeClock) -> None:
    m = model_of(mig, clock)
    gpu = next(g for g, kids in mig.children.items() if kids)
    assert m.set_cordons({gpu: Cordon("fan noise", clock.wall), "GPU-not-here": Cordon("", 0.0)}) == ["GPU-not-here"]
    m.refresh()
    assert unhealthy(m) == {gpu, *mig.children[gpu]}
    assert m.devices[gpu].cordoned and m.devices[gpu].reason == "cordoned: fan noise"
    m.set_cordons({})
    m.refresh()
    assert unhealthy(m) == set()
    assert (gpu, HEALTHY, "uncordoned") in transitions(m.take_events())


def test_a_cordon_and_a_fault_both_hold_the_device(plain: Inventory, clock: FakeClock) -> None:
    m = model_of(plain, clock)
    victim = gpus(plain)[0]
    m.set_cordons({victim: Cordon("", clock.wall)})
    m.apply_probes([Probe(victim, {"lost": "GPU lost"})])
    m.refresh()
    assert m.devices[victim].reason == "cordoned; GPU lost"
    m.set_cordons({})
    m.refresh()
    assert unhealthy(m) == {victim}


def test_a_devices_faults_and_cordon_are_sent_apart_from_its_reason(mig: Inventory, clock: FakeClock) -> None:
    """The parts of the reason, for readers that act on the cause: a MIG device's own cordon apart from
    its GPU's fault, which it shares; none once healthy."""
    m = model_of(mig, clock)
    child = next(d for d in m.devices.values() if d.kind == "mig")
    assert child.faults == [] and child.cordon == ""  # said from the start: no faults
    m.set_cordons({child.id: Cordon("bad fan; loud", clock.wall)})
    m.apply_probes([Probe(child.parent, {"lost": "GPU lost"})])
    m.refresh()
    after = m.devices[child.id]
    assert (after.faults, after.cordon) == (["GPU lost"], "cordoned: bad fan; loud")
    assert after.reason == "cordoned: bad fan; loud; GPU lost"
    assert (m.devices[child.parent].faults, m.devices[child.parent].cordon) == (["GPU lost"], "")
    m.set_cordons({})
    m.apply_probes([Probe(child.parent)])
    clock.advance(3600)
    m.apply_probes([Probe(child.parent)])
    m.refresh()
    assert (m.devices[child.id].faults, m.devices[child.id].cordon) == ([], "")


def test_an_unreadable_cordon_file_keeps_every_device_out(mig: Inventory, clock: FakeClock) -> None:
    m = model_of(mig, clock)
    m.cordon_error = "cordoned: cordon file unreadable (not JSON); fix or remove /state/cordons.json"
    m.refresh()
    assert unhealthy(m) == set(m.devices), "nobody can tell which devices the file names"
    assert all(d.cordoned and d.reason.startswith("cordoned: cordon file unreadable") for d in m.devices.values())
    m.cordon_error = ""
    m.refresh()
    assert unhealthy(m) == set()
