"""NVIDIA's GPU feature discovery labels, computed from facts: no NVML, no files, no clock.

The input is the node's device list as the health bus carries it (a `DeviceState`'s id, kind,
name, memory, parent, MIG profile and mode) plus what GFD asks NVML and sysfs beyond it (compute
capability, MIG attributes, PCI class, fabric, vGPU host driver), the driver and CUDA versions, the settings
and the machine type. `node_labels` answers the labels NVIDIA's gpu-feature-discovery v0.20
writes for the same node and config (cmd/gpu-feature-discovery and internal/lm of
NVIDIA/k8s-device-plugin): each rule below names the labeler it follows. Because nothing
here talks to NVML, the same labels can later come from the health bus inside our own pod.

Where NVIDIA's labeler fails (a driver version it cannot parse, MPS sharing with a MIG-enabled
GPU, a fact it needs that the driver refused), `LabelError` says so and no label is made: its
command then exits, and so does ours.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from common.bus.messages import DeviceState
from common.nvml.backend import GPU_FABRIC_STATE_COMPLETED, NVML_SUCCESS, FabricInfo, MigAttributes, VgpuInfo
from common.settings import Replicated, Sharing

log = logging.getLogger(__name__)

FULL_GPU = "nvidia.com/gpu"
MIG_PREFIX = "nvidia.com/mig-"
# PCI classes (go-nvlib nvpci): a GPU is a VGA controller in graphics mode, a 3D controller in compute mode.
PCI_CLASS_VGA = 0x030000
PCI_CLASS_3D = 0x030200
NO_CLUSTER = "00000000-0000-0000-0000-000000000000"


class LabelError(Exception):
    """NVIDIA's labeler would fail on these facts: no labels, the command exits non-zero."""


@dataclass(frozen=True)
class Device:
    """One GPU or MIG device: a bus DeviceState's fields, plus what GFD asks NVML beyond them."""

    id: str
    kind: Literal["gpu", "mig"]
    name: str  # NVML's name; a MIG device's is "<GPU name> MIG <profile>"
    memory_mb: int
    parent: str = ""  # MIG devices: their GPU's id
    profile: str = ""  # MIG devices: "1g.10gb", as NVML names it ("+" kept: "1g.18gb+me")
    mig_enabled: bool = False  # GPUs: MIG mode is on
    mig_capable: bool = False  # GPUs: NVML answers for MIG mode at all
    compute_capability: tuple[int, int] | None = None  # GPUs; None: NVML refused it
    attributes: MigAttributes | None = None  # MIG devices; None: NVML refused them
    pci_class: int | None = None  # GPUs; None: sysfs does not say
    fabric: FabricInfo | None = None  # GPUs; None: not in a multi-node NVLink fabric
    vgpu: VgpuInfo | None = None  # GPUs; None: not a vGPU (or its PCI config space could not say)


@dataclass(frozen=True)
class NodeFacts:
    """What NVML said of the node: versions and every device (GPUs before their MIG devices)."""

    driver_version: str
    cuda_driver_version: int  # NVML's encoding: 1000 * major + 10 * minor
    devices: tuple[Device, ...]

    @property
    def gpus(self) -> list[Device]:
        return [d for d in self.devices if d.kind == "gpu"]

    def migs_of(self, gpu: Device) -> list[Device]:
        return [d for d in self.devices if d.kind == "mig" and d.parent == gpu.id]


def device_of(d: DeviceState) -> Device:
    """A bus DeviceState as the labels see it (the health-monitor's discovery read its facts)."""
    if d.kind == "mig":
        a = d.mig_attributes
        return Device(id=d.id, kind="mig", name=d.name, memory_mb=d.memory_mb, parent=d.parent, profile=d.profile,
                      attributes=None if a is None else MigAttributes(
                          multiprocessors=a.multiprocessors, copy_engines=a.copy_engines, decoders=a.decoders,
                          encoders=a.encoders, jpegs=a.jpegs, ofas=a.ofas, gpu_instance_slices=a.gpu_instance_slices,
                          compute_instance_slices=a.compute_instance_slices, memory_mb=a.memory_mb))
    f, v = d.fabric, d.vgpu
    return Device(
        id=d.id, kind="gpu", name=d.name, memory_mb=d.memory_mb, mig_enabled=d.mig_enabled, mig_capable=d.mig_capable,
        compute_capability=(d.compute_major, d.compute_minor) if d.compute_major >= 0 else None,
        pci_class=d.pci_class if d.pci_class >= 0 else None,
        fabric=None if f is None else FabricInfo(cluster_uuid=f.cluster_uuid, clique_id=f.clique_id, state=f.state,
                                                 status=f.status),
        vgpu=None if v is None else VgpuInfo(host_driver_version=v.host_driver_version,
                                             host_driver_branch=v.host_driver_branch),
    )


