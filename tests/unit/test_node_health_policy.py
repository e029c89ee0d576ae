"""Node health's pure policy (services.kube_agent.node_health, node_events): the GPUUnhealthy condition,
the Events a change of the health bus makes, and their aggregation and rate limits, with states built
in-process and a stepped clock. The reason texts are the health-monitor's own: its model and probes
run against the simulated driver, so a text changed there fails here."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from common import restarts
from common.bus.messages import HEALTHY, UNHEALTHY, ConfigInfo, DeviceState, HealthEvent, HealthState, KubeState
from common.cordons import Cordon
from common.kubeapi import status_of
from common.lifecycle import PermanentError
from common.nvml.backend import EVENT_DOUBLE_BIT_ECC, EVENT_XID_CRITICAL, EventData
from common.settings import resolve
from devtools.kube_api import KubeApiEmulator
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.cli import _node_health_line
from services.health_monitor.discovery import discover
from services.health_monitor.model import HealthModel, Probe
from services.health_monitor.probes import Prober, probe_gpu
from services.health_monitor.xid_policy import FATAL, IGNORED, MONITOR_ONLY, XidPolicy
from services.kube_agent import __main__ as kube_agent
from services.kube_agent.board import KubeBoard
from services.kube_agent.node_events import AGGREGATE_MAX, BURST, COMBINED, KEYS, PENDING, REFILL_S, Correlator
from services.kube_agent.node_health import (
    MAX_MESSAGE,
    SILENT_S,
    XID_VERDICTS,
    Changes,
    Occurrence,
    condition_of,
    cordon_of,
    faults_of,
)


def state(devices: list[DeviceState], nvml_ok: bool = True, error: str = "", seq: int = 1,
          config: ConfigInfo | None = None, incarnation: str = "a") -> HealthState:
    return HealthState(incarnation=incarnation, seq=seq, sent_at=0.0, nvml_ok=nvml_ok, error=error,
                       driver_version="580", devices=devices, config=config or ConfigInfo())


def gpu(i: int, reason: str = "", cordoned: bool = False) -> DeviceState:
    return DeviceState(id=f"GPU-{i:08x}-0000-0000-0000-000000000000", kind="gpu", index=str(i), name="H100",
                       health=UNHEALTHY if reason else HEALTHY, reason=reason, since=0.0, cordoned=cordoned)


def mig(parent: DeviceState, j: int, reason: str = "") -> DeviceState:
    return DeviceState(id=f"MIG-{j:08x}-1111-0000-0000-000000000000", kind="mig", index=f"{parent.index}:{j}",
                       name="1g.10gb", health=UNHEALTHY if reason else HEALTHY, reason=reason, since=0.0,
                       parent=parent.id)


# -- the health-monitor's own texts ---------------------------------------------------------------

def test_the_monitors_reason_texts_name_their_causes() -> None:
    nvml = SimulatedNvml(fleet_path("dgx-h100-8"))
    nvml.init()
    try:
        inv = discover(nvml, 1_700_000_000.0)
        ids = [d.id for d in inv.devices if d.kind == "gpu"]
        model = HealthModel(XidPolicy())
        model.load_inventory(inv)
        model.apply_event(EventData(ids[0], EVENT_XID_CRITICAL, 79))
        model.apply_event(EventData(ids[1], EVENT_DOUBLE_BIT_ECC, 0))
        nvml.inject({"op": "lost", "uuid": ids[2]})
        nvml.inject({"op": "remap", "uuid": ids[3], "failed": True})
        nvml.inject({"op": "hang", "uuid": ids[5]})
        probes = [probe_gpu(nvml, g, inv.handles[g]) for g in ids[2:4]]

        async def hung() -> list[Probe]:
            prober = Prober(nvml, 0.05, lambda: None)
            try:
                return await prober.probe_all({ids[5]: inv.handles[ids[5]]})
            finally:
                prober.close()  # its thread ends once the hung call returns (recovered below)

        probes += asyncio.run(hung())
        nvml.inject({"op": "recover", "uuid": ids[5]})  # lets the probe thread go
        model.apply_probes(probes)
        model.set_cordons({ids[6]: Cordon("fan noise; loud", 0.0), ids[7]: Cordon("", 0.0)})
        model.apply_event(EventData(ids[7], EVENT_XID_CRITICAL, 48))
        model.refresh()
        devices = list(model.devices.values())
    finally:
        nvml.shutdown()
    by_id = {d.id: d for d in devices}
    assert faults_of(by_id[ids[0]]) == ["XID 79"]
    assert faults_of(by_id[ids[1]]) == ["ECC DBE"]
    assert faults_of(by_id[ids[2]]) == ["GPU lost"]
    assert faults_of(by_id[ids[3]]) == ["row-remap failure"]
    assert by_id[ids[4]].health == HEALTHY  # (retired pages: an H100 has none; see test_condition_reasons)
    assert faults_of(by_id[ids[5]]) == ["NVML nvmlDeviceGetPciInfo hung"]  # the growing duration left out
    assert by_id[ids[6]].health == UNHEALTHY and faults_of(by_id[ids[6]]) == []  # a cordon, "; " in its text
    assert faults_of(by_id[ids[7]]) == ["XID 48"]  # cordoned and faulty: the fault counts
    cond = condition_of(state(devices))
    assert (cond.status, cond.reason) == ("True", "MultipleProblems")
    for cause in ("XID 79", "ECC DBE", "GPU lost", "row-remap failure", "hung"):
        assert cause in cond.message
    assert f"GPU 0 ({ids[0]}): XID 79" in cond.message and ids[6] not in cond.message
    alone = [d if d.id in (ids[0], ids[2]) else dataclasses.replace(d, health=HEALTHY, reason="") for d in devices]
    assert condition_of(state(alone)).reason == "GpuLost"  # XID 79 is the GPU fallen off the bus
    alone = [d if d.id == ids[7] else dataclasses.replace(d, health=HEALTHY, reason="") for d in devices]
    assert condition_of(state(alone)).reason == "XidError"


def test_the_monitors_parts_are_taken_as_sent_and_an_older_monitors_reason_by_its_texts() -> None:
    """The monitor sends a device's faults and its cordon apart: an operator's cordon that reads like a
    fault is a cordon. A monitor from before the parts (faults None) is read by its reason's texts."""
    reason = "cordoned: flaky; XID 79 seen last week; XID 48"
    sent = dataclasses.replace(gpu(0, reason, True), faults=["XID 48"], cordon="cordoned: flaky; XID 79 seen last week")
    assert faults_of(sent) == ["XID 48"] and cordon_of(sent) == "cordoned: flaky; XID 79 seen last week"
    assert condition_of(state([sent])).reason == "XidError"
    older = gpu(0, reason, True)
    assert older.faults is None and faults_of(older) == ["XID 79 seen last week", "XID 48"]  # what texts allow
    assert cordon_of(older) == "cordoned: flaky"
    text = "NVML nvmlDeviceGetPciInfo hung for 12 s"
    hung = dataclasses.replace(gpu(1, text), faults=[text])
    assert faults_of(hung) == ["NVML nvmlDeviceGetPciInfo hung"]  # the duration that grows at every probe left out


