"""The NVML calls feature discovery adds: CUDA version, compute capability, MIG attributes, the
GPU fabric, the sysfs PCI class; on the simulated backend (against the recorded H200) and on
the real one (over a stand-in pynvml).

Recorded on the H200 (h200-probe.json, driver 580.159.04): cuda_driver 13000 and
CudaComputeCapability [9, 0]; nvidia-smi -q showed its Fabric state "N/A" (not in a fabric).
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from common.nvml.backend import (
    GPU_FABRIC_STATE_COMPLETED,
    NVML_ERROR_NOT_SUPPORTED,
    FabricInfo,
    MigAttributes,
    NvmlError,
)
from common.nvml.real import RealNvml
from devtools.nvml_sim import SimulatedNvml, fleet_path
from tests.unit.test_nvml_simulated import code_of

REC_CUDA_DRIVER = 13000
REC_COMPUTE_CAPABILITY = (9, 0)
REC_BUS_ID = "00000000:00:06.0"
PCI_CLASS_3D = 0x030200


def test_h200_cuda_version_and_compute_capability_are_the_recorded_ones(h200: SimulatedNvml) -> None:
    handle = h200.device_get_handle_by_index(0)
    assert h200.system_get_cuda_driver_version() == REC_CUDA_DRIVER
    assert h200.device_get_cuda_compute_capability(handle) == REC_COMPUTE_CAPABILITY


def test_h200_is_in_no_fabric_and_a_3d_controller(h200: SimulatedNvml) -> None:
    handle = h200.device_get_handle_by_index(0)
    assert code_of(lambda: h200.device_get_gpu_fabric_info(handle)) == NVML_ERROR_NOT_SUPPORTED
    assert h200.sysfs_pci_class(REC_BUS_ID) == PCI_CLASS_3D
    assert h200.sysfs_pci_class("00000000:99:00.0") is None


@pytest.mark.parametrize("fleet", ["dgx-h100-8", "dgx-h100-8-mig"])
def test_dgx_fleets_answer_what_the_labels_need(fleet: str) -> None:
    nvml = SimulatedNvml(fleet_path(fleet))
    nvml.init()
    try:
        assert nvml.system_get_cuda_driver_version() == REC_CUDA_DRIVER
        for i in range(nvml.device_get_count()):
            h = nvml.device_get_handle_by_index(i)
            assert nvml.device_get_cuda_compute_capability(h) == (9, 0)  # H100: sm_90
            assert nvml.sysfs_pci_class(nvml.device_get_pci_info(h).bus_id) == PCI_CLASS_3D
            assert code_of(lambda h=h: nvml.device_get_gpu_fabric_info(h)) == NVML_ERROR_NOT_SUPPORTED
            assert code_of(lambda h=h: nvml.device_get_attributes(h)) == NVML_ERROR_NOT_SUPPORTED
    finally:
        nvml.shutdown()


def test_mig_attributes_of_the_mig_fleet() -> None:
    nvml = SimulatedNvml(fleet_path("dgx-h100-8-mig"))
    nvml.init()
    try:
        seen = {}
        for i in (6, 7):
            gpu = nvml.device_get_handle_by_index(i)
            for slot in range(nvml.device_get_max_mig_device_count(gpu)):
                try:
                    m = nvml.device_get_mig_device_handle_by_index(gpu, slot)
                except NvmlError:
                    continue
                a = nvml.device_get_attributes(m)
                seen[nvml.device_get_name(m).rsplit(" ", 1)[1]] = a
                assert a.memory_mb == nvml.device_get_memory_total(m) // (1 << 20)
        # The GH100's GPU instance profiles as the recorded H200 lists them (1 and 3 slices).
        assert seen["1g.10gb"] == MigAttributes(16, 1, 1, 0, 1, 0, 1, 1, 9984)
        assert seen["3g.40gb"] == MigAttributes(60, 3, 3, 0, 3, 0, 3, 3, 40448)
    finally:
        nvml.shutdown()


def test_described_fabric_and_missing_cuda_version(tmp_path: Path) -> None:
    desc = json.loads(fleet_path("h200").read_text())
    del desc["cuda_driver_version"]
    desc["devices"][0]["gpu_fabric_info"] = {"cluster_uuid": "3c1a3e26-5a3f-4b9e-9d2b-0c6f1c2d3e4f",
                                             "clique_id": 7, "state": 3, "status": 0}
    path = tmp_path / "fabric.json"
    path.write_text(json.dumps(desc))
    nvml = SimulatedNvml(path)
    nvml.init()
    try:
        h = nvml.device_get_handle_by_index(0)
        assert nvml.device_get_gpu_fabric_info(h) == FabricInfo("3c1a3e26-5a3f-4b9e-9d2b-0c6f1c2d3e4f", 7,
                                                                 GPU_FABRIC_STATE_COMPLETED, 0)
        assert code_of(nvml.system_get_cuda_driver_version) == NVML_ERROR_NOT_SUPPORTED
    finally:
        nvml.shutdown()


# --- the real backend over a stand-in pynvml -----------------------------------------------------

class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class FakeFabricInfo(ctypes.Structure):
    """pynvml's c_nvmlGpuFabricInfo_t layout."""

    _fields_ = [("clusterUuid", ctypes.c_uint8 * 16), ("status", ctypes.c_uint), ("cliqueId", ctypes.c_uint32),
                ("state", ctypes.c_uint)]


