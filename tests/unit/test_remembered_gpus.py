"""A GPU lost before a health-monitor restart stays listed (services.health_monitor.remembered): the
simulated driver with a GPU that answers GPU_IS_LOST to every call, its UUID included, as one that
fell off the bus, and the record of an earlier discovery in the same boot."""

from __future__ import annotations

from pathlib import Path

from common.bus.messages import UNHEALTHY
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.health_monitor.discovery import discover_remembering
from services.health_monitor.remembered import FILE, GpuMemory


def _discover(memory: GpuMemory, lost: int | None = None) -> list:  # type: ignore[type-arg]
    """The monitor's discovery (discover_remembering) on a simulated driver, GPU `lost` fallen off the bus."""
    nvml = SimulatedNvml(fleet_path("dgx-h100-8"))
    nvml.init()
    try:
        if lost is not None:
            nvml._gpus[lost].lost = True  # fallen off the bus before this start
        return discover_remembering(nvml, 1.0, None, memory).devices
    finally:
        nvml.shutdown()


def test_a_gpu_lost_before_a_restart_is_listed_unhealthy_under_the_uuid_this_boot_saw(tmp_path: Path) -> None:
    first = _discover(GpuMemory(tmp_path, boot="boot-1"))
    assert len(first) == 8 and all(d.health != UNHEALTHY for d in first)
    again = _discover(GpuMemory(tmp_path, boot="boot-1"), lost=5)
    assert [d.id for d in again] == [d.id for d in first], "the lost GPU keeps its place and its UUID"
    gpu5 = again[5]
    assert gpu5.health == UNHEALTHY and gpu5.reason.startswith("GPU lost") and "earlier in this boot" in gpu5.reason
    assert (gpu5.name, gpu5.pci_bus_id, gpu5.minor, gpu5.memory_mb) == (
        first[5].name, first[5].pci_bus_id, first[5].minor, first[5].memory_mb)
    # A third start, the GPU still lost: the record kept it (a lost GPU's own discovery names nothing).
    assert _discover(GpuMemory(tmp_path, boot="boot-1"), lost=5)[5].id == first[5].id


def test_another_boot_or_a_bad_record_lists_nothing_from_memory(tmp_path: Path) -> None:
    _discover(GpuMemory(tmp_path, boot="boot-1"))
    after_reboot = _discover(GpuMemory(tmp_path, boot="boot-2"), lost=5)
    assert [d.index for d in after_reboot] == ["0", "1", "2", "3", "4", "6", "7"], "enumerated anew: not listed"
    for junk in (b"{", b"[]", b'{"boot": "boot-3", "gpus": {"5": {"uuid": 5}}}', b"\xff" * 10):
        (tmp_path / FILE).write_bytes(junk)
        assert GpuMemory(tmp_path, boot="boot-3").load() == {}
    assert GpuMemory(tmp_path, boot="").load() == {}, "no boot id: no record can be trusted"


def test_a_remembered_uuid_discovered_at_another_index_is_not_listed_twice(tmp_path: Path) -> None:
    memory = GpuMemory(tmp_path, boot="boot-1")
    first = _discover(memory)
    seen = memory.load()
    memory.save({**seen, 5: seen[2]})  # index 5 recorded with GPU 2's UUID (a re-enumeration)
    again = _discover(GpuMemory(tmp_path, boot="boot-1"), lost=5)
    assert [d.id for d in again] == [d.id for i, d in enumerate(first) if i != 5]