def test_the_verdicts_are_the_xid_policys() -> None:
    assert set(XID_VERDICTS) == {FATAL, MONITOR_ONLY} and IGNORED not in XID_VERDICTS


# -- the condition --------------------------------------------------------------------------------

def test_condition_reasons() -> None:
    g = [gpu(i) for i in range(4)]
    assert condition_of(state(g)) == condition_of(state(g))
    healthy = condition_of(state(g))
    assert (healthy.status, healthy.reason) == ("False", "AllGPUsHealthy")
    assert condition_of(state([gpu(0, "cordoned: bad fan", True)])).status == "False"
    assert condition_of(state([gpu(0, "GPU lost")])).reason == "GpuLost"
    assert condition_of(state([gpu(0, "NVML nvmlDeviceGetPciInfo hung for 12 s")])).reason == "ProbeHung"
    assert condition_of(state([gpu(0, "retired pages pending (GPU reset needed)")])).reason == "RetiredPages"
    assert condition_of(state([gpu(0, "ECC DBE"), gpu(1, "XID 79")])).reason == "MultipleProblems"
    assert condition_of(state([gpu(0, "something new")])).reason == "DeviceFault"  # never read as healthy
    nvml = condition_of(state([], nvml_ok=False, error="nvml init failed: no driver"))
    # Unknown, not True: NVML is away while the GPU Operator (re)installs the driver, and remediation
    # acting on True would reboot the node for it.
    assert (nvml.status, nvml.reason) == ("Unknown", "NvmlFailure") and "no driver" in nvml.message
    unreadable = condition_of(state(g, error="GPU index 3: NVML nvmlDeviceGetUUID hung"))
    assert (unreadable.status, unreadable.reason) == ("True", "GpuUnreadable")
    silent = condition_of(state(g), SILENT_S, 1_796_515_200.0)
    assert (silent.status, silent.reason) == ("Unknown", "HealthMonitorSilent")
    assert silent.message == "no health state from the health-monitor since 2026-12-06T00:00:00Z; GPU health unknown"
    # The same while the silence lasts: each look (every 5 s) would otherwise be a new status write.
    assert condition_of(state(g), SILENT_S + 5, 1_796_515_200.0) == condition_of(state(g), SILENT_S + 3600,
                                                                                 1_796_515_200.0) == silent


