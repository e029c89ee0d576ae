"""The kube-agent's metrics as plain code: bus messages in, Prometheus' text format out (parsed back
with prometheus_client's own parser, so that what a scraper reads is what is checked)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from common.bus.messages import (
    UNHEALTHY,
    CallCount,
    ConfigInfo,
    DeviceState,
    EndpointState,
    HealthEvent,
    HealthState,
    KubeletPresence,
    KubeState,
    MpsDaemon,
    MpsState,
    PluginState,
    RegistrarState,
    Registration,
)
from common.version import VERSION
from services.kube_agent import metrics
from services.kube_agent.metrics import Collector
from tests.conftest import discovered

HOST = "gpu-node-7"
DCGM = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")  # on every per-device series
DCGM_MIG = (*DCGM, "GPU_I_PROFILE", "GPU_I_ID")


@pytest.fixture(scope="module")
def fleet() -> list[DeviceState]:
    """The MIG fleet as the health-monitor discovers it: 8 H100s, two of them split into MIG devices."""
    return discovered("dgx-h100-8-mig")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def health(devices: list[DeviceState], incarnation: str = "h1", **kw: object) -> HealthState:
    return HealthState(incarnation=incarnation, seq=1, sent_at=1.0, nvml_ok=True, error="", driver_version="580",
                       devices=devices, **kw)  # type: ignore[arg-type]


def samples(text: str) -> Iterator[Sample]:
    for family in text_string_to_metric_families(text):
        yield from family.samples


def series(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """name's samples by their label set; fails on a label set given twice (a scrape Prometheus refuses)."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for s in samples(text):
        if s.name == name:
            key = tuple(sorted(s.labels.items()))
            assert key not in out, f"{name}{dict(key)} twice"
            out[key] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    hits = [v for k, v in series(text, name).items() if labels.items() <= dict(k).items()]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} series"
    return hits[0]


def test_per_device_series_carry_dcgm_exporters_labels_and_values(fleet: list[DeviceState]) -> None:
    c = Collector(HOST)
    c.observe(health(fleet))
    text = c.render()
    # As DCGM exporter writes them (its template's order): a GPU by index, UUID, bus ID, node, model, host.
    gpu0 = fleet[0]
    assert (f'gpu_plugin_device_healthy{{gpu="0",UUID="{gpu0.id}",pci_bus_id="00000000:18:00.0",device="nvidia0",'
            f'modelName="NVIDIA H100 80GB HBM3",Hostname="{HOST}"}} 1') in text.splitlines()
    # A MIG device by its GPU's, plus its GPU instance's profile and ID (and its own UUID, ours).
    mig = next(d for d in fleet if d.kind == "mig" and d.gpu_instance_id == 7)
    gpu7 = next(d for d in fleet if d.id == mig.parent)
    assert (f'gpu_plugin_device_healthy{{gpu="7",UUID="{gpu7.id}",pci_bus_id="00000000:DB:00.0",device="nvidia7",'
            f'modelName="NVIDIA H100 80GB HBM3",GPU_I_PROFILE="1g.10gb",GPU_I_ID="7",Hostname="{HOST}",'
            f'mig_uuid="{mig.id}"}} 1') in text.splitlines()
    families = [s for s in samples(text) if s.name.startswith("gpu_plugin_device_")]
    assert {s.name for s in families} >= {"gpu_plugin_device_healthy", "gpu_plugin_device_cordoned",
                                          "gpu_plugin_device_xid_errors_total", "gpu_plugin_device_ecc_errors_total",
                                          "gpu_plugin_device_health_since_timestamp_seconds"}
    for s in families:
        labels = s.labels
        assert set(DCGM_MIG if "mig_uuid" in labels else DCGM) <= set(labels), s
        assert labels["device"] == f"nvidia{labels['gpu']}" and labels["Hostname"] == HOST
    # One series per device and family: 8 GPUs and 9 MIG devices, none twice.
    assert len(series(text, "gpu_plugin_device_healthy")) == len(fleet) == 17