CLUSTER = uuid.UUID("3c1a3e26-5a3f-4b9e-9d2b-0c6f1c2d3e4f")


def fill_fabric(handle: Any, ref: Any) -> int:
    info = ref._obj  # what ctypes.byref wraps: the struct the caller reads after the call
    info.clusterUuid[:] = list(CLUSTER.bytes)
    info.status, info.cliqueId, info.state = 0, 7, GPU_FABRIC_STATE_COMPLETED
    return 0


def fake_pynvml(fail: str = "") -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    mod.nvmlLib = None  # type: ignore[attr-defined]
    mod.c_nvmlGpuFabricInfo_t = FakeFabricInfo  # type: ignore[attr-defined]
    attrs = types.SimpleNamespace(multiprocessorCount=16, sharedCopyEngineCount=1, sharedDecoderCount=1,
                                  sharedEncoderCount=0, sharedJpegCount=1, sharedOfaCount=0,
                                  gpuInstanceSliceCount=1, computeInstanceSliceCount=1, memorySizeMB=9984)
    answers: dict[str, Any] = {
        "nvmlInit": lambda: None,
        "nvmlSystemGetCudaDriverVersion": lambda: 13000,
        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0),
        "nvmlDeviceGetAttributes": lambda h: attrs,
        "nvmlDeviceGetGpuFabricInfo": fill_fabric,
    }

    def wrap(name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            if name == fail:
                raise FakeNVMLError(NVML_ERROR_NOT_SUPPORTED)
            return fn(*args)
        return call

    for name, fn in answers.items():
        setattr(mod, name, wrap(name, fn))
    return mod


def real(monkeypatch: pytest.MonkeyPatch, fail: str = "", sysfs: Path | None = None) -> RealNvml:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail))
    nvml = RealNvml(sysfs_root=sysfs or Path("/nonexistent"))
    nvml.init()
    return nvml


def test_real_answers_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = real(monkeypatch)
    assert nvml.system_get_cuda_driver_version() == 13000
    assert nvml.device_get_cuda_compute_capability("gpu") == (9, 0)
    assert nvml.device_get_attributes("mig") == MigAttributes(16, 1, 1, 0, 1, 0, 1, 1, 9984)
    assert nvml.device_get_gpu_fabric_info("gpu") == FabricInfo(str(CLUSTER), 7, GPU_FABRIC_STATE_COMPLETED, 0)


@pytest.mark.parametrize(("fn", "call"), [
    ("nvmlSystemGetCudaDriverVersion", lambda n: n.system_get_cuda_driver_version()),
    ("nvmlDeviceGetCudaComputeCapability", lambda n: n.device_get_cuda_compute_capability("gpu")),
    ("nvmlDeviceGetAttributes", lambda n: n.device_get_attributes("mig")),
    ("nvmlDeviceGetGpuFabricInfo", lambda n: n.device_get_gpu_fabric_info("gpu")),
])
def test_real_errors_are_translated(monkeypatch: pytest.MonkeyPatch, fn: str, call: Any) -> None:
    nvml = real(monkeypatch, fail=fn)
    assert code_of(lambda: call(nvml)) == NVML_ERROR_NOT_SUPPORTED


def test_real_pci_class_from_sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    device = tmp_path / "bus" / "pci" / "devices" / "0000:3b:00.0"
    device.mkdir(parents=True)
    (device / "class").write_text("0x030200\n")
    nvml = real(monkeypatch, sysfs=tmp_path)
    assert nvml.sysfs_pci_class("00000000:3B:00.0") == PCI_CLASS_3D
    assert nvml.sysfs_pci_class("00000000:3C:00.0") is None  # no such device: unknown
    assert nvml.sysfs_pci_class("not a bus id") is None
