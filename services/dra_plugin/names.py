"""The names DRA gives our devices, shared by the node side (prepare, health stream) and the API side
(ResourceSlices): one module, so that a device the slices publish is the device a claim prepares.

NVIDIA's DRA driver (kubernetes-sigs/dra-driver-nvidia-gpu, cmd/gpu-kubelet-plugin) is the model, so
that a claim written for it works here:

- the driver is `gpu.nvidia.com`, and the pool is the node's name (one pool per node);
- a full GPU is `gpu-<minor>`, its /dev/nvidia<minor> (NVIDIA's GpuInfo.CanonicalName: the minor, not
  the NVML index, which may differ from it);
- a MIG device is `gpu-<parent minor>-mig-<GPU instance>-<compute instance>`. NVIDIA's current name is
  `gpu-<minor>-mig-<profile>-<profile ID>-<placement start>` (it creates MIG devices on demand, so its
  names describe a placement); ours serves the MIG devices that exist, which the health bus names by
  their instances. Claims select devices by attributes, not by these names.
- CDI: vendor `k8s.gpu.nvidia.com`, class `claim`, one device per claimed device named
  `<claim UID>-<device name>`, in a transient spec file per claim named as CDI's
  GenerateTransientSpecName does (`k8s.gpu.nvidia.com-claim_<claim UID>`).

A device without a name here (a GPU whose minor is unknown, a MIG device without its GPU or instance
IDs) is not served through DRA: without its device node there is nothing to put in a CDI spec.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from common.bus.messages import DeviceState

DRIVER_NAME = "gpu.nvidia.com"
CDI_VENDOR = f"k8s.{DRIVER_NAME}"
CDI_CLASS = "claim"
CDI_KIND = f"{CDI_VENDOR}/{CDI_CLASS}"

# What the API server accepts as a device name (a DNS label) and as a claim UID in a file name.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")


def pool_name(node: str) -> str:
    """The pool of this node's devices: the node's name, as NVIDIA's driver names it."""
    return node


def gpu_name(minor: int) -> str:
    return f"gpu-{minor}"


def mig_name(parent_minor: int, gpu_instance: int, compute_instance: int) -> str:
    return f"gpu-{parent_minor}-mig-{gpu_instance}-{compute_instance}"


def device_names(devices: Iterable[DeviceState]) -> dict[str, DeviceState]:
    """Name -> device for every device of a health state that has a DRA name (see the module)."""
    listed = list(devices)
    minors = {d.id: d.minor for d in listed if d.kind == "gpu"}
    out: dict[str, DeviceState] = {}
    for d in listed:
        name = name_of(d, minors)
        if name is not None and name not in out:  # two GPUs claiming one minor: the first keeps it
            out[name] = d
    return out


def offered(devices: Iterable[DeviceState]) -> dict[str, DeviceState]:
    """Name -> device for what DRA offers of a health state: every named device but a GPU in MIG mode,
    whose MIG devices are offered instead (as NVIDIA's driver does: a GPU is either whole or its parts)."""
    return {name: d for name, d in device_names(devices).items() if not (d.kind == "gpu" and d.mig_enabled)}


def name_of(device: DeviceState, gpu_minors: dict[str, int]) -> str | None:
    """The DRA name of `device`; `gpu_minors`: GPU UUID -> minor, for a MIG device's GPU. None: unnamed."""
    if device.kind == "gpu":
        return gpu_name(device.minor) if device.minor >= 0 else None
    parent = gpu_minors.get(device.parent, -1)
    if parent < 0 or device.gpu_instance_id < 0 or device.compute_instance_id < 0:
        return None
    return mig_name(parent, device.gpu_instance_id, device.compute_instance_id)


def is_device_name(name: str) -> bool:
    return _DNS_LABEL.fullmatch(name) is not None


def is_claim_uid(uid: str) -> bool:
    """A UID we put into file and CDI device names: what the API server makes (a UUID), bounded."""
    return _UID.fullmatch(uid) is not None


def cdi_device_name(claim_uid: str, device: str) -> str:
    return f"{claim_uid}-{device}"


def cdi_device_id(claim_uid: str, device: str) -> str:
    """The fully qualified CDI device the kubelet hands the runtime: k8s.gpu.nvidia.com/claim=<uid>-<device>."""
    return f"{CDI_KIND}={cdi_device_name(claim_uid, device)}"


def cdi_spec_file(claim_uid: str) -> str:
    """The claim's spec file in the CDI directory (CDI's transient spec name; JSON, as our other specs)."""
    return f"{CDI_VENDOR}-{CDI_CLASS}_{claim_uid}.json"
