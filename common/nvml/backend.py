"""The NVML access layer: the calls the health monitor and feature discovery make, and nothing else.

Two backends implement `NvmlBackend`: `real.RealNvml` (the only module that imports
`pynvml`) and `simulated.SimulatedNvml` (a device-description file plus faults injected
from another process). The interface mirrors NVML call by call, so that discovery and
health logic are written once and meet the same answers, errors included, on both:
a call the driver does not support raises `NvmlError(NVML_ERROR_NOT_SUPPORTED)` on the
simulated backend exactly where the recorded H200 did.

Handles are opaque: callers only pass them back into the backend that produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# NVML return codes (nvml.h). Only the ones the project reacts to are named.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

ERROR_NAMES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

# Event type bits (nvmlEventType*).
EVENT_SINGLE_BIT_ECC = 0x0000000000000001
EVENT_DOUBLE_BIT_ECC = 0x0000000000000002
EVENT_XID_CRITICAL = 0x0000000000000008

# nvmlMemoryErrorType_t / nvmlEccCounterType_t
MEMORY_ERROR_CORRECTED = 0
MEMORY_ERROR_UNCORRECTED = 1
ECC_COUNTER_VOLATILE = 0

# nvmlDeviceGetFieldValues field for the driver's recovery advice, and its values.
FI_DEV_GET_GPU_RECOVERY_ACTION = 230
GPU_RECOVERY_ACTION_NONE = 0
GPU_RECOVERY_ACTION_GPU_RESET = 1
GPU_RECOVERY_ACTION_NODE_REBOOT = 2
GPU_RECOVERY_ACTION_DRAIN_P2P = 3
GPU_RECOVERY_ACTION_DRAIN_AND_RESET = 4
RECOVERY_ACTION_NAMES = {0: "none", 1: "GPU reset", 2: "node reboot", 3: "drain P2P", 4: "drain and reset"}

# GPU instance / compute instance id meaning "the whole GPU" in event data.
WHOLE_GPU_INSTANCE = 0xFFFFFFFF

# Link indices nvmlDeviceGetNvLink* accept: 0 .. NVML_NVLINK_MAX_LINKS-1; a larger index is
# INVALID_ARGUMENT. 36 as in the 580 driver's nvml.h and pynvml 13 (it was 18 up to CUDA 12);
# the recorded H200, which has no NVLink, answered NOT_SUPPORTED for every one of the 36.
NVML_NVLINK_MAX_LINKS = 36
NVLINK_STATE_INACTIVE = 0
NVLINK_STATE_ACTIVE = 1

# nvmlGpuTopologyLevel_t: the closest common ancestor of two GPUs on the PCIe tree.
NVML_TOPOLOGY_INTERNAL = 0  # the same board (or the same GPU)
NVML_TOPOLOGY_SINGLE = 10  # one PCIe switch between them
NVML_TOPOLOGY_MULTIPLE = 20  # several PCIe switches, no host bridge
NVML_TOPOLOGY_HOSTBRIDGE = 30  # the same PCIe host bridge
NVML_TOPOLOGY_NODE = 40  # host bridges of the same NUMA node
NVML_TOPOLOGY_SYSTEM = 50  # across NUMA nodes (SMP interconnect)

# nvmlGpuFabricState_t: a GPU's registration with a multi-node NVLink fabric (GB200 NVL72 and the
# like). Only COMPLETED gives a clique; GPUs outside such a fabric answer NOT_SUPPORTED.
GPU_FABRIC_STATE_NOT_SUPPORTED = 0
GPU_FABRIC_STATE_NOT_STARTED = 1
GPU_FABRIC_STATE_IN_PROGRESS = 2
GPU_FABRIC_STATE_COMPLETED = 3

Handle = Any


class NvmlError(Exception):
    """An NVML call failed; `code` is the NVML return code."""

    def __init__(self, code: int, message: str | None = None) -> None:
        self.code = code
        super().__init__(message or ERROR_NAMES.get(code, f"NVML error {code}"))


@dataclass(frozen=True)
class PciInfo:
    bus_id: str  # NVML form, 8-digit domain: "00000000:00:06.0"


@dataclass(frozen=True)
class MigAttributes:
    """nvmlDeviceGetAttributes of a MIG device: what its GPU instance holds (nvmlDeviceAttributes_t)."""

    multiprocessors: int
    copy_engines: int
    decoders: int
    encoders: int
    jpegs: int
    ofas: int
    gpu_instance_slices: int
    compute_instance_slices: int
    memory_mb: int


@dataclass(frozen=True)
class FabricInfo:
    """nvmlDeviceGetGpuFabricInfo: the GPU's place in a multi-node NVLink fabric."""

    cluster_uuid: str  # the 16 bytes as a canonical UUID ("00000000-0000-0000-0000-000000000000": none)
    clique_id: int
    state: int  # GPU_FABRIC_STATE_*
    status: int  # an NVML return code: the registration's own outcome


@dataclass(frozen=True)
class VgpuInfo:
    """The vGPU manager of the hypervisor a vGPU guest runs on, as its PCI config space names it."""

    host_driver_version: str  # e.g. "595.71.03"
    host_driver_branch: str  # e.g. "r596_25"