def test_a_gpus_mig_devices_are_named_by_the_gpu_unless_their_own() -> None:
    g = gpu(0, "XID 79")
    migs = [mig(g, 1, "XID 79"), mig(g, 2, "XID 79; XID 31")]
    message = condition_of(state([g, *migs])).message
    assert message.count("XID 79") == 1 and migs[0].id not in message and f"MIG 0:2 ({migs[1].id}): XID 31" in message


def test_the_message_is_bounded_and_counts_what_it_leaves_out() -> None:
    many = [gpu(i, "XID 79") for i in range(64)]
    message = condition_of(state(many)).message
    assert len(message) <= MAX_MESSAGE and message.endswith("more devices") and many[0].id in message
    long = condition_of(state([gpu(0, "probe failed: " + "x" * 5000)])).message
    assert len(long) <= MAX_MESSAGE and long.endswith("...")


# -- what makes an Event ----------------------------------------------------------------------------

def test_transitions_cordons_and_config_make_events() -> None:
    ch = Changes()
    assert ch.on_state(state([gpu(0), gpu(1)]), 1.0) == []  # the start: nothing wrong, nothing said
    out = ch.on_state(state([gpu(0, "XID 79"), gpu(1)], seq=2), 2.0)
    assert [(o.type, o.reason, o.slot) for o in out] == [("Warning", "GPUUnhealthy", f"health/{gpu(0).id}")]
    assert out[0].message == f"GPU 0 ({gpu(0).id}) Unhealthy: XID 79"
    # The same cause again (another XID 79 state): no new transition
    assert ch.on_state(state([gpu(0, "XID 79"), gpu(1)], seq=3), 3.0) == []
    out = ch.on_state(state([gpu(0, "XID 79; ECC DBE"), gpu(1)], seq=4), 4.0)
    assert [o.reason for o in out] == ["GPUUnhealthy"] and "ECC DBE" in out[0].message
    out = ch.on_state(state([gpu(0), gpu(1, "cordoned: fan", True)], seq=5), 5.0)
    assert [(o.type, o.reason) for o in out] == [("Normal", "GPURecovered"), ("Normal", "GPUCordoned")]
    assert "recovered from XID 79, ECC DBE" in out[0].message and out[1].message.endswith("cordoned: fan")
    out = ch.on_state(state([gpu(0), gpu(1)], seq=6, config=ConfigInfo("/c", "abc", reloads=1)), 6.0)
    assert [(o.reason, o.slot) for o in out] == [("GPUUncordoned", f"cordon/{gpu(1).id}"), ("ConfigApplied", "config")]
    refused = ConfigInfo("/c", "abc", refused="line 3: not YAML", refused_digest="def", reloads=1)
    out = ch.on_state(state([gpu(0), gpu(1)], seq=7, config=refused), 7.0)
    assert [(o.type, o.reason) for o in out] == [("Warning", "ConfigRefused")] and "not YAML" in out[0].message
    out = ch.on_state(state([], nvml_ok=False, error="driver gone", seq=8), 8.0)
    assert [(o.type, o.reason) for o in out] == [("Warning", "NvmlFailure")]


