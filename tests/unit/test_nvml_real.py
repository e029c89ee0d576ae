"""RealNvml over a fake `pynvml`: error translation, a missing library, the sysfs NUMA path."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.nvml.backend import (
    EVENT_XID_CRITICAL,
    MEMORY_ERROR_UNCORRECTED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNINITIALIZED,
    NVML_TOPOLOGY_NODE,
    WHOLE_GPU_INSTANCE,
    EventData,
    NvmlError,
    PciInfo,
)
from common.nvml.real import RealNvml, sysfs_pci_address


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


@dataclass
class FakePci:
    busId: str | bytes  # pynvml's field name; a raw ctypes char array would be bytes


@dataclass
class FakeMemory:
    total: int


@dataclass
class FakeEvent:
    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int
    computeInstanceId: int


class FakeHandle:
    def __init__(self, uuid: str, present: bool = True) -> None:
        self.uuid = uuid
        self.present = present

    def __bool__(self) -> bool:  # a null ctypes pointer is falsy
        return self.present


GPU = FakeHandle("GPU-11111111-2222-3333-4444-555555555555")
NULL = FakeHandle("", present=False)


def make_fake_pynvml(fail: dict[str, int] | None = None) -> types.ModuleType:
    """A pynvml stand-in; `fail` maps a function name to the NVML code it raises."""
    fail = fail or {}
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    answers: dict[str, Callable[..., Any]] = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "580.159.04",
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: GPU,
        "nvmlDeviceGetUUID": lambda h: h.uuid,
        "nvmlDeviceGetName": lambda h: b"NVIDIA H200",
        "nvmlDeviceGetMinorNumber": lambda h: 0,
        "nvmlDeviceGetPciInfo": lambda h: FakePci(b"00000000:00:06.0"),
        "nvmlDeviceGetMemoryInfo": lambda h: FakeMemory(150754820096),
        "nvmlDeviceGetMigMode": lambda h: [0, 0],
        "nvmlDeviceGetMaxMigDeviceCount": lambda h: 0,
        "nvmlDeviceGetMigDeviceHandleByIndex": lambda h, i: GPU,
        "nvmlDeviceGetGpuInstanceId": lambda h: 1,
        "nvmlDeviceGetComputeInstanceId": lambda h: 0,
        "nvmlDeviceGetSupportedEventTypes": lambda h: 65439,
        "nvmlDeviceGetTotalEccErrors": lambda h, e, c: 0,
        "nvmlDeviceGetNvLinkState": lambda h, link: 1,
        "nvmlDeviceGetNvLinkRemotePciInfo": lambda h, link: FakePci("00000000:05:00.0"),
        "nvmlDeviceGetTopologyCommonAncestor": lambda a, b: NVML_TOPOLOGY_NODE,
        "nvmlEventSetCreate": lambda: "event-set",
        "nvmlDeviceRegisterEvents": lambda h, m, s: None,
        "nvmlEventSetWait": lambda s, t: FakeEvent(
            GPU, EVENT_XID_CRITICAL, 79, WHOLE_GPU_INSTANCE, WHOLE_GPU_INSTANCE
        ),
        "nvmlEventSetFree": lambda s: None,
    }
    mod.calls = []  # type: ignore[attr-defined]

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            mod.calls.append((name, args))
            if name in fail:
                raise FakeNVMLError(fail[name])
            return fn(*args)

        return call

    for name, fn in answers.items():
        setattr(mod, name, wrap(name, fn))
    return mod


def started(monkeypatch: pytest.MonkeyPatch, fail: dict[str, int] | None = None) -> tuple[RealNvml, Any]:
    fake = make_fake_pynvml(fail)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml = RealNvml()
    nvml.init()
    return nvml, fake


CALLS: list[tuple[str, str, Callable[[RealNvml], Any], Any]] = [
    ("nvmlSystemGetDriverVersion", "driver", lambda n: n.system_get_driver_version(), "580.159.04"),
    ("nvmlDeviceGetCount", "count", lambda n: n.device_get_count(), 1),
    ("nvmlDeviceGetHandleByIndex", "handle", lambda n: n.device_get_handle_by_index(0), GPU),
    ("nvmlDeviceGetUUID", "uuid", lambda n: n.device_get_uuid(GPU), GPU.uuid),
    ("nvmlDeviceGetName", "name", lambda n: n.device_get_name(GPU), "NVIDIA H200"),
    ("nvmlDeviceGetMinorNumber", "minor", lambda n: n.device_get_minor_number(GPU), 0),
    ("nvmlDeviceGetPciInfo", "pci", lambda n: n.device_get_pci_info(GPU), PciInfo("00000000:00:06.0")),
    ("nvmlDeviceGetMemoryInfo", "memory", lambda n: n.device_get_memory_total(GPU), 150754820096),
    ("nvmlDeviceGetMigMode", "mig_mode", lambda n: n.device_get_mig_mode(GPU), (0, 0)),
    ("nvmlDeviceGetMaxMigDeviceCount", "max_mig", lambda n: n.device_get_max_mig_device_count(GPU), 0),
    (
        "nvmlDeviceGetMigDeviceHandleByIndex",
        "mig",
        lambda n: n.device_get_mig_device_handle_by_index(GPU, 0),
        GPU,
    ),
    ("nvmlDeviceGetGpuInstanceId", "gi", lambda n: n.device_get_gpu_instance_id(GPU), 1),
    ("nvmlDeviceGetComputeInstanceId", "ci", lambda n: n.device_get_compute_instance_id(GPU), 0),
    ("nvmlDeviceGetSupportedEventTypes", "events", lambda n: n.device_get_supported_event_types(GPU), 65439),
    (
        "nvmlDeviceGetTotalEccErrors",
        "ecc",
        lambda n: n.device_get_total_ecc_errors(GPU, MEMORY_ERROR_UNCORRECTED),
        0,
    ),
    ("nvmlDeviceGetNvLinkState", "nvlink", lambda n: n.device_get_nvlink_state(GPU, 0), 1),
    (
        "nvmlDeviceGetNvLinkRemotePciInfo",
        "nvlink_pci",
        lambda n: n.device_get_nvlink_remote_pci_info(GPU, 0),
        PciInfo("00000000:05:00.0"),
    ),
    (
        "nvmlDeviceGetTopologyCommonAncestor",
        "topo",
        lambda n: n.device_get_topology_common_ancestor(GPU, GPU),
        NVML_TOPOLOGY_NODE,
    ),
    ("nvmlEventSetCreate", "event_set", lambda n: n.event_set_create(), "event-set"),
    (
        "nvmlDeviceRegisterEvents",
        "register",
        lambda n: n.device_register_events(GPU, EVENT_XID_CRITICAL, "s"),
        None,
    ),
    (
        "nvmlEventSetWait",
        "wait",
        lambda n: n.event_set_wait("s", 10),
        EventData(GPU.uuid, EVENT_XID_CRITICAL, 79, WHOLE_GPU_INSTANCE, WHOLE_GPU_INSTANCE),
    ),
    ("nvmlEventSetFree", "free", lambda n: n.event_set_free("s"), None),
    ("nvmlShutdown", "shutdown", lambda n: n.shutdown(), None),
]
IDS = [c[1] for c in CALLS]


@pytest.mark.parametrize(("fn", "what", "call", "expected"), CALLS, ids=IDS)
def test_answers_are_converted(
    monkeypatch: pytest.MonkeyPatch, fn: str, what: str, call: Callable[[RealNvml], Any], expected: Any
) -> None:
    nvml, fake = started(monkeypatch)
    assert call(nvml) == expected
    assert fn in [name for name, _ in fake.calls]


@pytest.mark.parametrize(
    "code", [NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_GPU_IS_LOST, NVML_ERROR_INVALID_ARGUMENT]
)
@pytest.mark.parametrize(("fn", "what", "call", "expected"), CALLS, ids=IDS)
def test_nvml_errors_are_translated(
    monkeypatch: pytest.MonkeyPatch,
    fn: str,
    what: str,
    call: Callable[[RealNvml], Any],
    expected: Any,
    code: int,
) -> None:
    nvml, _ = started(monkeypatch, fail={fn: code})
    with pytest.raises(NvmlError) as info:
        call(nvml)
    assert info.value.code == code
    assert isinstance(info.value.__cause__, FakeNVMLError)


def test_timeout_is_translated(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, _ = started(monkeypatch, fail={"nvmlEventSetWait": NVML_ERROR_TIMEOUT})
    with pytest.raises(NvmlError) as info:
        nvml.event_set_wait("s", 5000)
    assert info.value.code == NVML_ERROR_TIMEOUT


def test_calls_before_init_and_after_shutdown_are_uninitialized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml())
    nvml = RealNvml()
    for call in (nvml.device_get_count, nvml.shutdown):
        with pytest.raises(NvmlError) as info:
            call()
        assert info.value.code == NVML_ERROR_UNINITIALIZED
    nvml.init()
    nvml.shutdown()
    with pytest.raises(NvmlError) as info:
        nvml.device_get_count()
    assert info.value.code == NVML_ERROR_UNINITIALIZED


def test_missing_libnvidia_ml_is_library_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "pynvml", make_fake_pynvml(fail={"nvmlInit": NVML_ERROR_LIBRARY_NOT_FOUND})
    )
    with pytest.raises(NvmlError) as info:
        RealNvml().init()
    assert info.value.code == NVML_ERROR_LIBRARY_NOT_FOUND
    assert "libnvidia-ml.so.1" in str(info.value)


def test_missing_pynvml_module_is_library_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NvmlError) as info:
        RealNvml().init()
    assert info.value.code == NVML_ERROR_LIBRARY_NOT_FOUND
    assert "pynvml" in str(info.value)


def test_other_init_errors_keep_their_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(fail={"nvmlInit": 9}))
    nvml = RealNvml()
    with pytest.raises(NvmlError) as info:
        nvml.init()
    assert info.value.code == 9
    with pytest.raises(NvmlError) as info:
        nvml.device_get_count()
    assert info.value.code == NVML_ERROR_UNINITIALIZED


def test_event_with_no_device_has_no_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, fake = started(monkeypatch)
    fake.nvmlEventSetWait = lambda s, t: FakeEvent(NULL, EVENT_XID_CRITICAL, 79, 3, 1)
    assert nvml.event_set_wait("s", 10) == EventData(None, EVENT_XID_CRITICAL, 79, 3, 1)
    assert "nvmlDeviceGetUUID" not in [name for name, _ in fake.calls]


def test_event_whose_uuid_cannot_be_read_has_no_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, _ = started(monkeypatch, fail={"nvmlDeviceGetUUID": NVML_ERROR_GPU_IS_LOST})
    event = nvml.event_set_wait("s", 10)
    assert (event.uuid, event.event_data) == (None, 79)


def test_mig_event_carries_instance_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, fake = started(monkeypatch)
    fake.nvmlEventSetWait = lambda s, t: FakeEvent(GPU, EVENT_XID_CRITICAL, 94, 9, 0)
    assert nvml.event_set_wait("s", 10) == EventData(GPU.uuid, EVENT_XID_CRITICAL, 94, 9, 0)


# --- sysfs NUMA --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bus_id", "sysfs"),
    [
        ("00000000:3B:00.0", "0000:3b:00.0"),
        ("00000001:AB:1F.7", "0001:ab:1f.7"),
        ("0000:00:06.0", "0000:00:06.0"),
    ],
)
def test_sysfs_pci_address(bus_id: str, sysfs: str) -> None:
    assert sysfs_pci_address(bus_id) == sysfs


def _numa_file(root: Path, address: str, content: str) -> None:
    d = root / "bus" / "pci" / "devices" / address
    d.mkdir(parents=True)
    (d / "numa_node").write_text(content)


def test_sysfs_numa_node(tmp_path: Path) -> None:
    _numa_file(tmp_path, "0000:3b:00.0", "1\n")
    _numa_file(tmp_path, "0000:00:06.0", "0\n")
    _numa_file(tmp_path, "0000:5d:00.0", "-1\n")
    _numa_file(tmp_path, "0000:9a:00.0", "garbage\n")
    nvml = RealNvml(sysfs_root=tmp_path)  # no init needed: not an NVML call
    assert nvml.sysfs_numa_node("00000000:3B:00.0") == 1
    assert nvml.sysfs_numa_node("00000000:00:06.0") == 0
    assert nvml.sysfs_numa_node("00000000:5D:00.0") is None  # -1: unknown
    assert nvml.sysfs_numa_node("00000000:9A:00.0") is None
    assert nvml.sysfs_numa_node("00000000:DB:00.0") is None  # missing
    assert nvml.sysfs_numa_node("not a bus id") is None


def test_importing_real_does_not_import_pynvml() -> None:
    root = Path(__file__).resolve().parents[2]
    code = "import sys, common.nvml.real; assert 'pynvml' not in sys.modules, 'pynvml imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_event_of_a_lost_gpu_is_still_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # XID 79: the GPU no longer answers for its UUID, but its handle is the one discovery saw.
    # The event must stay on that GPU, never become "no device" (which would hit every GPU).
    nvml, fake = started(monkeypatch)
    assert nvml.device_get_uuid(GPU) == GPU.uuid

    def lost(handle: Any) -> str:
        raise FakeNVMLError(NVML_ERROR_GPU_IS_LOST)

    fake.nvmlDeviceGetUUID = lost
    fake.nvmlEventSetWait = lambda s, t: FakeEvent(GPU, EVENT_XID_CRITICAL, 79, 0xFFFFFFFF, 0xFFFFFFFF)
    assert nvml.event_set_wait("s", 10).uuid == GPU.uuid