def facts_of(driver_version: str, cuda_driver_version: int, devices: Sequence[DeviceState]) -> NodeFacts:
    """The node's facts from discovery's device list (the bus's, or a pass's own): one source for both
    the gpu-feature-discovery command and feature-labels. Raises LabelError where they cannot describe
    the node: NVIDIA's pass asks every GPU and fails on any refusal, whichever GPU the labels show."""
    if any(d.kind == "gpu" for d in devices) and cuda_driver_version == 0:
        raise LabelError("no CUDA driver version (NVML refused it, or the health-monitor predates the feature "
                         "facts)")
    for d in devices:
        if d.kind == "gpu" and d.compute_major < 0:
            raise LabelError(f"failed to determine CUDA compute capability of GPU {d.id}")
        if d.kind == "mig" and d.mig_attributes is None:
            raise LabelError(f"unable to get attributes of MIG device {d.id}")
    return NodeFacts(driver_version=driver_version, cuda_driver_version=cuda_driver_version,
                     devices=tuple(device_of(d) for d in devices))


def node_labels(facts: NodeFacts | None, mig_strategy: str, sharing: Sharing, machine_type: str,
                timestamp: int | None) -> dict[str, str]:
    """Every label, sorted by key. `facts` None: NVML could not be used and failOnInitError is false
    (NVIDIA's null resource manager: no device labels). `timestamp` None: --no-timestamp."""
    labels: dict[str, str] = {}
    if timestamp is not None:
        labels["nvidia.com/gfd.timestamp"] = str(timestamp)  # timestamp.go
    # machine-type.go: the DMI product name, blanks made dashes ("unknown" when unreadable).
    labels["nvidia.com/gpu.machine"] = machine_type.replace(" ", "-")
    gpus = facts.gpus if facts is not None else []
    if facts is None or not gpus:
        # nvml.go: no devices, no device labels. Nor vgpu.*: NVIDIA's scan every NVIDIA PCI function in
        # sysfs, with or without NVML; ours are read of the GPUs NVML lists, so here they are unknown.
        return dict(sorted(labels.items()))
    labels.update(_version_labels(facts))
    labels["nvidia.com/mig.capable"] = _bool(any(g.mig_capable for g in gpus))
    labels.update(_sharing_labels(facts, sharing))
    labels.update(_resource_labels(facts, mig_strategy, sharing))
    labels["nvidia.com/gpu.mode"] = _gpu_mode(gpus)
    labels.update(_clique_labels(gpus))
    labels.update(_vgpu_labels(gpus))
    return dict(sorted(labels.items()))


def _bool(value: bool) -> str:
    return "true" if value else "false"  # Go's strconv.FormatBool


def _version_labels(facts: NodeFacts) -> dict[str, str]:
    """nvml.go newVersionLabeler: the deprecated cuda.driver.* and cuda.runtime.*, and their successors."""
    parts = facts.driver_version.split(".")
    if not 2 <= len(parts) <= 3:
        raise LabelError(f'error getting driver version: Version "{facts.driver_version}" does not match '
                         'format "X.Y[.Z]"')
    major, minor, rev = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
    # nvml-lib.go GetCudaDriverVersion: NVML's integer split as NVML_CUDA_DRIVER_VERSION_MAJOR/MINOR do.
    cuda_major, cuda_minor = facts.cuda_driver_version // 1000, facts.cuda_driver_version % 1000 // 10
    return {
        "nvidia.com/cuda.driver.major": major,
        "nvidia.com/cuda.driver.minor": minor,
        "nvidia.com/cuda.driver.rev": rev,
        "nvidia.com/cuda.runtime.major": str(cuda_major),
        "nvidia.com/cuda.runtime.minor": str(cuda_minor),
        "nvidia.com/cuda.driver-version.major": major,
        "nvidia.com/cuda.driver-version.minor": minor,
        "nvidia.com/cuda.driver-version.revision": rev,
        "nvidia.com/cuda.driver-version.full": facts.driver_version,
        "nvidia.com/cuda.runtime-version.major": str(cuda_major),
        "nvidia.com/cuda.runtime-version.minor": str(cuda_minor),
        "nvidia.com/cuda.runtime-version.full": f"{cuda_major}.{cuda_minor}",
    }


