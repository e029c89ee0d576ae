"""A device's health reaches every ID the kubelet holds for it, in every way it is served.

The kubelet fills a pod's `allocatedResourcesStatus` (KEP-4680, ResourceHealthStatus) from the
health of the IDs in ListAndWatch: an ID left Healthy when its device is not hides the fault from
the pod's status as it would from the scheduler. One device is Unhealthy on the bus; in each mode
the IDs served for it, and only those, are Unhealthy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, HealthState
from common.settings import resolve
from services.plugin_server.device_table import MpsReadiness, build_resources
from tests.unit.test_allocation import _gpu, _mig

SICK = _gpu(1).id


def _state(devices: list[DeviceState]) -> HealthState:
    return HealthState(incarnation="i", seq=1, sent_at=1.0, nvml_ok=True, error="", driver_version="580",
                       devices=devices)


def _sick(d: DeviceState) -> DeviceState:
    return dataclasses.replace(d, health=UNHEALTHY, reason="XID 79")


def _config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\n" + text, encoding="utf-8")
    return {"CONFIG_FILE": str(path)}


GPUS = [_gpu(n) for n in range(3)]
MIG_GPUS = [dataclasses.replace(g, mig_enabled=True) for g in GPUS]
MIGS = [_mig(g, n) for g in range(3) for n in range(2)]
SICK_MIG = MIGS[2].id  # GPU 1's first MIG device
TIME_SLICED = "sharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
RENAMED = ("sharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n"
           "    - name: nvidia.com/gpu\n      replicas: 2\n")
MPS = "sharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 3\n"
MIG_SLICED = "sharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/mig-1g.10gb\n      replicas: 2\n"

# id, devices on the bus (the sick one included), env, config, the device whose IDs must be Unhealthy,
# how many IDs it has
CASES = [
    ("whole-gpus", [GPUS[0], _sick(GPUS[1]), GPUS[2]], {}, "", SICK, 1),
    ("time-slicing", [GPUS[0], _sick(GPUS[1]), GPUS[2]], {}, TIME_SLICED, SICK, 4),
    ("time-slicing-renamed", [GPUS[0], _sick(GPUS[1]), GPUS[2]], {}, RENAMED, SICK, 2),
    ("mps", [GPUS[0], _sick(GPUS[1]), GPUS[2]], {}, MPS, SICK, 3),
    ("mig-mixed", [*MIG_GPUS, *MIGS[:2], _sick(MIGS[2]), *MIGS[3:]], {"MIG_STRATEGY": "mixed"}, "", SICK_MIG, 1),
    ("mig-single", [*MIG_GPUS, *MIGS[:2], _sick(MIGS[2]), *MIGS[3:]], {"MIG_STRATEGY": "single"}, "", SICK_MIG,
     1),
    ("mig-single-time-slicing", [*MIG_GPUS, *MIGS[:2], _sick(MIGS[2]), *MIGS[3:]], {"MIG_STRATEGY": "single"},
     TIME_SLICED, SICK_MIG, 4),
    ("mig-mixed-time-slicing", [*MIG_GPUS, *MIGS[:2], _sick(MIGS[2]), *MIGS[3:]], {"MIG_STRATEGY": "mixed"},
     MIG_SLICED, SICK_MIG, 2),
    # MIG strategy none: the whole GPU is served, and a broken MIG device on it breaks it.
    ("mig-none", [*MIG_GPUS, *MIGS[:2], _sick(MIGS[2]), *MIGS[3:]], {}, "", SICK, 1),
]


@pytest.mark.parametrize(("devices", "env", "config", "sick", "ids"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_one_device_unhealthy_reaches_every_id_served_for_it(
        tmp_path: Path, devices: list[DeviceState], env: dict[str, str], config: str, sick: str, ids: int) -> None:
    settings = resolve(environ={**env, **(_config(tmp_path, config) if config else {})})
    mps = MpsReadiness({"nvidia.com/gpu": True}, {"nvidia.com/gpu"})
    served = [d for devs in build_resources(_state(devices), settings, mps).values() for d in devs]
    unhealthy = [d.id for d in served if d.health != HEALTHY]
    of_sick = [d.id for d in served if d.id.split("::")[0] == sick]
    assert len(of_sick) == ids, of_sick
    assert sorted(unhealthy) == sorted(of_sick), "the sick device's IDs, and only those, are Unhealthy"
    assert len(served) > len(of_sick), "the other devices are served too"
