"""The plugin-server's state -> resources step, in-process: heartbeats, NVML lost after
discovery, topology changes, and the resources per strategy."""

from __future__ import annotations

import dataclasses

from common.bus.messages import UNHEALTHY, HealthState, PairLink
from common.settings import resolve
from services.plugin_server.device_table import serve
from tests.unit.test_allocation import _gpu, _mig

SETTINGS = resolve(environ={})
GPUS = [_gpu(n) for n in range(4)]


def state(seq: int, devices: list = GPUS, nvml_ok: bool = True, error: str = "",  # type: ignore[type-arg]
          links: list[PairLink] | None = None) -> HealthState:
    return HealthState(incarnation="i", seq=seq, sent_at=float(seq), nvml_ok=nvml_ok, error=error,
                       driver_version="580", devices=devices, links=links or [])


def test_a_heartbeat_changes_nothing() -> None:
    first = serve(None, state(1), None, SETTINGS)
    assert first is not None and first.topology_changed
    assert serve(state(1), dataclasses.replace(state(1), sent_at=9.0), first.last_good, SETTINGS) is None


def test_devices_are_served_per_resource() -> None:
    view = serve(None, state(1), None, SETTINGS)
    assert view is not None and list(view.resources) == ["nvidia.com/gpu"]
    assert [d.id for d in view.resources["nvidia.com/gpu"]] == [g.id for g in GPUS]
    mig = [dataclasses.replace(_gpu(0), mig_enabled=True), _mig(0, 0), _mig(0, 1)]
    mixed = serve(None, state(1, mig), None, resolve(environ={"MIG_STRATEGY": "mixed"}))
    assert mixed is not None and "nvidia.com/gpu" not in mixed.resources
    assert sum(len(v) for v in mixed.resources.values()) == 2


def test_nvml_lost_after_discovery_keeps_the_devices_listed_unhealthy() -> None:
    good = serve(None, state(1), None, SETTINGS)
    assert good is not None
    lost = serve(state(1), state(2, [], nvml_ok=False, error="driver gone"), good.last_good, SETTINGS)
    assert lost is not None and lost.error == "driver gone" and lost.last_good == state(1)
    served = lost.resources["nvidia.com/gpu"]
    assert [d.id for d in served] == [g.id for g in GPUS]
    assert all(d.health == UNHEALTHY and d.device.reason == "NVML unavailable: driver gone" for d in served)
    assert not lost.topology_changed, "the same devices: the preferred-allocation tables stay"
    back = serve(state(2, [], nvml_ok=False), state(3), lost.last_good, SETTINGS)
    assert back is not None and back.error == ""
    assert all(d.health == "Healthy" for d in back.resources["nvidia.com/gpu"])


def test_nvml_never_working_serves_nothing() -> None:
    view = serve(None, state(1, [], nvml_ok=False, error="no driver"), None, SETTINGS)
    assert view is not None and view.last_good is None and view.resources.get("nvidia.com/gpu", []) == []


def test_the_topology_is_rebuilt_only_when_links_or_devices_change() -> None:
    link = PairLink(GPUS[0].id, GPUS[1].id, nvlinks=4, level=10)
    first = state(1)
    same = serve(first, state(2), first, SETTINGS)
    assert same is not None and not same.topology_changed, "a health change only"
    linked = serve(first, state(2, links=[link]), first, SETTINGS)
    assert linked is not None and linked.topology_changed
    fewer = serve(first, state(2, GPUS[:3]), first, SETTINGS)
    assert fewer is not None and fewer.topology_changed