# -- sharing: NVIDIA's api/config/v1 as GFD applies it ------------------------------------------

def _replicated(sharing: Sharing) -> Replicated | None:
    """Sharing.ReplicatedResources(): MPS when configured, else time-slicing (NVIDIA's plugin drops
    time-slicing when both are set, where ours serves both on different GPUs)."""
    return sharing.mps if sharing.mps is not None else sharing.time_slicing


def _strategy(sharing: Sharing) -> str:
    """Sharing.SharingStrategy()."""
    if sharing.mps is not None and any(r.replicas > 1 for r in sharing.mps.resources):
        return "mps"
    if sharing.time_slicing is not None and any(r.replicas > 1 for r in sharing.time_slicing.resources):
        return "time-slicing"
    return "none"


def _sharing_labels(facts: NodeFacts, sharing: Sharing) -> dict[str, str]:
    """nvml.go newSharingLabeler: mps.capable is true only with MPS configured, and MPS with a
    MIG-enabled GPU fails the labeler."""
    if _strategy(sharing) != "mps":
        return {"nvidia.com/mps.capable": "false"}
    if any(g.mig_enabled for g in facts.gpus):
        raise LabelError("error creating sharing labeler: failed to check MPS-capable: MPS sharing is not "
                         "supported for mig devices")
    return {"nvidia.com/mps.capable": "true"}


