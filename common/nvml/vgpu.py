"""Whether a GPU is a vGPU, and which host driver serves it, from its PCI config space.

NVIDIA's feature discovery labels a vGPU guest `nvidia.com/vgpu.present=true` with the hypervisor's
vGPU manager version and branch (internal/vgpu of NVIDIA/k8s-device-plugin). No NVML call tells a
guest that; the virtual PCI function does. Its vendor-specific capability (ID 0x09) starts, after
the 3-byte capability header, with the signature "VF", then records `[id][length][data]`; record 0
holds the host driver's version and branch, 10 bytes each, NUL-padded:

    +0 0x09 | +1 next | +2 length | +3 'V' | +4 'F' | +5 record id | +6 record length | +7 ...
    record 0: [0x00][0x16][version: 10 bytes][branch: 10 bytes]

A passthrough or bare-metal GPU has a vendor-specific capability too, without the signature.

The bytes come from the kernel for a device we do not own, and the kernel shows an unprivileged
reader (no CAP_SYS_ADMIN) only the first 64 of them. NVIDIA's parser trusts what it reads: a record
length of 0 loops for ever and a capability longer than the space panics (its #1891). Here each
index is checked; whatever cannot be read or makes no sense means "not a vGPU", which is what
NVIDIA's labeler answers on a read error since its #672 (vgpu.present=false and a warning), and is
logged once per process and kind of problem, so that a node of eight GPUs and a pass a minute say
it once.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

from common.nvml.backend import VgpuInfo

log = logging.getLogger(__name__)

PCI_VENDOR_NVIDIA = 0x10DE
CONFIG_SPACE_MAX = 4096  # a PCIe function's config space, extended part included: the read's bound
CONVENTIONAL_SIZE = 256  # where the capability list lives; NVIDIA's parser needs all of it
_STATUS = 0x06  # the low byte of the status register
_STATUS_CAPABILITY_LIST = 0x10
_CAPABILITY_POINTER = 0x34
_CAP_VENDOR_SPECIFIC = 0x09
_CAP_BROKEN = 0xFF  # all ones: a device that does not answer
_SIGNATURE = b"VF"
_RECORDS = 5  # the first record's offset in the capability
_HOST_DRIVER_RECORD = 0
_FIELD = 10  # the version's and the branch's width in record 0

# A Kubernetes label value: what NFD would accept, so that nothing read here can break a features.d line.
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


class ConfigSpaceError(ValueError):
    """The config space cannot say whether the GPU is a vGPU: not one we can label as such."""


class ShortConfigSpace(ConfigSpaceError):
    """Fewer bytes than the capability list needs: the kernel's answer to a reader without CAP_SYS_ADMIN."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes, {CONVENTIONAL_SIZE} needed")
        self.size = size


def vendor_capability(config: bytes) -> bytes | None:
    """The first vendor-specific capability of an NVIDIA function's config space, header included;
    None when the function lists none (a chain that loops or reads all ones ends the list, as in
    NVIDIA's GetVendorSpecificCapability). Raises ConfigSpaceError."""
    if len(config) < CONVENTIONAL_SIZE:
        raise ShortConfigSpace(len(config))
    vendor = int.from_bytes(config[0:2], "little")
    if vendor != PCI_VENDOR_NVIDIA:
        raise ConfigSpaceError(f"vendor {vendor:#06x} is not NVIDIA's")
    if not config[_STATUS] & _STATUS_CAPABILITY_LIST:
        return None
    seen: set[int] = set()
    pos = config[_CAPABILITY_POINTER]
    while pos and pos not in seen:
        if pos + 3 > CONVENTIONAL_SIZE:
            raise ConfigSpaceError(f"capability at {pos:#x} runs past the conventional config space")
        cap_id, following, length = config[pos], config[pos + 1], config[pos + 2]
        if cap_id == _CAP_BROKEN:
            return None
        if cap_id == _CAP_VENDOR_SPECIFIC:
            if pos + length > CONVENTIONAL_SIZE:
                raise ConfigSpaceError(f"vendor-specific capability at {pos:#x} claims {length} bytes, "
                                       "past the conventional config space")
            return config[pos:pos + length]
        seen.add(pos)
        pos = following
    return None


def _field(raw: bytes, what: str) -> str:
    # NVIDIA makes each byte a character (Go's string(byte): Latin-1) and trims NULs at both ends.
    text = raw.decode("latin-1").strip("\x00")
    if not _LABEL_VALUE.fullmatch(text):
        raise ConfigSpaceError(f"the host driver {what} {text!r} is not a label value")
    return text


def host_driver(config: bytes) -> VgpuInfo | None:
    """The vGPU host driver a config space names; None when the function is not a vGPU (no
    vendor-specific capability, or one without the "VF" signature). Raises ConfigSpaceError where
    the space is too short, not an NVIDIA function's, or a vGPU capability without a readable
    host-driver record."""
    cap = vendor_capability(config)
    if cap is None or len(cap) < _RECORDS or cap[3:5] != _SIGNATURE:
        return None
    pos = _RECORDS
    while True:  # NVIDIA's walk: from record to record by their lengths, up to record 0
        if pos + 2 > len(cap):
            raise ConfigSpaceError("the vGPU capability has no host driver record")
        record, length = cap[pos], cap[pos + 1]
        if record == _HOST_DRIVER_RECORD:
            break
        if length < 2:  # NVIDIA's loop would not move (0) or read the length as the next record (1)
            raise ConfigSpaceError(f"vGPU capability record {record} at +{pos} has length {length}")
        pos += length
    data = pos + 2
    if data + 2 * _FIELD > len(cap):
        raise ConfigSpaceError("the vGPU host driver record is cut short")
    return VgpuInfo(host_driver_version=_field(cap[data:data + _FIELD], "version"),
                    host_driver_branch=_field(cap[data + _FIELD:data + 2 * _FIELD], "branch"))


_said: set[str] = set()
_said_lock = threading.Lock()  # discovery describes GPUs in threads of their own


def _once(kind: str, level: int, msg: str, *args: object) -> None:
    with _said_lock:
        if kind in _said:
            return
        _said.add(kind)
    log.log(level, msg, *args)


def read_host_driver(read: Callable[[], bytes], where: str) -> VgpuInfo | None:
    """The host driver of the vGPU whose config space `read` returns (`where`: its PCI address, for the
    log); None when it is not a vGPU or its config space cannot say. Never raises: a label, not the
    GPU's service, depends on it."""
    try:
        return host_driver(read())
    except ShortConfigSpace as e:
        _once("short", logging.INFO, "%s: the PCI config space shows %d bytes, the vGPU capability needs %d (the "
              "kernel shows more only to CAP_SYS_ADMIN, as NVIDIA's feature discovery also needs): "
              "vgpu.present is false", where, e.size, CONVENTIONAL_SIZE)
    except ConfigSpaceError as e:
        _once("odd", logging.WARNING, "%s: PCI config space not understood (%s): not labelled a vGPU", where, e)
    except OSError as e:
        _once("unreadable", logging.INFO, "%s: PCI config space unreadable (%s): not labelled a vGPU", where, e)
    return None
