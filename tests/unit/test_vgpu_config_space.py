"""The vGPU host driver read from a GPU's PCI config space (common.nvml.vgpu), on bytes laid out as
the kernel shows them: the layouts follow NVIDIA/k8s-device-plugin internal/vgpu (pciutil.go walks
the capability list from 0x34 to the vendor-specific capability 0x09; vgpu.go wants "VF" at +3 and
walks the records from +5 to record 0: 10 bytes of version, 10 of branch, NUL-padded). The values
are the ones a vGPU guest on an A100 showed in NVIDIA's labels (595.71.03, r596_25).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from common.nvml import vgpu
from common.nvml.backend import VgpuInfo
from common.nvml.real import RealNvml
from common.nvml.vgpu import ConfigSpaceError, ShortConfigSpace, host_driver, read_host_driver
from devtools.nvml_sim import DescriptionError, SimulatedNvml, config_space, fleet_path

HOST = VgpuInfo(host_driver_version="595.71.03", host_driver_branch="r596_25")


def space(caps: dict[int, bytes], first: int, status: int = 0x10, vendor: int = 0x10DE, size: int = 256) -> bytes:
    """A type-0 header (NVIDIA, device 0x20b0, class 0x030200) with the capabilities at their offsets;
    each capability's bytes carry their own next pointer."""
    b = bytearray(size)
    b[0:4] = vendor.to_bytes(2, "little") + (0x20B0).to_bytes(2, "little")
    b[0x06] = status
    b[0x09:0x0C] = bytes([0x00, 0x02, 0x03])
    b[0x34] = first
    for offset, cap in caps.items():
        b[offset:offset + len(cap)] = cap
    return bytes(b)


def vendor_cap(next_cap: int, body: bytes) -> bytes:
    return bytes([0x09, next_cap, 3 + len(body)]) + body


RECORD_0 = bytes([0x00, 0x16]) + b"595.71.03\0" + b"r596_25\0\0\0"
MSI_LAST = bytes([0x05, 0x00, 0x80, 0x00]) + bytes(12)  # MSI, end of the list
# A vGPU function: the vendor-specific capability first (0xd0), then MSI (0x68), as NVIDIA's test data.
VGPU = space({0xD0: vendor_cap(0x68, b"VF" + RECORD_0), 0x68: MSI_LAST}, first=0xD0)
# Passthrough: power management -> MSI -> PCI Express -> vendor-specific without the signature.
PASSTHROUGH = space({0x60: bytes([0x01, 0x68, 0x03, 0x00]), 0x68: bytes([0x05, 0x78, 0x80, 0x00]),
                     0x78: bytes([0x10, 0xB4, 0x02, 0x00]), 0xB4: vendor_cap(0x00, bytes([0x01, 0x00]) + bytes(15))},
                    first=0x60)


def test_a_vgpu_names_its_host_driver() -> None:
    assert host_driver(VGPU) == HOST


def test_the_full_extended_space_reads_the_same() -> None:
    # Read with CAP_SYS_ADMIN, a PCIe function's config file is 4096 bytes: the capability list is in the first 256.
    assert host_driver(VGPU + bytes(4096 - 256)) == HOST


def test_fields_of_all_ten_bytes_have_no_nul_to_trim() -> None:
    record = bytes([0x00, 0x16]) + b"535.161.05" + b"r535_14_00"
    assert host_driver(space({0xD0: vendor_cap(0, b"VF" + record)}, first=0xD0)) == VgpuInfo("535.161.05",
                                                                                           "r535_14_00")


def test_records_before_the_host_driver_record_are_walked_by_their_lengths() -> None:
    other = bytes([0x03, 0x06, 0xAA, 0xBB, 0xCC, 0xDD])  # record 3, 6 bytes long: skipped
    assert host_driver(space({0xC0: vendor_cap(0, b"VF" + other + RECORD_0)}, first=0xC0)) == HOST


@pytest.mark.parametrize("config", [
    PASSTHROUGH,
    space({0xD0: vendor_cap(0x68, b"VF" + RECORD_0)}, first=0xD0, status=0x00),  # no capability list
    space({0x60: bytes([0x01, 0x68]), 0x68: bytes([0x05, 0x60])}, first=0x60),  # a chain that loops
    space({0x60: bytes([0xFF, 0xFF, 0xFF])}, first=0x60),  # all ones: the device does not answer
    space({0xD0: vendor_cap(0, b"V")}, first=0xD0),  # too short to hold the signature
], ids=["passthrough", "no-capability-list", "looping-chain", "all-ones", "short-capability"])
def test_not_a_vgpu(config: bytes) -> None:
    assert host_driver(config) is None