def test_a_start_with_a_fault_says_it_once() -> None:
    out = Changes().on_state(state([gpu(0, "GPU lost"), gpu(1, "cordoned", True)]), 1.0)
    assert [(o.reason, o.device) for o in out] == [("GPUUnhealthy", gpu(0).id)]


def test_xids_and_eccs_make_events_unless_ignored() -> None:
    ch = Changes()
    ch.on_state(state([gpu(3)]), 1.0)
    xid = ch.on_event(HealthEvent(time=5.0, device=gpu(3).id, event="xid", xid=79, reason=FATAL), 5.0)
    assert [(o.type, o.reason, o.message) for o in xid] == [
        ("Warning", "XidError", f"XID 79 on GPU 3 ({gpu(3).id}): fatal")]
    assert ch.on_event(HealthEvent(time=5.0, device=gpu(3).id, event="xid", xid=13, reason=IGNORED), 5.0) == []
    assert ch.on_event(HealthEvent(time=5.0, device="", event="xid", xid=94, reason=MONITOR_ONLY), 5.0)[0].message \
        == "XID 94 on every GPU: monitor-only"
    assert [o.reason for o in ch.on_event(HealthEvent(time=5.0, device=gpu(3).id, event="ecc", reason="ECC DBE"),
                                          5.0)] == ["EccError"]
    assert ch.on_event(HealthEvent(time=5.0, device=gpu(3).id, event="ecc", reason="ECC SBE"), 5.0) == []


# -- aggregation, counting, rate limits --------------------------------------------------------------

def xid_occ(n: int = 79, dev: int = 3, t: float = 100.0) -> Occurrence:
    return Occurrence("Warning", "XidError", f"XID {n} on GPU {dev}", t, f"GPU-{dev}")


def drain(c: Correlator, now: float) -> list[tuple[bool, int, str]]:
    out = []
    while (w := c.take(now)) is not None:
        out.append((w.create, w.count, w.message))
        c.written(w)
    return out


def test_repeats_are_counted_into_one_event() -> None:
    c = Correlator("node-1")
    c.observe(xid_occ(t=100.0), 0.0)
    assert drain(c, 0.0) == [(True, 1, "XID 79 on GPU 3")]
    c.observe(xid_occ(t=101.0), 1.0)
    c.observe(xid_occ(t=102.0), 1.0)
    w = c.take(1.0)
    assert w is not None and (w.create, w.count, w.first, w.last) == (False, 3, 100.0, 102.0)


def test_a_storm_is_a_bounded_number_of_writes_with_the_count_right() -> None:
    c = Correlator("node-1")
    writes = []
    for i in range(10_000):  # 10 000 XIDs in a minute
        now = i * 0.006
        c.observe(xid_occ(t=1000.0 + now), now)
        while (w := c.take(now)) is not None:
            writes.append(w)
            c.written(w)
    assert len(writes) <= BURST + 60 / REFILL_S + 1
    end = c.next_at(60.0)
    assert end is not None
    last = c.take(end)
    assert last is not None and last.count == 10_000 and c.take(end) is None


def test_devices_and_reasons_have_their_own_limits() -> None:
    c = Correlator("node-1")
    for i in range(100):
        c.observe(xid_occ(t=float(i)), 0.0)
        drain(c, 0.0)
    # GPU 3's XIDs spent its tokens; its recovery and another GPU's XID are not held back by them.
    c.observe(Occurrence("Normal", "GPURecovered", "GPU 3 recovered", 200.0, "GPU-3", "health/GPU-3"), 0.0)
    c.observe(xid_occ(dev=4), 0.0)
    assert [m for _, _, m in drain(c, 0.0)] == ["GPU 3 recovered", "XID 79 on GPU 4"]


