"""The NVML backend over the driver's libnvidia-ml, through `pynvml` (nvidia-ml-py).

The only module that imports `pynvml`, and only inside `RealNvml.init()`, so that importing
this module never fails on a machine without the library. Every `pynvml.NVMLError` leaves
as `NvmlError(code)`; the answers are converted to the plain types of `backend`.
"""

from __future__ import annotations

import ctypes
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from common.files import read_bounded
from common.nvml.backend import (
    ECC_COUNTER_VOLATILE,
    FI_DEV_GET_GPU_RECOVERY_ACTION,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_UNINITIALIZED,
    EventData,
    FabricInfo,
    Handle,
    MigAttributes,
    NvmlError,
    PciInfo,
    VgpuInfo,
)
from common.nvml.vgpu import CONFIG_SPACE_MAX, read_host_driver

if TYPE_CHECKING:
    from common.nvml.backend import NvmlBackend

T = TypeVar("T")

LIBRARY = "libnvidia-ml.so.1"
# Where NVIDIA's plugin looks for the library under a driver root (cmd/nvidia-device-plugin/root.go,
# tryResolveLibrary): a containerized driver keeps it there, out of the container loader's reach.
LIBRARY_SEARCH_DIRS = (
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/glibc/lib",
)


@dataclass(frozen=True)
class LibraryChoice:
    """The libnvidia-ml to load: a resolved path under a driver root, or the bare name for the loader."""

    path: str  # absolute (found under a root) or LIBRARY (the loader decides)
    searched: tuple[str, ...]  # the candidates tried under the roots, for the error message


def resolve_library(roots: Sequence[str]) -> LibraryChoice:
    """The first libnvidia-ml.so.1 under `roots` (symlinks resolved), else the bare name, as NVIDIA's plugin.

    A root of "/" (or "") is skipped: the library is then the container loader's business. A root that
    is not a directory is skipped too, so that NVIDIA's default container root (/driver-root) costs
    nothing where it is not mounted.
    """
    searched: list[str] = []
    for root in dict.fromkeys(roots):
        if root in ("", "/") or not os.path.isdir(root):
            continue
        for directory in LIBRARY_SEARCH_DIRS:
            candidate = os.path.join(root, directory.lstrip("/"), LIBRARY)
            searched.append(candidate)
            if os.path.exists(candidate):
                return LibraryChoice(os.path.realpath(candidate), tuple(searched))
    return LibraryChoice(LIBRARY, tuple(searched))