@pytest.mark.parametrize(("config", "error", "match"), [
    (VGPU[:64], ShortConfigSpace, "64 bytes, 256 needed"),  # what the kernel shows without CAP_SYS_ADMIN
    (space({}, first=0, vendor=0x8086), ConfigSpaceError, "vendor 0x8086"),
    # NVIDIA/k8s-device-plugin#1891: a capability length past the space panicked its slice.
    (space({0xE0: bytes([0x09, 0x00, 0xFF])}, first=0xE0), ConfigSpaceError, "claims 255 bytes"),
    (space({0xFE: bytes([0x01, 0x00])}, first=0xFE), ConfigSpaceError, "runs past"),
    # A record of length 0: NVIDIA's walk never moves on.
    (space({0xD0: vendor_cap(0, b"VF" + bytes([0x04, 0x00]) + RECORD_0)}, first=0xD0), ConfigSpaceError,
     "record 4 at \\+5 has length 0"),
    (space({0xD0: vendor_cap(0, b"VF" + bytes([0x04, 0x02]))}, first=0xD0), ConfigSpaceError,
     "no host driver record"),
    (space({0xD0: vendor_cap(0, b"VF" + RECORD_0[:12])}, first=0xD0), ConfigSpaceError, "cut short"),
    (space({0xD0: vendor_cap(0, b"VF" + bytes([0x00, 0x16]) + b"595.71\n03\0" + b"r596_25\0\0\0")}, first=0xD0),
     ConfigSpaceError, "not a label value"),
], ids=["unprivileged-64-bytes", "not-nvidia", "capability-past-the-space", "pointer-past-the-space",
        "record-length-0", "no-record-0", "record-cut-short", "newline-in-the-version"])
def test_a_config_space_that_cannot_say(config: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        host_driver(config)


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vgpu, "_said", set())  # "once" is per process: each test starts a process' worth


def test_what_cannot_be_read_is_not_a_vgpu_and_said_once_per_kind(
        fresh_log: None, caplog: pytest.LogCaptureFixture) -> None:
    def unreadable() -> bytes:
        raise PermissionError(13, "Permission denied")

    caplog.set_level(logging.INFO, logger=vgpu.__name__)
    for address in ("0000:3b:00.0", "0000:3c:00.0"):  # two GPUs of one node, or two passes
        assert read_host_driver(lambda: VGPU[:64], address) is None
        assert read_host_driver(unreadable, address) is None
        assert read_host_driver(lambda: space({}, first=0, vendor=0x8086), address) is None
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(said) == 3, said
    assert said[0][0] == "INFO" and "0000:3b:00.0: the PCI config space shows 64 bytes" in said[0][1] \
        and "CAP_SYS_ADMIN" in said[0][1]
    assert said[1][0] == "INFO" and "unreadable" in said[1][1] and "Permission denied" in said[1][1]
    assert said[2][0] == "WARNING" and "not understood (vendor 0x8086" in said[2][1]
    assert read_host_driver(lambda: VGPU, "0000:3b:00.0") == HOST


def test_the_real_backend_reads_sysfs(fresh_log: None, tmp_path: Path) -> None:
    devices = tmp_path / "bus" / "pci" / "devices"
    for address, config in (("0000:3b:00.0", VGPU + bytes(4096 - 256)), ("0000:3c:00.0", PASSTHROUGH),
                            ("0000:3d:00.0", VGPU[:64])):
        (devices / address).mkdir(parents=True)
        (devices / address / "config").write_bytes(config)
    nvml = RealNvml(sysfs_root=tmp_path)  # no init: not an NVML call
    assert nvml.sysfs_vgpu("00000000:3B:00.0") == HOST
    assert nvml.sysfs_vgpu("00000000:3C:00.0") is None
    assert nvml.sysfs_vgpu("00000000:3D:00.0") is None  # an unprivileged reader's 64 bytes
    assert nvml.sysfs_vgpu("00000000:3E:00.0") is None  # no such device
    assert nvml.sysfs_vgpu("not a bus id") is None
    (devices / "0000:3f:00.0").mkdir()
    (devices / "0000:3f:00.0" / "config").write_bytes(VGPU + bytes(8192))  # past any config space: not read
    assert nvml.sysfs_vgpu("00000000:3F:00.0") is None


def test_the_simulated_spaces_are_the_layouts_nvidia_reads() -> None:
    guest = config_space({"host_driver_version": "595.71.03", "host_driver_branch": "r596_25"})
    assert guest[0xD0:0xD0 + 27] == vendor_cap(0x68, b"VF" + RECORD_0) and guest[0x34] == 0xD0
    assert host_driver(guest) == HOST
    assert host_driver(config_space(None)) is None


def test_a_simulated_vgpu_guest(tmp_path: Path) -> None:
    desc = json.loads(fleet_path("h200").read_text())
    desc["devices"][0]["vgpu"] = {"host_driver_version": "595.71.03", "host_driver_branch": "r596_25"}
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(desc))
    nvml = SimulatedNvml(path)
    nvml.init()
    try:
        bus_id = nvml.device_get_pci_info(nvml.device_get_handle_by_index(0)).bus_id
        assert nvml.sysfs_vgpu(bus_id) == HOST
        assert nvml.sysfs_vgpu("00000000:99:00.0") is None
    finally:
        nvml.shutdown()


@pytest.mark.parametrize("value", [
    {"host_driver_version": "595.71.03"},
    {"host_driver_version": "595.71.03.1234", "host_driver_branch": "r596_25"},
    {"host_driver_version": 595, "host_driver_branch": "r596_25"},
    "595.71.03",
])
def test_a_bad_simulated_vgpu_is_refused_at_load(tmp_path: Path, value: object) -> None:
    desc = json.loads(fleet_path("h200").read_text())
    desc["devices"][0]["vgpu"] = value
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(desc))
    with pytest.raises(DescriptionError, match=r"devices\[0\]\.vgpu"):
        SimulatedNvml(path)