@dataclass(frozen=True)
class _Resource:
    """resource.go's resourceLabeler: `<name>.<suffix>` labels; sharing None = sharing disabled."""

    name: str
    sharing: Sharing | None

    def key(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"

    def _replication(self) -> tuple[int, bool] | None:
        """(replicas, renamed) of this resource in the active sharing section."""
        replicated = _replicated(self.sharing) if self.sharing is not None else None
        if replicated is None:
            return None
        for r in replicated.resources:
            if r.name == self.name:
                # spec.DisableResourceNamingInConfig (GFD's main): an explicit `rename` is dropped and
                # renameByDefault renames every resource, so a resource is renamed iff renameByDefault.
                return r.replicas, replicated.rename_by_default
        return None

    def replicas(self) -> int:
        if self.sharing is None:
            return 0
        info = self._replication()
        return info[0] if info is not None and info[0] > 0 else 1

    def product(self, *parts: str) -> str:
        stripped = [_sanitise(p) for p in parts if p]
        if not stripped:
            return ""
        info = self._replication()
        if info is not None and info[0] > 1 and not info[1]:
            stripped.append("SHARED")  # shared under its own name: say so in the product
        return "-".join(stripped)

    def base(self, count: int, *parts: str) -> dict[str, str]:
        """baseLabeler: product, count, replicas and sharing-strategy."""
        replicas = self.replicas()
        strategy = _strategy(self.sharing) if self.sharing is not None and replicas > 1 else "none"
        return {
            self.key("product"): self.product(*parts),
            self.key("count"): str(count),
            self.key("replicas"): str(replicas),
            self.key("sharing-strategy"): strategy,
        }


_NOT_LABEL_CHARS = re.compile("[^A-Za-z0-9-_. ]")


def _sanitise(text: str) -> str:
    """resource.go sanitise: characters a label value cannot hold dropped, blanks made one dash."""
    return "-".join(_NOT_LABEL_CHARS.sub("", text).split())


def _arch_family(major: int, minor: int) -> str:
    """resource.go getArchFamily."""
    families = {1: "tesla", 2: "fermi", 3: "kepler", 5: "maxwell", 6: "pascal", 9: "hopper",
                10: "blackwell", 12: "blackwell"}  # Blackwell has two majors: 10 and 12
    if major == 7:
        return "volta" if minor < 5 else "turing"
    if major == 8:
        return "ampere" if minor < 9 else "ada-lovelace"
    return families.get(major, "undefined")


def _full_gpu_labels(sharing: Sharing | None, gpu: Device, count: int) -> dict[str, str]:
    """resource.go NewGPUResourceLabeler: base labels, memory (when known) and architecture."""
    rl = _Resource(FULL_GPU, sharing)
    labels = rl.base(count, gpu.name)
    if gpu.memory_mb != 0:
        labels[rl.key("memory")] = str(gpu.memory_mb)
    if gpu.compute_capability is None:
        raise LabelError(f"failed to determine CUDA compute capability of GPU {gpu.id}")
    major, minor = gpu.compute_capability
    if major != 0:
        labels[rl.key("family")] = _arch_family(major, minor)
        labels[rl.key("compute.major")] = str(major)
        labels[rl.key("compute.minor")] = str(minor)
    return labels


def _by_name(gpus: Iterable[Device]) -> dict[str, Device]:
    # NVIDIA keeps one device per name (the last one seen); names go in a Go map, whose order is
    # random: with GPUs of several models, which model's labels win is NVIDIA's chance, ours sorted.
    return dict(sorted({g.name: g for g in gpus}.items()))


def _gpu_resource_labels(facts: NodeFacts, sharing: Sharing) -> dict[str, str]:
    """mig-strategy.go newGPULabelers: MIG-enabled GPUs labelled without sharing, then the full GPUs
    over them; the count of a name holds both kinds."""
    gpus = facts.gpus
    counts = Counter(g.name for g in gpus)
    if len(counts) > 1:
        log.warning("Multiple device types detected: %s", sorted(counts))
    labels: dict[str, str] = {}
    for name, gpu in _by_name(g for g in gpus if g.mig_enabled).items():
        labels.update(_full_gpu_labels(None, gpu, counts[name]))
    for name, gpu in _by_name(g for g in gpus if not g.mig_enabled).items():
        labels.update(_full_gpu_labels(sharing, gpu, counts[name]))
    return labels


def _resource_labels(facts: NodeFacts, mig_strategy: str, sharing: Sharing) -> dict[str, str]:
    """mig-strategy.go NewResourceLabeler: full-GPU labels, then the strategy's MIG labels over them."""
    labels = _gpu_resource_labels(facts, sharing)
    if mig_strategy == "none":
        return labels  # not even mig.strategy: NVIDIA labels the strategy only for single and mixed
    labels["nvidia.com/mig.strategy"] = mig_strategy
    if mig_strategy == "single":
        labels.update(_mig_single_labels(facts, sharing))
    elif mig_strategy == "mixed":
        labels.update(_mig_labels(_mig_resources(facts, lambda profile: MIG_PREFIX + profile), facts, sharing))
    else:
        raise LabelError(f"unknown strategy: {mig_strategy}")
    return labels


def _resource_profile(mig: Device) -> str:
    """nvml-mig-device.go GetName: the MIG profile, "+" made "." ("1g.18gb+me" -> "1g.18gb.me")."""
    return mig.profile.replace("+", ".")


def _mig_resources(facts: NodeFacts, name_of: Callable[[str], str]) -> dict[str, tuple[str, Device, int]]:
    """Profile -> (resource name, its first MIG device, count), over every MIG device of the node."""
    found: dict[str, tuple[str, Device, int]] = {}
    for mig in (d for d in facts.devices if d.kind == "mig"):
        profile = _resource_profile(mig)
        if profile in found:
            name, first, count = found[profile]
            found[profile] = (name, first, count + 1)
        else:
            found[profile] = (name_of(profile), mig, 1)
    return found


def _mig_single_labels(facts: NodeFacts, sharing: Sharing) -> dict[str, str]:
    """mig-strategy.go newMigStrategySingleLabeler: all GPUs MIG-enabled with one profile, else the
    mig-strategy-invalid labels."""
    enabled = [g for g in facts.gpus if g.mig_enabled]
    if not enabled:
        return {}  # no MIG-enabled GPU: as the none strategy
    if any(not facts.migs_of(g) for g in enabled):
        return _invalid_single(enabled[0], "at least one MIG device is enabled but empty")
    if len(enabled) != len(facts.gpus):
        return _invalid_single(enabled[0], "devices with MIG enabled and disable detected")
    resources = _mig_resources(facts, lambda profile: FULL_GPU)
    if len(resources) != 1:
        return _invalid_single(enabled[0], "more than one MIG device type present on node")
    return _mig_labels(resources, facts, sharing)


def _invalid_single(gpu: Device, reason: str) -> dict[str, str]:
    log.warning("Invalid configuration detected for mig-strategy=single: %s", reason)
    rl = _Resource(FULL_GPU, None)
    return {rl.key("product"): rl.product(gpu.name, "MIG", "INVALID"), rl.key("count"): "0",
            rl.key("replicas"): "0", rl.key("memory"): "0"}


def _mig_labels(resources: dict[str, tuple[str, Device, int]], facts: NodeFacts,
                sharing: Sharing) -> dict[str, str]:
    """resource.go NewMIGResourceLabeler per profile: base labels of "<GPU>-MIG-<profile>" and the
    MIG device's attributes."""
    parents = {g.id: g for g in facts.gpus}
    labels: dict[str, str] = {}
    for profile, (name, mig, count) in sorted(resources.items()):
        rl = _Resource(name, sharing)
        parent = parents.get(mig.parent)
        if parent is None:
            raise LabelError(f"failed to get parent of MIG device {mig.id}")
        labels.update(rl.base(count, parent.name, "MIG", profile))
        a = mig.attributes
        if a is None:
            raise LabelError(f"unable to get attributes of MIG device {mig.id}")
        for suffix, value in (("memory", a.memory_mb), ("multiprocessors", a.multiprocessors),
                              ("slices.gi", a.gpu_instance_slices), ("slices.ci", a.compute_instance_slices),
                              ("engines.copy", a.copy_engines), ("engines.decoder", a.decoders),
                              ("engines.encoder", a.encoders), ("engines.jpeg", a.jpegs), ("engines.ofa", a.ofas)):
            labels[rl.key(suffix)] = str(value)
    return labels


def _gpu_mode(gpus: Sequence[Device]) -> str:
    """nvml.go newGPUModeLabeler: compute or graphics when every GPU agrees, else unknown."""
    classes = [g.pci_class for g in gpus]
    known = {c for c in classes if c is not None}
    if len(known) != len(set(classes)):
        log.warning("Failed to create GPU mode labeler: the PCI class of a GPU is unknown")
        return "unknown"
    if len(known) != 1:
        log.info("Not all GPU devices belong to the same class %s", sorted(f"{c:#08x}" for c in known))
        return "unknown"
    return {PCI_CLASS_VGA: "graphics", PCI_CLASS_3D: "compute"}.get(known.pop(), "unknown")


def fabric_attached(info: FabricInfo | None) -> bool:
    """go-nvlib IsFabricAttached: registered with the fabric, in a cluster, without error."""
    return (info is not None and info.state == GPU_FABRIC_STATE_COMPLETED and info.cluster_uuid != NO_CLUSTER
            and info.status == NVML_SUCCESS)


def _clique_labels(gpus: Sequence[Device]) -> dict[str, str]:
    """imex.go newImexLabeler: gpu.clique when every fabric-attached GPU names one cluster and clique."""
    attached = [g.fabric for g in gpus if g.fabric is not None and fabric_attached(g.fabric)]
    clusters = {f.cluster_uuid for f in attached}
    cliques = {f.clique_id for f in attached}
    if len(clusters) > 1 or len(cliques) > 1:
        log.warning("Cluster UUIDs or clique IDs are non-unique: %s, %s", sorted(clusters), sorted(cliques))
        return {}
    if not clusters:
        return {}
    return {"nvidia.com/gpu.clique": f"{clusters.pop()}.{cliques.pop()}"}


def _vgpu_labels(gpus: Sequence[Device]) -> dict[str, str]:
    """vgpu.go vgpuLabeler: vgpu.present, and on a vGPU guest the host driver's version and branch (the
    last vGPU's: NVIDIA's loop overwrites them, and one hypervisor serves them all). A config space
    that could not be read or understood is "not a vGPU", as NVIDIA's labeler has made such errors
    since #672: present false and a warning, where it failed the pass before."""
    vgpus = [g.vgpu for g in gpus if g.vgpu is not None]
    if not vgpus:
        return {"nvidia.com/vgpu.present": "false"}
    return {"nvidia.com/vgpu.present": "true", "nvidia.com/vgpu.host-driver-version": vgpus[-1].host_driver_version,
            "nvidia.com/vgpu.host-driver-branch": vgpus[-1].host_driver_branch}