def test_device_counts_and_events(fleet: list[DeviceState], monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [d for d in fleet if d.kind == "gpu"]
    sick = dataclasses.replace(gpus[1], health=UNHEALTHY, reason="XID 79", cordoned=True, xid_count=3, sbe_count=2,
                               dbe_count=1)
    c = Collector(HOST)
    c.observe(health([gpus[0], sick, *gpus[2:]]))
    for xid, verdict in ((79, "fatal"), (79, "fatal"), (13, "ignored")):
        c.observe(HealthEvent(time=1.0, device=sick.id, event="xid", xid=xid, reason=verdict))
    c.observe(HealthEvent(time=1.0, device="", event="xid", xid=94, reason="monitor-only"))  # every GPU's
    c.observe(HealthEvent(time=1.0, device=sick.id, event="transition", old="Healthy", new="Unhealthy"))
    c.observe(HealthEvent(time=1.0, device=sick.id, event="ecc", reason="ECC SBE"))  # counted by the state
    text = c.render()
    uuid = sick.id
    assert value(text, "gpu_plugin_device_healthy", UUID=uuid) == 0
    assert value(text, "gpu_plugin_device_cordoned", UUID=uuid) == 1
    assert value(text, "gpu_plugin_device_xid_errors_total", UUID=uuid) == 3
    assert value(text, "gpu_plugin_device_ecc_errors_total", UUID=uuid, type="sbe") == 2
    assert value(text, "gpu_plugin_device_ecc_errors_total", UUID=uuid, type="dbe") == 1
    assert value(text, "gpu_plugin_device_xid_by_code_total", UUID=uuid, xid="79", verdict="fatal") == 2
    assert value(text, "gpu_plugin_device_xid_by_code_total", UUID=uuid, xid="13", verdict="ignored") == 1
    assert {dict(k)["UUID"] for k in series(text, "gpu_plugin_device_xid_by_code_total")
            if dict(k)["xid"] == "94"} == {g.id for g in gpus}
    assert value(text, "gpu_plugin_device_last_xid", UUID=uuid) == 94
    assert value(text, "gpu_plugin_device_health_transitions_total", UUID=uuid, to="Unhealthy") == 1
    # A device the last state does not list is still counted, by its UUID.
    c.observe(HealthEvent(time=1.0, device="GPU-gone", event="xid", xid=48, reason="fatal"))
    assert value(c.render(), "gpu_plugin_device_xid_by_code_total", UUID="GPU-gone") == 1
    # A flood of codes costs a bounded number of series; what comes beyond is counted as "other".
    before = series(c.render(), "gpu_plugin_device_xid_by_code_total")
    monkeypatch.setattr(metrics, "MAX_EVENT_SERIES", len(before) + 4)
    for xid in range(1000, 1020):
        c.observe(HealthEvent(time=1.0, device=uuid, event="xid", xid=xid, reason="fatal"))
    flood = series(c.render(), "gpu_plugin_device_xid_by_code_total")
    assert len(flood) == len(before) + 4 + 1 and sum(flood.values()) == sum(before.values()) + 20
    assert value(c.render(), "gpu_plugin_device_xid_by_code_total", UUID=uuid, xid="other") > 0
    # A flood of device names the node does not have: one "other" series for them all, not one each.
    for i in range(20_000):
        c.observe(HealthEvent(time=1.0, device=f"GPU-ghost-{i}", event="xid", xid=1000 + i % 50, reason="fatal"))
    ghosts = series(c.render(), "gpu_plugin_device_xid_by_code_total")
    assert len(ghosts) == len(flood) + 1 and sum(ghosts.values()) == sum(flood.values()) + 20_000
    assert value(c.render(), "gpu_plugin_device_xid_by_code_total", UUID="other", xid="other") == 20_000
    assert len(series(c.render(), "gpu_plugin_device_last_xid")) <= metrics.MAX_EVENT_SERIES


def test_the_plugin_registrar_config_and_mps_series() -> None:
    c = Collector(HOST)
    ep = EndpointState(resource="nvidia.com/gpu", endpoint="nvidia-gpu.sock", socket_id="1:2",
                       pre_start_required=False, get_preferred_allocation_available=True, streams=1, healthy=7,
                       total=8)
    c.observe(PluginState(incarnation="p1", seq=1, sent_at=1.0, health_incarnation="h1", health_stale=True,
                          endpoints=[ep], bus_dropped=4,
                          config=ConfigInfo(digest="0123456789ab", reloads=2, refusals=1, refused="bad"),
                          calls=[CallCount("nvidia.com/gpu", "Allocate", "OK", 5),
                                 CallCount("nvidia.com/gpu", "Allocate", "INVALID_ARGUMENT", 1),
                                 CallCount("nvidia.com/gpu", "GetPreferredAllocation", "OK", 3)]))
    reg = Registration(resource="nvidia.com/gpu", endpoint="nvidia-gpu.sock", socket_id="1:2", kubelet_id="9:9",
                       time=1.0, adopted=False)
    c.observe(RegistrarState(incarnation="r1", seq=1, sent_at=1.0, kubelet="present", kubelet_id="9:9",
                             registrations=[reg], pending=["nvidia.com/mig-1g.10gb"], registers=4,
                             register_failures=2, kubelet_restarts=3))
    c.observe(MpsState(incarnation="m1", seq=1, sent_at=1.0, root="/mps", daemons=[
        MpsDaemon(resource="nvidia.com/gpu.shared", devices=[], pipe_dir="/mps/p", up=True, ready=True, restarts=1)]))
    c.observe(KubeState(incarnation="k1", seq=1, sent_at=1.0, api_reachable=False, node="n", config="ts-4",
                        digest="ba9876543210", parts=["per-node configuration"]))
    text = c.render()
    gpu = {"resource": "nvidia.com/gpu"}
    assert value(text, "gpu_plugin_grpc_calls_total", method="Allocate", code="OK", **gpu) == 5
    assert value(text, "gpu_plugin_grpc_calls_total", method="Allocate", code="INVALID_ARGUMENT", **gpu) == 1
    assert value(text, "gpu_plugin_grpc_calls_total", method="GetPreferredAllocation", code="OK", **gpu) == 3
    assert value(text, "gpu_plugin_listandwatch_streams", **gpu) == 1
    assert (value(text, "gpu_plugin_resource_devices", **gpu), value(text, "gpu_plugin_resource_healthy_devices",
                                                                      **gpu)) == (8, 7)
    assert value(text, "gpu_plugin_health_state_stale") == 1
    assert value(text, "gpu_plugin_bus_messages_dropped_total", subscriber="plugin-server") == 4
    assert value(text, "gpu_plugin_kubelet_state", state="present") == 1
    assert value(text, "gpu_plugin_kubelet_state", state="refusing") == 0
    assert value(text, "gpu_plugin_resource_registered", **gpu) == 1
    assert value(text, "gpu_plugin_resource_registered", resource="nvidia.com/mig-1g.10gb") == 0
    assert (value(text, "gpu_plugin_registrations_total"), value(text, "gpu_plugin_registration_failures_total"),
            value(text, "gpu_plugin_kubelet_restarts_total")) == (4, 2, 3)
    plugin = {"service": "plugin-server"}
    assert value(text, "gpu_plugin_config_info", digest="0123456789ab", **plugin) == 1
    assert value(text, "gpu_plugin_config_reloads_total", **plugin) == 2
    assert value(text, "gpu_plugin_config_reload_failures_total", **plugin) == 1
    assert value(text, "gpu_plugin_config_refused", **plugin) == 1
    assert value(text, "gpu_plugin_kube_api_reachable") == 0
    assert value(text, "gpu_plugin_config_selected_info", config="ts-4", digest="ba9876543210") == 1
    assert value(text, "gpu_plugin_mps_daemon_ready", resource="nvidia.com/gpu.shared") == 1
    assert value(text, "gpu_plugin_mps_daemon_restarts_total", resource="nvidia.com/gpu.shared") == 1
    assert value(text, "gpu_plugin_build_info", version=VERSION, Hostname=HOST) == 1
    # Every family is the host's: a join on Hostname works for the pod-level series too.
    assert all(s.labels.get("Hostname") == HOST for s in samples(text))


def test_a_resource_is_one_registered_series_while_the_kubelet_is_away_or_replaced() -> None:
    """The registrar keeps a registration with the kubelet it was made with while that kubelet is gone,
    with the resource pending for the next one: one series, 0, not a 1 and a 0 of the same labels."""
    gpu = {"resource": "nvidia.com/gpu"}
    reg = Registration(resource="nvidia.com/gpu", endpoint="nvidia-gpu.sock", socket_id="1:2", kubelet_id="9:9",
                       time=1.0, adopted=False)

    def registered(kubelet: KubeletPresence, kubelet_id: str, pending: list[str]) -> float:
        c = Collector(HOST)
        c.observe(RegistrarState(incarnation="r1", seq=1, sent_at=1.0, kubelet=kubelet, kubelet_id=kubelet_id,
                                 registrations=[reg], pending=pending))
        return value(c.render(), "gpu_plugin_resource_registered", **gpu)  # fails on a series given twice

    assert registered("present", "9:9", []) == 1
    assert registered("absent", "", ["nvidia.com/gpu"]) == 0  # the kubelet restarting
    assert registered("present", "9:10", ["nvidia.com/gpu"]) == 0  # a new kubelet, not registered with yet
    assert registered("present", "9:10", []) == 0  # the old kubelet's registration only


def test_each_kube_agent_part_exports_its_own_series_only_where_it_runs() -> None:
    def rendered(**kw: object) -> str:
        c = Collector(HOST)
        c.observe(KubeState(incarnation="k1", seq=1, sent_at=1.0, api_reachable=False, node="n",
                            **kw))  # type: ignore[arg-type]
        return c.render()

    # Metrics alone: no API is read and no config selected, and neither may read as such (an alert on
    # gpu_plugin_kube_api_reachable == 0 would fire on every node without per-node configuration).
    alone = rendered(parts=["metrics"])
    assert not series(alone, "gpu_plugin_kube_api_reachable") and not series(alone, "gpu_plugin_config_selected_info")
    assert not [s for s in samples(alone) if s.name.startswith("gpu_plugin_node_")]
    # Node health: its condition as written, its Events' counts and whether its writes fail.
    text = rendered(parts=["metrics", "node health"], node_condition="True", node_condition_reason="GpuLost",
                    node_events_written=7, node_events_pending=2, node_events_dropped=1,
                    node_health_error="node condition GPUUnhealthy: HTTP 403: forbidden")
    assert not series(text, "gpu_plugin_kube_api_reachable")
    assert {dict(k)["status"]: v for k, v in series(text, "gpu_plugin_node_condition").items()} == {
        "True": 1, "False": 0, "Unknown": 0}
    assert value(text, "gpu_plugin_node_condition_reason_info", status="True", reason="GpuLost") == 1
    assert (value(text, "gpu_plugin_node_events_written_total"), value(text, "gpu_plugin_node_events_pending"),
            value(text, "gpu_plugin_node_events_dropped_total"), value(text, "gpu_plugin_node_health_write_failing")) \
        == (7, 2, 1, 1)
    # Not written yet: every status 0, no reason.
    fresh = rendered(parts=["node health"])
    assert set(series(fresh, "gpu_plugin_node_condition").values()) == {0}
    assert not series(fresh, "gpu_plugin_node_condition_reason_info")
    assert value(fresh, "gpu_plugin_node_health_write_failing") == 0
    # Per-node configuration: its series, and not node health's.
    config = rendered(parts=["per-node configuration"], config="ts-4", digest="ba9876543210")
    assert value(config, "gpu_plugin_kube_api_reachable") == 0
    assert value(config, "gpu_plugin_config_selected_info", config="ts-4") == 1
    assert not series(config, "gpu_plugin_node_condition")


def test_restarts_staleness_and_escaping(fleet: list[DeviceState]) -> None:
    clock = Clock()
    c = Collector(HOST, monotonic=clock)
    clock.now = 103.0
    text = c.render()
    # The buses every pod has are aged from the start until they speak; the others only once they have.
    assert series(text, "gpu_plugin_bus_message_age_seconds") == {
        (("Hostname", HOST), ("bus", b)): 3.0 for b in ("health", "plugin", "registrar")}
    assert not series(text, "gpu_plugin_service_restarts_total")
    for incarnation in ("a", "a", "b", "b", "c"):
        c.observe(health(fleet[:1], incarnation=incarnation))
    c.observe(KubeState(incarnation="k", seq=1, sent_at=1.0, api_reachable=True, node="n"))
    clock.now = 105.5
    text = c.render()
    assert value(text, "gpu_plugin_service_restarts_total", service="health-monitor") == 2
    assert value(text, "gpu_plugin_bus_message_age_seconds", bus="health") == 2.5
    assert value(text, "gpu_plugin_bus_message_age_seconds", bus="plugin") == 5.5
    assert value(text, "gpu_plugin_bus_message_age_seconds", bus="kube") == 2.5
    # What others wrote reaches a label only escaped: quotes, backslashes and new lines read back as sent.
    odd = 'nvidia.com/"odd"\\name\nx'
    ep = EndpointState(resource=odd, endpoint="e.sock", socket_id="1:2", pre_start_required=False,
                       get_preferred_allocation_available=True, streams=0, healthy=0, total=0)
    c.observe(PluginState(incarnation="p", seq=1, sent_at=1.0, health_incarnation="", health_stale=False,
                          endpoints=[ep]))
    assert value(c.render(), "gpu_plugin_resource_devices", resource=odd) == 0