@dataclass(frozen=True)
class EventData:
    """One NVML event, with the device already resolved to its UUID."""

    uuid: str | None  # None: the event named no device
    event_type: int
    event_data: int  # the XID for EVENT_XID_CRITICAL
    gpu_instance_id: int = WHOLE_GPU_INSTANCE
    compute_instance_id: int = WHOLE_GPU_INSTANCE


class NvmlBackend(Protocol):
    """The NVML calls the project makes. Every method may raise `NvmlError`."""

    # Whether shutdown() may run while another thread is inside event_set_wait (the real
    # libnvidia-ml: not safe, so a stopping monitor skips it rather than wait out the wait).
    shutdown_under_wait_safe: bool

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def library(self) -> str: ...  # what answers: the libnvidia-ml file, or the simulated description
    def system_get_driver_version(self) -> str: ...
    def system_get_cuda_driver_version(self) -> int:
        """The CUDA version the driver supports, as NVML encodes it: 1000 * major + 10 * minor (13000)."""
        ...

    def device_get_count(self) -> int: ...
    def device_get_handle_by_index(self, index: int) -> Handle: ...
    def device_get_uuid(self, handle: Handle) -> str: ...
    def device_get_name(self, handle: Handle) -> str: ...
    def device_get_minor_number(self, handle: Handle) -> int: ...
    def device_get_pci_info(self, handle: Handle) -> PciInfo: ...
    def device_get_memory_total(self, handle: Handle) -> int: ...
    def device_get_cuda_compute_capability(self, handle: Handle) -> tuple[int, int]: ...
    def device_get_attributes(self, mig_handle: Handle) -> MigAttributes:
        """A MIG device's instance attributes; a whole GPU answers what its driver does (not used)."""
        ...

    def device_get_gpu_fabric_info(self, handle: Handle) -> FabricInfo:
        """NOT_SUPPORTED on a GPU outside a multi-node NVLink fabric (the recorded H200, DGX H100)."""
        ...

    def sysfs_pci_class(self, pci_bus_id: str) -> int | None:
        """The PCI class the kernel reports (0x030200: 3D controller, 0x030000: VGA); None when unknown.

        Not an NVML call: NVIDIA's feature discovery reads it from sysfs for its gpu.mode label.
        """
        ...

    def sysfs_vgpu(self, pci_bus_id: str) -> VgpuInfo | None:
        """The vGPU host driver when the PCI device is a vGPU; None when it is not, or its config space
        cannot say (common.nvml.vgpu logs why, once). Never raises.

        Not an NVML call: NVIDIA's feature discovery reads the config space in sysfs for its vgpu.* labels.
        """
        ...

    def device_get_mig_mode(self, handle: Handle) -> tuple[int, int]: ...
    def device_get_max_mig_device_count(self, handle: Handle) -> int: ...
    def device_get_mig_device_handle_by_index(self, handle: Handle, index: int) -> Handle: ...
    def device_get_gpu_instance_id(self, mig_handle: Handle) -> int: ...
    def device_get_compute_instance_id(self, mig_handle: Handle) -> int: ...
    def device_get_supported_event_types(self, handle: Handle) -> int: ...
    def device_get_total_ecc_errors(self, handle: Handle, error_type: int) -> int: ...
    def sysfs_numa_node(self, pci_bus_id: str) -> int | None:
        """The NUMA node the kernel reports for the PCI device; None when unknown.

        Not an NVML call: like NVIDIA's plugin we read sysfs, because
        nvmlDeviceGetNumaNodeId answers NOT_SUPPORTED on many systems.
        """
        ...

    def device_get_nvlink_state(self, handle: Handle, link: int) -> int:
        """NVLINK_STATE_ACTIVE or _INACTIVE; NOT_SUPPORTED where the GPU has no such link,
        INVALID_ARGUMENT for link >= NVML_NVLINK_MAX_LINKS."""
        ...

    def device_get_nvlink_remote_pci_info(self, handle: Handle, link: int) -> PciInfo:
        """The PCI address of the link's far end (a peer GPU or an NVSwitch)."""
        ...

    def device_get_topology_common_ancestor(self, handle1: Handle, handle2: Handle) -> int:
        """An NVML_TOPOLOGY_* level."""
        ...

    def device_get_remapped_rows(self, handle: Handle) -> tuple[int, int, bool, bool]:
        """(corrected rows, uncorrected rows, remapping pending, remapping failed)."""
        ...

    def device_get_retired_pages_pending_status(self, handle: Handle) -> bool: ...
    def device_get_recovery_action(self, handle: Handle) -> int:
        """The driver's recovery advice (field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, recent drivers):
        GPU_RECOVERY_ACTION_NONE when the GPU needs nothing."""
        ...

    def mig_cap_minors(self, gpu_minor: int, gpu_instance_id: int, compute_instance_id: int) -> list[int]:
        """Minors of /dev/nvidia-caps/nvidia-cap<N> granting access to a GPU instance and its
        compute instance (from /proc/driver/nvidia-caps/mig-minors); [] when unknown."""
        ...

    def event_set_create(self) -> Handle: ...
    def device_register_events(self, handle: Handle, event_types: int, event_set: Handle) -> None: ...
    def event_set_wait(self, event_set: Handle, timeout_ms: int) -> EventData:
        """Blocks up to timeout_ms; raises NvmlError(NVML_ERROR_TIMEOUT) when nothing came."""
        ...

    def event_set_free(self, event_set: Handle) -> None: ...