def loaded_library_path(proc_root: str | Path = "/proc") -> str:
    """The file the dynamic loader mapped for libnvidia-ml, from /proc/self/maps ("" if none is mapped)."""
    try:
        with open(Path(proc_root) / "self" / "maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split(maxsplit=5)[5].strip() if line.count(" ") >= 5 else ""
                if os.path.basename(path).startswith("libnvidia-ml.so"):
                    return path
    except (OSError, IndexError):
        pass
    return ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _address(handle: Any) -> int | None:
    """The pointer value of an NVML device handle: the same device, the same value."""
    try:
        value: int | None = ctypes.cast(handle, ctypes.c_void_p).value
        return value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


def sysfs_pci_address(bus_id: str) -> str:
    """NVML's "00000000:3B:00.0" as sysfs names it: "0000:3b:00.0" (4-digit domain, lower case)."""
    domain, sep, rest = bus_id.strip().partition(":")
    if not sep or not rest:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    return f"{int(domain, 16):04x}:{rest.lower()}"


class RealNvml:
    """NvmlBackend over the NVIDIA driver."""

    shutdown_under_wait_safe = False

    def __init__(
        self,
        sysfs_root: str | Path = "/sys",
        proc_root: str | Path = "/proc",
        library: LibraryChoice | None = None,
    ) -> None:
        self._sysfs_root = Path(sysfs_root)
        self._proc_root = Path(proc_root)
        self._choice = library or LibraryChoice(LIBRARY, ())
        self._loaded = ""
        self._uuid_by_handle: dict[int | None, str] = {}
        self._nvml: ModuleType | None = None

    # -- plumbing ---------------------------------------------------------------------
    def _lib(self) -> ModuleType:
        if self._nvml is None:
            raise NvmlError(NVML_ERROR_UNINITIALIZED)
        return self._nvml

    def _call(self, name: str, *args: Any) -> Any:
        """pynvml.<name>(*args), its NVMLError turned into NvmlError."""
        nvml = self._lib()
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as e:
            raise NvmlError(int(e.value)) from e

    def _typed(self, conv: Callable[[Any], T], name: str, *args: Any) -> T:
        return conv(self._call(name, *args))

    # -- lifecycle --------------------------------------------------------------------
    def init(self) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise NvmlError(
                NVML_ERROR_LIBRARY_NOT_FOUND,
                f"NVML Shared Library Not Found: the Python module pynvml (nvidia-ml-py) is missing: {e}",
            ) from e
        path = self._choice.path
        if path != LIBRARY and pynvml.nvmlLib is None:
            # pynvml loads the bare name unless its module-level handle is already set.
            try:
                pynvml.nvmlLib = ctypes.CDLL(path)
            except OSError as e:
                raise NvmlError(NVML_ERROR_LIBRARY_NOT_FOUND,
                                f"NVML Shared Library Not Found: cannot load {path}: {e}") from e
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            code = int(e.value)
            if code == NVML_ERROR_LIBRARY_NOT_FOUND:
                looked = f" (searched {', '.join(self._choice.searched)}, then the loader's path)" \
                    if self._choice.searched else " (the container loader's path)"
                raise NvmlError(
                    code,
                    f"NVML Shared Library Not Found: cannot load {LIBRARY}{looked}; is the NVIDIA driver "
                    "installed and its libraries mounted into the container (driver root)?",
                ) from e
            raise NvmlError(code) from e
        self._nvml = pynvml
        self._loaded = loaded_library_path(self._proc_root) or path

    def library(self) -> str:
        """The libnvidia-ml file in use ("" before a successful init)."""
        return self._loaded

    def shutdown(self) -> None:
        if self._nvml is None:
            raise NvmlError(NVML_ERROR_UNINITIALIZED)
        try:
            self._call("nvmlShutdown")
        finally:
            self._nvml = None

    # -- queries ----------------------------------------------------------------------
    def system_get_driver_version(self) -> str:
        return self._typed(_text, "nvmlSystemGetDriverVersion")

    def system_get_cuda_driver_version(self) -> int:
        return self._typed(int, "nvmlSystemGetCudaDriverVersion")

    def device_get_count(self) -> int:
        return self._typed(int, "nvmlDeviceGetCount")

    def device_get_handle_by_index(self, index: int) -> Handle:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def device_get_uuid(self, handle: Handle) -> str:
        uuid = self._typed(_text, "nvmlDeviceGetUUID", handle)
        self._uuid_by_handle[_address(handle)] = uuid
        return uuid

    def device_get_name(self, handle: Handle) -> str:
        return self._typed(_text, "nvmlDeviceGetName", handle)

    def device_get_minor_number(self, handle: Handle) -> int:
        return self._typed(int, "nvmlDeviceGetMinorNumber", handle)

    def device_get_pci_info(self, handle: Handle) -> PciInfo:
        return PciInfo(bus_id=_text(self._call("nvmlDeviceGetPciInfo", handle).busId))

    def device_get_memory_total(self, handle: Handle) -> int:
        return int(self._call("nvmlDeviceGetMemoryInfo", handle).total)

    def device_get_cuda_compute_capability(self, handle: Handle) -> tuple[int, int]:
        major, minor = self._call("nvmlDeviceGetCudaComputeCapability", handle)
        return int(major), int(minor)

    def device_get_attributes(self, mig_handle: Handle) -> MigAttributes:
        a = self._call("nvmlDeviceGetAttributes", mig_handle)
        return MigAttributes(
            multiprocessors=int(a.multiprocessorCount),
            copy_engines=int(a.sharedCopyEngineCount),
            decoders=int(a.sharedDecoderCount),
            encoders=int(a.sharedEncoderCount),
            jpegs=int(a.sharedJpegCount),
            ofas=int(a.sharedOfaCount),
            gpu_instance_slices=int(a.gpuInstanceSliceCount),
            compute_instance_slices=int(a.computeInstanceSliceCount),
            memory_mb=int(a.memorySizeMB),
        )

    def device_get_gpu_fabric_info(self, handle: Handle) -> FabricInfo:
        nvml = self._lib()
        # pynvml fills a caller's struct here; the v1 struct is what NVIDIA's feature discovery asks
        # for first (nvmlDeviceGetGpuFabricInfo), on every driver that has the call.
        info = nvml.c_nvmlGpuFabricInfo_t()
        self._call("nvmlDeviceGetGpuFabricInfo", handle, ctypes.byref(info))
        return FabricInfo(
            cluster_uuid=str(uuid.UUID(bytes=bytes(bytearray(info.clusterUuid)))),
            clique_id=int(info.cliqueId),
            state=int(info.state),
            status=int(info.status),
        )

    def device_get_mig_mode(self, handle: Handle) -> tuple[int, int]:
        current, pending = self._call("nvmlDeviceGetMigMode", handle)
        return int(current), int(pending)

    def device_get_max_mig_device_count(self, handle: Handle) -> int:
        return self._typed(int, "nvmlDeviceGetMaxMigDeviceCount", handle)

    def device_get_mig_device_handle_by_index(self, handle: Handle, index: int) -> Handle:
        return self._call("nvmlDeviceGetMigDeviceHandleByIndex", handle, index)

    def device_get_gpu_instance_id(self, mig_handle: Handle) -> int:
        return self._typed(int, "nvmlDeviceGetGpuInstanceId", mig_handle)

    def device_get_compute_instance_id(self, mig_handle: Handle) -> int:
        return self._typed(int, "nvmlDeviceGetComputeInstanceId", mig_handle)

    def device_get_supported_event_types(self, handle: Handle) -> int:
        return self._typed(int, "nvmlDeviceGetSupportedEventTypes", handle)

    def device_get_total_ecc_errors(self, handle: Handle, error_type: int) -> int:
        return self._typed(int, "nvmlDeviceGetTotalEccErrors", handle, error_type, ECC_COUNTER_VOLATILE)

    def _pci_file(self, pci_bus_id: str, name: str) -> Path | None:
        """The device's sysfs file `name`; None for a bus ID that names no PCI address."""
        try:
            address = sysfs_pci_address(pci_bus_id)
        except ValueError:
            return None
        return self._sysfs_root / "bus" / "pci" / "devices" / address / name

    def _pci_value(self, pci_bus_id: str, name: str, base: int) -> int | None:
        """A one-number sysfs file of the device (read bounded, to the one page sysfs says an attribute
        is, whatever it holds); None when unknown."""
        path = self._pci_file(pci_bus_id, name)
        try:
            return int(read_bounded(path, 4096).decode().strip(), base) if path is not None else None
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None

    def sysfs_numa_node(self, pci_bus_id: str) -> int | None:
        node = self._pci_value(pci_bus_id, "numa_node", 10)
        # No such device, no NUMA information (-1): unknown, as NVIDIA's plugin treats it.
        return node if node is not None and node >= 0 else None

    def sysfs_pci_class(self, pci_bus_id: str) -> int | None:
        return self._pci_value(pci_bus_id, "class", 16)

    def sysfs_vgpu(self, pci_bus_id: str) -> VgpuInfo | None:
        config = self._pci_file(pci_bus_id, "config")
        if config is None:
            return None
        return read_host_driver(lambda: read_bounded(config, CONFIG_SPACE_MAX), sysfs_pci_address(pci_bus_id))

    # -- topology ---------------------------------------------------------------------
    def device_get_nvlink_state(self, handle: Handle, link: int) -> int:
        return self._typed(int, "nvmlDeviceGetNvLinkState", handle, link)

    def device_get_nvlink_remote_pci_info(self, handle: Handle, link: int) -> PciInfo:
        return PciInfo(bus_id=_text(self._call("nvmlDeviceGetNvLinkRemotePciInfo", handle, link).busId))

    def device_get_topology_common_ancestor(self, handle1: Handle, handle2: Handle) -> int:
        return self._typed(int, "nvmlDeviceGetTopologyCommonAncestor", handle1, handle2)

    def mig_cap_minors(self, gpu_minor: int, gpu_instance_id: int, compute_instance_id: int) -> list[int]:
        path = self._proc_root / "driver" / "nvidia-caps" / "mig-minors"
        wanted = (f"gpu{gpu_minor}/gi{gpu_instance_id}/access",
                  f"gpu{gpu_minor}/gi{gpu_instance_id}/ci{compute_instance_id}/access")
        try:
            table = dict(line.split()[:2] for line in path.read_text().splitlines() if len(line.split()) >= 2)
        except OSError:
            return []
        try:
            return [int(table[w]) for w in wanted]
        except (KeyError, ValueError):
            return []

    # -- probes -----------------------------------------------------------------------
    def device_get_remapped_rows(self, handle: Handle) -> tuple[int, int, bool, bool]:
        corr, unc, pending, failed = self._call("nvmlDeviceGetRemappedRows", handle)
        return int(corr), int(unc), bool(pending), bool(failed)

    def device_get_retired_pages_pending_status(self, handle: Handle) -> bool:
        return bool(self._call("nvmlDeviceGetRetiredPagesPendingStatus", handle))

    def device_get_recovery_action(self, handle: Handle) -> int:
        (value,) = self._call("nvmlDeviceGetFieldValues", handle, [FI_DEV_GET_GPU_RECOVERY_ACTION])
        if int(value.nvmlReturn) != 0:  # the call succeeds but the field may not
            raise NvmlError(int(value.nvmlReturn))
        return int(value.value.uiVal)

    # -- events -----------------------------------------------------------------------
    def event_set_create(self) -> Handle:
        return self._call("nvmlEventSetCreate")

    def device_register_events(self, handle: Handle, event_types: int, event_set: Handle) -> None:
        self._call("nvmlDeviceRegisterEvents", handle, event_types, event_set)

    def event_set_wait(self, event_set: Handle, timeout_ms: int) -> EventData:
        data = self._call("nvmlEventSetWait", event_set, timeout_ms)
        return EventData(
            uuid=self._event_uuid(data.device),
            event_type=int(data.eventType),
            event_data=int(data.eventData),
            gpu_instance_id=int(data.gpuInstanceId),
            compute_instance_id=int(data.computeInstanceId),
        )

    def _event_uuid(self, device: Any) -> str | None:
        # A null c_nvmlDevice_t pointer is falsy: the event named no device.
        if device is None or not device:
            return None
        try:
            return self.device_get_uuid(device)
        except NvmlError:
            # A GPU that fell off the bus (XID 79) no longer answers for its UUID; its handle
            # is still the one discovery saw. Never widen its event to every GPU.
            return self._uuid_by_handle.get(_address(device))

    def event_set_free(self, event_set: Handle) -> None:
        self._call("nvmlEventSetFree", event_set)


if TYPE_CHECKING:
    _conforms: NvmlBackend = RealNvml()  # mypy proves RealNvml satisfies the Protocol