def test_distinct_messages_of_one_reason_are_combined() -> None:
    c = Correlator("node-1")
    for n in range(1, 40):
        c.observe(xid_occ(n=n, dev=n), 0.0)
    names = {}
    while (w := c.take(0.0)) is not None:
        names[w.name] = w.message
        c.written(w)
    # As client-go's maxEvents: at most AGGREGATE_MAX Events of a reason, the last one combined, from
    # the AGGREGATE_MAX-th distinct message on.
    assert len(names) == AGGREGATE_MAX
    own = [m for m in names.values() if not m.startswith(COMBINED)]
    assert own == [xid_occ(n=n, dev=n).message for n in range(1, AGGREGATE_MAX)]
    assert [m for m in names.values() if m.startswith(COMBINED)] == [COMBINED + xid_occ(n=39, dev=39).message]
    # A message seen before the combining keeps its own Event (a count update of it), a new one does not.
    c.observe(xid_occ(n=1, dev=1), 1.0)
    c.observe(xid_occ(n=99, dev=99), 1.0)
    writes = [(w.create, w.count, w.message) for w in iter(lambda: c.take(1.0), None)]
    assert writes == [(False, 2, xid_occ(n=1, dev=1).message),
                      (False, 39 - (AGGREGATE_MAX - 1) + 1, COMBINED + xid_occ(n=99, dev=99).message)]


def test_while_the_api_is_away_only_the_latest_per_slot_waits() -> None:
    c = Correlator("node-1")
    dev = "GPU-3"
    for i in range(50):  # a device flapping while nothing can be written
        reason = "GPUUnhealthy" if i % 2 == 0 else "GPURecovered"
        c.observe(Occurrence("Warning" if i % 2 == 0 else "Normal", reason, reason, float(i), dev, f"health/{dev}"),
                  0.0)
    w = c.take(0.0)
    assert w is not None and w.reason == "GPURecovered" and c.take(0.0) is None
    c.failed(w, 0.0)  # the API refused: back in its slot
    c.observe(Occurrence("Warning", "GPUUnhealthy", "GPUUnhealthy", 60.0, dev, f"health/{dev}"), 0.0)
    c.failed(w, 0.0)  # a newer one took the slot: the failed one is not written again
    assert [(r, n) for r, n in [(x.reason, x.count) for x in [c.take(0.0)] if x]] == [("GPUUnhealthy", 26)]
    assert c.take(0.0) is None


def test_failed_writes_keep_their_tokens_and_tables_stay_bounded() -> None:
    c = Correlator("node-1")
    c.observe(xid_occ(), 0.0)
    for _ in range(100):  # the API away: every try fails; the bucket is not spent by them
        w = c.take(0.0)
        assert w is not None
        c.failed(w, 0.0)
    for i in range(KEYS + PENDING + 10):
        c.observe(Occurrence("Warning", f"R{i % 3}", f"m{i}", 0.0, f"GPU-{i}", f"s{i}"), 1.0)
    assert c.pending == PENDING and c.dropped > 0
    assert len(c._records) <= KEYS and len(c._buckets) <= KEYS and len(c._aggregates) <= KEYS


def test_gone_and_already_there() -> None:
    c = Correlator("node-1")
    c.observe(xid_occ(), 0.0)
    first = c.take(0.0)
    assert first is not None
    c.written(first)
    c.again(first)  # a create found it there (an earlier try landed): one more write, a patch
    again = c.take(0.0)
    assert again is not None and not again.create
    recreate = c.gone(again)  # a patch found it expired
    assert recreate.create and recreate.name == first.name


# -- wiring ---------------------------------------------------------------------------------------

def test_node_health_without_node_name_is_refused_at_start(tmp_path: Path) -> None:
    settings = resolve(None, {"HEALTH_NODE_EVENTS": "true", "GPU_PLUGIN_RUN_DIR": str(tmp_path)})
    assert kube_agent.parts(settings, {}) == ["node health"]

    class Nothing:
        def publish_state(self, state: KubeState) -> KubeState:
            return state

    with pytest.raises(PermanentError, match=r"node health \(HEALTH_NODE_EVENTS\) .* NODE_NAME is not set"):
        kube_agent._health_part(settings, "", KubeBoard(Nothing(), "", ["node health"]))


