"""feature-labels' input: the health-monitor's discovery carries what gpu-feature-discovery asks NVML,
and the bus state gives the labels the same facts as the command's own NVML pass."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from common.bus.codec import decode, encode
from common.bus.messages import UNHEALTHY, HealthState
from common.settings import resolve
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.feature_discovery.facts import collect
from services.feature_discovery.labels import PCI_CLASS_3D, LabelError, node_labels
from services.feature_labels.labeler import UNHEALTHY_COUNT, labels_of, node_facts
from services.health_monitor.discovery import discover


def bus_state(nvml: SimulatedNvml) -> HealthState:
    """What the health-monitor publishes after discovery, through the codec."""
    nvml.init()
    state = HealthState(incarnation="i", seq=1, sent_at=1.0, nvml_ok=True, error="",
                        driver_version=nvml.system_get_driver_version(),
                        cuda_driver_version=nvml.system_get_cuda_driver_version(),
                        devices=discover(nvml, 1.0).devices)
    msg = decode(*encode(state))
    assert isinstance(msg, HealthState)
    return msg


@pytest.mark.parametrize("fleet", ["dgx-h100-8", "dgx-h100-8-mig", "h200"])
def test_the_bus_state_gives_the_facts_of_gpu_feature_discoverys_own_pass(fleet: str) -> None:
    assert node_facts(bus_state(SimulatedNvml(fleet_path(fleet)))) == collect(SimulatedNvml(fleet_path(fleet)))


def test_discovery_publishes_the_feature_facts() -> None:
    state = bus_state(SimulatedNvml(fleet_path("dgx-h100-8-mig")))
    gpus = [d for d in state.devices if d.kind == "gpu"]
    assert {(g.compute_major, g.compute_minor, g.mig_capable, g.pci_class, g.fabric) for g in gpus} == {
        (9, 0, True, PCI_CLASS_3D, None)}  # the fleet's H100s: sm_90, 3D controller, outside a fabric
    migs = [d for d in state.devices if d.kind == "mig"]
    assert migs and all(m.mig_attributes is not None and m.mig_attributes.multiprocessors > 0 for m in migs)
    assert state.cuda_driver_version == 13000


def test_a_vgpu_guest_is_labelled_from_the_bus_as_by_the_command(tmp_path: Path) -> None:
    # The simulated guest's config space goes through the real parser, in discovery for both.
    desc = json.loads(fleet_path("h200").read_text())
    desc["devices"][0]["vgpu"] = {"host_driver_version": "595.71.03", "host_driver_branch": "r596_25"}
    path = tmp_path / "vgpu.json"
    path.write_text(json.dumps(desc))
    state = bus_state(SimulatedNvml(path))
    assert state.devices[0].vgpu is not None
    assert node_facts(state) == collect(SimulatedNvml(path))
    labels = labels_of(state, resolve(environ={}), "VM")
    assert {k: v for k, v in labels.items() if k.startswith("nvidia.com/vgpu.")} == {
        "nvidia.com/vgpu.present": "true", "nvidia.com/vgpu.host-driver-version": "595.71.03",
        "nvidia.com/vgpu.host-driver-branch": "r596_25"}


def described(tmp_path: Path, gpu_change: dict[str, object]) -> SimulatedNvml:
    desc = json.loads(fleet_path("dgx-h100-8").read_text())
    desc["devices"][2].update(gpu_change)
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(desc))
    return SimulatedNvml(path)


@pytest.mark.parametrize("error", [3, 15, 999], ids=["not-supported", "gpu-lost", "unknown"])
def test_a_refused_fact_is_unknown_and_never_decides_health(tmp_path: Path, error: int) -> None:
    state = bus_state(described(tmp_path, {"cuda_compute_capability": {"error": error}}))
    gpu = state.devices[2]
    assert gpu.health != UNHEALTHY and (gpu.compute_major, gpu.compute_minor) == (-1, -1)
    # NVIDIA's labeler needs it: no labels rather than labels of 7 GPUs' model only.
    with pytest.raises(LabelError, match="compute capability"):
        labels_of(state, resolve(environ={}), "DGX")


def test_a_state_without_the_facts_cannot_be_labelled() -> None:
    old = dataclasses.replace(bus_state(SimulatedNvml(fleet_path("h200"))), cuda_driver_version=0)
    with pytest.raises(LabelError, match="no CUDA driver version"):
        labels_of(old, resolve(environ={}), "DGX")


def test_the_unhealthy_count_counts_full_gpus() -> None:
    state = bus_state(SimulatedNvml(fleet_path("dgx-h100-8-mig")))
    gpu7 = next(d for d in state.devices if d.kind == "gpu" and d.index == "7")
    broken = [dataclasses.replace(d, health=UNHEALTHY) if d.id == gpu7.id or d.parent == gpu7.id
              or (d.kind == "mig" and d.index == "6:0") else d for d in state.devices]
    labels = labels_of(dataclasses.replace(state, devices=broken), resolve(environ={}), "DGX")
    assert labels[UNHEALTHY_COUNT] == "1"  # GPU 7 (with its MIG devices); GPU 6's one MIG device is not a GPU
    assert list(labels) == sorted(labels)


def test_without_nvml_only_the_labels_that_need_no_device() -> None:
    down = HealthState(incarnation="i", seq=1, sent_at=1.0, nvml_ok=False, error="nvml init failed",
                       driver_version="")
    assert labels_of(down, resolve(environ={}), "DGX H100") == node_labels(None, "none", resolve(environ={}).sharing,
                                                                           "DGX H100", None)


def test_a_mig_device_without_its_attributes_cannot_be_labelled() -> None:
    state = bus_state(SimulatedNvml(fleet_path("dgx-h100-8-mig")))
    last = [d for d in state.devices if d.kind == "mig"][-1]
    devices = [dataclasses.replace(d, mig_attributes=None) if d is last else d for d in state.devices]
    with pytest.raises(LabelError, match=f"attributes of MIG device {last.id}"):
        labels_of(dataclasses.replace(state, devices=devices), resolve(environ={"MIG_STRATEGY": "mixed"}), "DGX")
