"""One labeling pass's NVML facts (facts.collect) on the simulated driver: NVML initialised and shut
down around each pass, as NVIDIA's GFD does, and a pass that cannot describe every GPU fails whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.nvml.backend import MigAttributes
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.feature_discovery.facts import FactsError, InitError, collect
from services.feature_discovery.labels import PCI_CLASS_3D


def described(tmp_path: Path, change: dict[str, object], fleet: str = "h200") -> SimulatedNvml:
    desc = json.loads(fleet_path(fleet).read_text())
    desc.update(change)
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(desc))
    return SimulatedNvml(path)


def test_the_mig_fleet() -> None:
    nvml = SimulatedNvml(fleet_path("dgx-h100-8-mig"))
    facts = collect(nvml)
    assert (facts.driver_version, facts.cuda_driver_version) == ("580.159.04", 13000)
    gpus = facts.gpus
    assert len(gpus) == 8 and [g.mig_enabled for g in gpus] == [False] * 6 + [True] * 2
    assert all(g.mig_capable and g.compute_capability == (9, 0) and g.pci_class == PCI_CLASS_3D and g.fabric is None
               and g.memory_mb == 81559 for g in gpus)
    migs = facts.migs_of(gpus[7])
    assert [m.profile for m in migs] == ["1g.10gb"] * 7
    assert migs[0].attributes == MigAttributes(16, 1, 1, 0, 1, 0, 1, 1, 9984)
    assert [m.profile for m in facts.migs_of(gpus[6])] == ["3g.40gb"] * 2


def test_nvml_is_shut_down_after_each_pass() -> None:
    nvml = SimulatedNvml(fleet_path("h200"))
    collect(nvml)
    assert nvml.library() == ""  # not initialised: nothing held between passes
    assert len(collect(nvml).gpus) == 1  # and the next pass initialises it again


def test_init_failure_is_an_init_error(tmp_path: Path) -> None:
    with pytest.raises(InitError, match="Driver Not Loaded"):
        collect(described(tmp_path, {"init_error": 9}))


def test_mig_mode_not_supported_is_not_mig_capable(tmp_path: Path) -> None:
    desc = json.loads(fleet_path("h200").read_text())
    del desc["devices"][0]["mig_mode"]  # the simulation answers NOT_SUPPORTED, as a pre-Ampere GPU does
    nvml = described(tmp_path, {"devices": desc["devices"]})
    assert collect(nvml).gpus[0].mig_capable is False


@pytest.mark.parametrize(("field", "match"), [
    ("name", "GPU lost"),  # discovery lists it Unhealthy: the pass fails instead of labeling 7 of 8
    ("cuda_compute_capability", "failed to determine CUDA compute capability of GPU"),  # discovery logs NVML's reason
])
def test_a_gpu_that_cannot_be_described_fails_the_pass(tmp_path: Path, field: str, match: str) -> None:
    desc = json.loads(fleet_path("dgx-h100-8").read_text())
    desc["devices"][2][field] = {"error": 15}
    nvml = described(tmp_path, {"devices": desc["devices"]}, "dgx-h100-8")
    with pytest.raises(FactsError, match=match):
        collect(nvml)
    assert nvml.library() == ""  # shut down after the failure too


def test_no_gpus(tmp_path: Path) -> None:
    facts = collect(described(tmp_path, {"devices": []}))
    assert facts.devices == () and facts.gpus == []


class Counting(SimulatedNvml):
    topology_calls = 0

    def device_get_nvlink_state(self, handle: object, link: int) -> int:
        self.topology_calls += 1
        return super().device_get_nvlink_state(handle, link)

    def device_get_topology_common_ancestor(self, handle1: object, handle2: object) -> int:
        self.topology_calls += 1
        return super().device_get_topology_common_ancestor(handle1, handle2)


def test_no_topology_is_asked() -> None:
    # NVIDIA's GFD asks no NVLink or PCIe topology; discovery would (18 links x 8 GPUs, 28 pairs).
    nvml = Counting(fleet_path("dgx-h100-8"))
    assert len(collect(nvml).gpus) == 8
    assert nvml.topology_calls == 0