def test_a_part_refused_at_start_leaves_no_coroutine_never_awaited(short_tmp: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part's settings are checked before any part's coroutine is made: node health refused (no
    NODE_NAME) used to leave the bus heartbeat's and the metrics' coroutines made and never run."""
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.delenv("CONFIG_FILE_SRCDIR", raising=False)
    settings = resolve(None, {"GPU_PLUGIN_RUN_DIR": str(short_tmp / "run"), "METRICS_PORT": "9400",
                              "HEALTH_NODE_CONDITION": "true"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            asyncio.run(kube_agent.main(settings, asyncio.Event()))
        except PermanentError as e:  # unbound at the block's end: its frames (and what they hold) go
            assert "NODE_NAME is not set" in str(e)
        else:
            raise AssertionError("node health started without NODE_NAME")
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


def test_the_kube_agents_pause_after_quick_failures_grows_and_is_capped(tmp_path: Path) -> None:
    start = 1_000_000.0
    record = None
    pauses = []
    for _ in range(9):  # each process fails 0.1 s after its start, restarted 0.1 s after the exit before
        count, pause = restarts.pause_for(record, start, start + 0.1)
        pauses.append(pause)
        restarts.write_record(tmp_path, "kube-agent", count, start + 0.1 + pause)
        record = restarts.read_record(tmp_path, "kube-agent")
        start += 0.1 + pause + 0.1
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    # A failure after a long run is no loop: at once, the count reset.
    assert restarts.pause_for(record, start, start + restarts.QUICK_S) == (0, 0.0)
    # A record from before an earlier run (another loop, another pod) is not continued.
    assert restarts.pause_for((5, start - restarts.RESTART_S - 1), start, start + 0.1) == (1, 1.0)
    assert restarts.pause_for((5, start + 1), start, start + 0.1) == (1, 1.0)  # written after our start: not ours
    # An unreadable record counts as none.
    (tmp_path / f"kube-agent{restarts.SUFFIX}").write_bytes(b"\xff junk")
    assert restarts.read_record(tmp_path, "kube-agent") is None


def test_the_silence_that_makes_the_condition_unknown_follows_the_buses_heartbeat(tmp_path: Path) -> None:
    """The health-monitor heartbeats every GPU_PLUGIN_STALE_AFTER / 3: with a long stale_after a fixed
    60 s would read a healthy monitor's quiet between two heartbeats as silence."""
    class Nothing:
        def publish_state(self, state: KubeState) -> KubeState:
            return state

    board = KubeBoard(Nothing(), "node-1", ["node health"])
    env = {"HEALTH_NODE_CONDITION": "true", "GPU_PLUGIN_RUN_DIR": str(tmp_path)}
    assert kube_agent._health_part(resolve(None, env), "node-1", board).silent_s == SILENT_S == 60
    slow = resolve(None, {**env, "GPU_PLUGIN_STALE_AFTER": "90s"})  # a heartbeat every 30 s
    part = kube_agent._health_part(slow, "node-1", board)
    assert part.silent_s == 180
    assert condition_of(state([gpu(0)]), 2 * slow.heartbeat_s + 1, 0.0, part.silent_s).status == "False"
    assert condition_of(state([gpu(0)]), 180, 0.0, part.silent_s).status == "Unknown"


def test_the_wait_a_refusal_asks_for() -> None:
    assert status_of(429, "Too Many Requests", b"{}", "3").retry_after == 3.0
    assert status_of(429, "x", b'{"details": {"retryAfterSeconds": 7}}').retry_after == 7.0
    assert status_of(503, "x", b'{"details": {"retryAfterSeconds": 7}}', "2").retry_after == 2.0  # the header's
    assert status_of(429, "x", b"", "Wed, 21 Oct 2026 07:28:00 GMT").retry_after is None
    assert status_of(500, "x", b'{"details": {"retryAfterSeconds": true}}').retry_after is None


def test_status_shows_node_health() -> None:
    st = KubeState(api_reachable=False, node="node-1", parts=["node health"], node_condition="True",
                   node_condition_reason="GpuLost", node_events_written=3, node_events_pending=1)
    assert _node_health_line(st) == ("node health: node node-1, condition GPUUnhealthy=True (GpuLost); Events 3 "
                                     "written, 1 waiting, 0 dropped")
    refused = dataclasses.replace(st, node_condition="", node_health_error="Event GPUUnhealthy: HTTP 403: no")
    assert _node_health_line(refused).splitlines() == [
        "node health: node node-1, condition GPUUnhealthy not written (yet, or off); Events 3 written, 1 waiting, "
        "0 dropped", "node health: API WRITES FAILING (the node serves on; retrying): Event GPUUnhealthy: HTTP 403: no"]


def test_the_parts_keep_each_others_fields_on_the_kube_bus() -> None:
    sent: list[KubeState] = []

    class Bus:
        def publish_state(self, state: KubeState) -> KubeState:
            sent.append(state)
            return state

    board = KubeBoard(Bus(), "node-1", ["per-node configuration", "node health"])
    board.update(node_condition="True", node_condition_reason="GpuLost")
    board.update(node_condition="True", node_condition_reason="GpuLost")  # unchanged: not sent again
    board.publish_state(KubeState(api_reachable=True, node="node-1", config="ts-4"))  # the config part's whole state
    board.update(node_events_written=2)
    assert len(sent) == 3
    assert (sent[-1].config, sent[-1].api_reachable, sent[-1].node_condition, sent[-1].node_events_written,
            sent[-1].parts) == ("ts-4", True, "True", 2, ["per-node configuration", "node health"])


def test_the_emulated_status_patch_merges_as_the_api_server() -> None:
    emu = KubeApiEmulator()
    emu.add_node("n")
    path = "/api/v1/nodes/n/status"
    ours = {"type": "GPUUnhealthy", "status": "True", "reason": "XidError",
            "lastTransitionTime": "2026-12-06T00:00:00Z"}
    ready = {"type": "Ready", "status": "True"}
    assert emu._status_write("PATCH", path, json.dumps({"status": {"conditions": [ready]}}).encode(), "strategic")[0] \
        == 200
    emu._status_write("PATCH", path, json.dumps({"status": {"conditions": [ours]}}).encode(), "strategic")
    emu._status_write("PATCH", path, json.dumps({"status": {"conditions": [{"type": "GPUUnhealthy",
                                                                            "message": "m"}]}}).encode(), "strategic")
    assert emu.condition("n", "Ready") == ready and emu.condition("n", "GPUUnhealthy") == {**ours, "message": "m"}
    # A JSON merge patch replaces the list whole, as RFC 7386 says.
    emu._status_write("PATCH", path, json.dumps({"status": {"conditions": [ours]}}).encode(), "merge")
    assert emu.condition("n", "Ready") is None
    assert emu._status_write("PATCH", path, b"{}", "other")[0] == 415
    bad = {"status": {"conditions": [{**ours, "status": "Maybe"}]}}
    assert emu._status_write("PATCH", path, json.dumps(bad).encode(), "strategic")[0] == 422
    late = {"status": {"conditions": [{**ours, "lastTransitionTime": "yesterday"}]}}
    assert emu._status_write("PATCH", path, json.dumps(late).encode(), "strategic")[0] == 422
    assert emu.condition("n", "GPUUnhealthy") == ours  # a refused patch changes nothing


def test_every_optional_program_paces_its_crash_loop_with_its_own_record(tmp_path: Path) -> None:
    """common.restarts.paced, as feature-labels, the dra-plugin and the kube-agent run under it: a quick
    failure is recorded under the program's name (and re-raised), a PermanentError is not paced."""
    settings = resolve(None, {"GPU_PLUGIN_RUN_DIR": str(tmp_path)})

    async def fails(_settings: Any, _stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    async def permanent(_settings: Any, _stop: asyncio.Event) -> None:
        raise PermanentError("bad setting")

    async def run(main: Any, service: str) -> None:
        stop = asyncio.Event()
        stop.set()  # the pause is cut short by a stop: the test does not wait it out
        await restarts.paced(service, main)(settings, stop)

    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(run(fails, "feature-labels"))
        record = restarts.read_record(tmp_path, "feature-labels")
        assert record is not None and record[0] == attempt
    assert restarts.read_record(tmp_path, "dra-plugin") is None
    with pytest.raises(PermanentError):
        asyncio.run(run(permanent, "dra-plugin"))
    assert restarts.read_record(tmp_path, "dra-plugin") is None, "a permanent failure is not a loop to pace"
