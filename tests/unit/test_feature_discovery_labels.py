"""The labels of NVIDIA's GPU feature discovery, rule by rule, from facts (no NVML, no process).

Every expected value is written from NVIDIA/k8s-device-plugin's label code (internal/lm, v0.20),
named in a comment next to it; none is a copy of this module's output.
"""

from __future__ import annotations

import re

import pytest

from common.nvml.backend import (
    GPU_FABRIC_STATE_COMPLETED,
    GPU_FABRIC_STATE_IN_PROGRESS,
    FabricInfo,
    MigAttributes,
    VgpuInfo,
)
from common.settings import Replicated, SharedResource, Sharing
from services.feature_discovery.labels import (
    PCI_CLASS_3D,
    PCI_CLASS_VGA,
    Device,
    LabelError,
    NodeFacts,
    node_labels,
)

H100 = "NVIDIA H100 80GB HBM3"
H100_MB = 81559  # 85520809984 bytes // MiB: nvml-device.go GetTotalMemoryMB divides by 1024*1024
A_1G = MigAttributes(multiprocessors=16, copy_engines=1, decoders=1, encoders=0, jpegs=1, ofas=0,
                     gpu_instance_slices=1, compute_instance_slices=1, memory_mb=9984)
A_3G = MigAttributes(multiprocessors=60, copy_engines=3, decoders=3, encoders=0, jpegs=3, ofas=0,
                     gpu_instance_slices=3, compute_instance_slices=3, memory_mb=40448)
NO_SHARING = Sharing()
TS = 1700000000


def gpu(i: int, name: str = H100, mig: bool = False, **kw: object) -> Device:
    fields: dict[str, object] = {"memory_mb": H100_MB, "mig_capable": True, "compute_capability": (9, 0),
                                 "pci_class": PCI_CLASS_3D}
    fields.update(kw)
    return Device(id=f"GPU-{i}", kind="gpu", name=name, mig_enabled=mig, **fields)  # type: ignore[arg-type]


def mig(parent: int, slot: int, profile: str, attrs: MigAttributes = A_1G) -> Device:
    return Device(id=f"MIG-{parent}-{slot}", kind="mig", name=f"{H100} MIG {profile}", memory_mb=attrs.memory_mb,
                  parent=f"GPU-{parent}", profile=profile, attributes=attrs)


def node(*devices: Device, driver: str = "580.159.04", cuda: int = 13000) -> NodeFacts:
    return NodeFacts(driver_version=driver, cuda_driver_version=cuda, devices=tuple(devices))


def dgx(migs: bool = False) -> NodeFacts:
    """dgx-h100-8 (migs=False) or dgx-h100-8-mig: GPU 6 with 2 x 3g.40gb, GPU 7 with 7 x 1g.10gb."""
    devices = [gpu(i) for i in range(6)] if migs else [gpu(i) for i in range(8)]
    if migs:
        devices += [gpu(6, mig=True), mig(6, 0, "3g.40gb", A_3G), mig(6, 1, "3g.40gb", A_3G)]
        devices += [gpu(7, mig=True)] + [mig(7, s, "1g.10gb") for s in range(7)]
    return node(*devices)


def time_slicing(replicas: int = 4, rename_by_default: bool = False, rename: str = "",
                 name: str = "nvidia.com/gpu") -> Sharing:
    return Sharing(time_slicing=Replicated("timeSlicing", rename_by_default, False,
                                           (SharedResource(name, rename, replicas, None),)))


def mps(replicas: int = 4) -> Sharing:
    return Sharing(mps=Replicated("mps", False, True, (SharedResource("nvidia.com/gpu", "", replicas, None),)))


# nvml.go newVersionLabeler: driver "580.159.04" split on dots; CUDA 13000 -> 13000/1000, 13000%1000/10.
VERSION_LABELS = {
    "nvidia.com/cuda.driver.major": "580",
    "nvidia.com/cuda.driver.minor": "159",
    "nvidia.com/cuda.driver.rev": "04",
    "nvidia.com/cuda.runtime.major": "13",
    "nvidia.com/cuda.runtime.minor": "0",
    "nvidia.com/cuda.driver-version.major": "580",
    "nvidia.com/cuda.driver-version.minor": "159",
    "nvidia.com/cuda.driver-version.revision": "04",
    "nvidia.com/cuda.driver-version.full": "580.159.04",
    "nvidia.com/cuda.runtime-version.major": "13",
    "nvidia.com/cuda.runtime-version.minor": "0",
    "nvidia.com/cuda.runtime-version.full": "13.0",
}


def test_eight_full_gpus_get_nvidias_whole_label_set() -> None:
    expected = {
        "nvidia.com/gfd.timestamp": str(TS),  # timestamp.go: time.Now().Unix()
        "nvidia.com/gpu.machine": "DGX-H100",  # machine-type.go: blanks made dashes
        **VERSION_LABELS,
        "nvidia.com/mig.capable": "true",  # nvml.go: IsMigCapable of any GPU (MIG mode answered)
        "nvidia.com/mps.capable": "false",  # nvml.go newSharingLabeler: no MPS configured
        # resource.go NewGPUResourceLabeler with the config, count of the name (8):
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",  # sanitise: blanks -> "-"
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.replicas": "1",  # getReplicas: config given, resource not replicated
        "nvidia.com/gpu.sharing-strategy": "none",
        "nvidia.com/gpu.memory": str(H100_MB),
        "nvidia.com/gpu.family": "hopper",  # getArchFamily(9, 0)
        "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0",
        "nvidia.com/gpu.mode": "compute",  # nvml.go getModeForClasses: 0x030200 = PCI3dControllerClass
        "nvidia.com/vgpu.present": "false",  # vgpu.go: no vGPU among the NVIDIA PCI functions
    }
    assert node_labels(dgx(), "none", NO_SHARING, "DGX H100", TS) == expected


def test_labels_are_sorted_by_key() -> None:
    labels = node_labels(dgx(), "none", NO_SHARING, "x", TS)
    assert list(labels) == sorted(labels)


def test_no_timestamp_leaves_the_timestamp_out() -> None:
    assert "nvidia.com/gfd.timestamp" not in node_labels(dgx(), "none", NO_SHARING, "x", None)


@pytest.mark.parametrize("facts", [None, node()], ids=["nvml-unavailable", "no-gpus"])
def test_without_devices_only_timestamp_and_machine(facts: NodeFacts | None) -> None:
    # main.go: the timestamp labeler always; labeler.go: the machine type when its file is set;
    # nvml.go NewDeviceLabeler: no devices (the null manager has none), no device labels. NVIDIA's
    # vgpu.present comes of its own sysfs scan here; ours of the GPUs NVML lists, so it is left out.
    assert node_labels(facts, "none", NO_SHARING, "unknown", TS) == {
        "nvidia.com/gfd.timestamp": str(TS), "nvidia.com/gpu.machine": "unknown"}


@pytest.mark.parametrize(("rename_by_default", "rename", "product"), [
    (False, "", "NVIDIA-H100-80GB-HBM3-SHARED"),  # resource.go getProductName: shared, not renamed
    (True, "", "NVIDIA-H100-80GB-HBM3"),  # renameByDefault: Rename = <name>.shared, so no -SHARED
    # spec.DisableResourceNamingInConfig (GFD's main.go) drops a rename without renameByDefault:
    (False, "nvidia.com/gpu-ts", "NVIDIA-H100-80GB-HBM3-SHARED"),
], ids=["no-rename", "rename-by-default", "explicit-rename-dropped"])
def test_time_slicing(rename_by_default: bool, rename: str, product: str) -> None:
    labels = node_labels(dgx(), "none", time_slicing(4, rename_by_default, rename), "x", TS)
    assert labels["nvidia.com/gpu.product"] == product
    assert labels["nvidia.com/gpu.replicas"] == "4"  # getReplicas: the resource's replicas
    assert labels["nvidia.com/gpu.sharing-strategy"] == "time-slicing"  # SharingStrategyTimeSlicing
    assert labels["nvidia.com/gpu.count"] == "8"  # the count is of GPUs, not replicas
    assert labels["nvidia.com/mps.capable"] == "false"


def test_time_slicing_of_another_resource_leaves_the_gpu_unshared() -> None:
    labels = node_labels(dgx(), "none", time_slicing(4, name="nvidia.com/mig-1g.10gb"), "x", TS)
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.replicas"] == "1"
    assert labels["nvidia.com/gpu.sharing-strategy"] == "none"  # baseLabeler: only with replicas > 1


def test_mps() -> None:
    labels = node_labels(dgx(), "none", mps(4), "x", TS)
    assert labels["nvidia.com/mps.capable"] == "true"  # isMPSCapable: no MIG-enabled GPU
    assert labels["nvidia.com/gpu.sharing-strategy"] == "mps"  # SharingStrategyMPS
    assert labels["nvidia.com/gpu.replicas"] == "4"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"


def test_mps_wins_over_time_slicing_as_in_nvidias_config() -> None:
    # api/config/v1 Sharing: SharingStrategy() and ReplicatedResources() look at MPS first.
    both = Sharing(time_slicing=time_slicing(8, name="nvidia.com/gpu").time_slicing, mps=mps(2).mps)
    labels = node_labels(dgx(), "none", both, "x", TS)
    assert (labels["nvidia.com/gpu.sharing-strategy"], labels["nvidia.com/gpu.replicas"]) == ("mps", "2")


def test_mps_with_a_mig_enabled_gpu_fails_as_nvidias_labeler() -> None:
    # nvml.go isMPSCapable: "MPS sharing is not supported for mig devices" fails the labeler.
    with pytest.raises(LabelError, match="MPS sharing is not supported for mig devices"):
        node_labels(dgx(migs=True), "none", mps(4), "x", TS)


def test_mig_none_counts_mig_enabled_gpus_of_the_same_name() -> None:
    labels = node_labels(dgx(migs=True), "none", NO_SHARING, "x", TS)
    # mig-strategy.go newGPULabelers: counts[name] holds MIG-enabled and full GPUs; the full GPUs'
    # labeler (with the config) is applied last. With none, no mig.strategy label.
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["nvidia.com/gpu.replicas"] == "1"
    assert "nvidia.com/mig.strategy" not in labels
    assert not any(k.startswith("nvidia.com/mig-") for k in labels)


def test_all_gpus_mig_enabled_are_labelled_without_sharing() -> None:
    facts = node(gpu(0, mig=True), mig(0, 0, "1g.10gb"))
    labels = node_labels(facts, "none", time_slicing(4), "x", TS)
    # NewGPUResourceLabelerWithoutSharing: a nil config, so replicas 0 and no -SHARED.
    assert labels["nvidia.com/gpu.replicas"] == "0"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.sharing-strategy"] == "none"


def test_mig_mixed() -> None:
    labels = node_labels(dgx(migs=True), "mixed", NO_SHARING, "x", TS)
    assert labels["nvidia.com/mig.strategy"] == "mixed"  # migStrategyLabeler
    assert labels["nvidia.com/gpu.count"] == "8"  # the full-GPU labels stay beside the MIG ones
    # newMigStrategyMixedLabeler: nvidia.com/mig-<profile>, NewMIGResourceLabeler(config) with the
    # product "<GPU model>-MIG-<profile>" and nvml-mig-device.go GetAttributes.
    for profile, count, a in (("1g.10gb", 7, A_1G), ("3g.40gb", 2, A_3G)):
        r = f"nvidia.com/mig-{profile}"
        assert {k: v for k, v in labels.items() if k.startswith(r + ".")} == {
            f"{r}.product": f"NVIDIA-H100-80GB-HBM3-MIG-{profile}",
            f"{r}.count": str(count),
            f"{r}.replicas": "1",
            f"{r}.sharing-strategy": "none",
            f"{r}.memory": str(a.memory_mb),
            f"{r}.multiprocessors": str(a.multiprocessors),
            f"{r}.slices.gi": str(a.gpu_instance_slices),
            f"{r}.slices.ci": str(a.compute_instance_slices),
            f"{r}.engines.copy": str(a.copy_engines),
            f"{r}.engines.decoder": str(a.decoders),
            f"{r}.engines.encoder": str(a.encoders),
            f"{r}.engines.jpeg": str(a.jpegs),
            f"{r}.engines.ofa": str(a.ofas),
        }


def test_mig_mixed_time_slicing_of_a_profile() -> None:
    labels = node_labels(dgx(migs=True), "mixed", time_slicing(2, name="nvidia.com/mig-1g.10gb"), "x", TS)
    assert labels["nvidia.com/mig-1g.10gb.product"] == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb-SHARED"
    assert labels["nvidia.com/mig-1g.10gb.replicas"] == "2"
    assert labels["nvidia.com/mig-1g.10gb.sharing-strategy"] == "time-slicing"


def test_mig_profile_plus_is_a_dot_in_the_resource_name() -> None:
    # nvml-mig-device.go GetName: strings.ReplaceAll(profile, "+", ".").
    labels = node_labels(node(gpu(0, mig=True), mig(0, 0, "1g.18gb+me")), "mixed", NO_SHARING, "x", TS)
    assert labels["nvidia.com/mig-1g.18gb.me.product"] == "NVIDIA-H100-80GB-HBM3-MIG-1g.18gb.me"


def test_mig_single_valid() -> None:
    facts = node(gpu(0, mig=True), *(mig(0, s, "1g.10gb") for s in range(7)),
                 gpu(1, mig=True), *(mig(1, s, "1g.10gb") for s in range(7)))
    labels = node_labels(facts, "single", NO_SHARING, "x", TS)
    # newMigStrategySingleLabeler: the MIG devices become nvidia.com/gpu, over the full-GPU labels.
    assert labels["nvidia.com/mig.strategy"] == "single"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"
    assert labels["nvidia.com/gpu.count"] == "14"
    assert labels["nvidia.com/gpu.replicas"] == "1"
    assert labels["nvidia.com/gpu.memory"] == "9984"  # the MIG device's attribute replaces the GPU's
    assert labels["nvidia.com/gpu.multiprocessors"] == "16"
    assert labels["nvidia.com/gpu.slices.gi"] == "1"
    assert labels["nvidia.com/gpu.engines.ofa"] == "0"
    assert labels["nvidia.com/gpu.family"] == "hopper"  # from the (MIG-enabled) GPUs' labeler


@pytest.mark.parametrize(("facts", "why"), [
    (dgx(migs=True), "MIG enabled and disabled GPUs"),
    (node(gpu(0, mig=True), mig(0, 0, "1g.10gb"), gpu(1, mig=True), mig(1, 0, "3g.40gb", A_3G)), "two profiles"),
    (node(gpu(0, mig=True), mig(0, 0, "1g.10gb"), gpu(1, mig=True)), "a MIG-enabled GPU without MIG devices"),
], ids=["mixed-modes", "two-profiles", "empty"])
def test_mig_single_invalid(facts: NodeFacts, why: str) -> None:
    labels = node_labels(facts, "single", NO_SHARING, "x", TS)
    # newInvalidMigStrategyLabeler: product "<model>-MIG-INVALID", count, replicas and memory 0.
    assert labels["nvidia.com/mig.strategy"] == "single"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3-MIG-INVALID"
    assert (labels["nvidia.com/gpu.count"], labels["nvidia.com/gpu.replicas"], labels["nvidia.com/gpu.memory"]) \
        == ("0", "0", "0")


def test_mig_single_without_mig_enabled_gpus_is_none_plus_the_strategy() -> None:
    labels = node_labels(dgx(), "single", NO_SHARING, "x", TS)
    assert labels == {**node_labels(dgx(), "none", NO_SHARING, "x", TS), "nvidia.com/mig.strategy": "single"}


@pytest.mark.parametrize(("cc", "family"), [
    ((1, 3), "tesla"), ((2, 1), "fermi"), ((3, 7), "kepler"), ((5, 2), "maxwell"), ((6, 1), "pascal"),
    ((7, 0), "volta"), ((7, 2), "volta"), ((7, 5), "turing"), ((8, 0), "ampere"), ((8, 6), "ampere"),
    ((8, 9), "ada-lovelace"), ((9, 0), "hopper"), ((10, 0), "blackwell"), ((12, 0), "blackwell"),
    ((11, 0), "undefined"), ((4, 0), "undefined"),
])
def test_family_from_compute_capability(cc: tuple[int, int], family: str) -> None:
    # resource.go getArchFamily, Blackwell as 10 and 12 (PR #1237).
    labels = node_labels(node(gpu(0, compute_capability=cc)), "none", NO_SHARING, "x", TS)
    assert labels["nvidia.com/gpu.family"] == family
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == tuple(map(str, cc))


def test_compute_capability_major_zero_has_no_architecture_labels() -> None:
    labels = node_labels(node(gpu(0, compute_capability=(0, 0))), "none", NO_SHARING, "x", TS)
    assert not {"nvidia.com/gpu.family", "nvidia.com/gpu.compute.major"} & set(labels)  # newArchitectureLabels


def test_zero_memory_has_no_memory_label() -> None:
    assert "nvidia.com/gpu.memory" not in node_labels(node(gpu(0, memory_mb=0)), "none", NO_SHARING, "x", TS)


@pytest.mark.parametrize(("classes", "mode"), [
    ((PCI_CLASS_3D, PCI_CLASS_3D), "compute"),
    ((PCI_CLASS_VGA,), "graphics"),
    ((PCI_CLASS_VGA, PCI_CLASS_3D), "unknown"),  # getModeForClasses: not all the same class
    ((0x038000,), "unknown"),
    ((PCI_CLASS_3D, None), "unknown"),  # newGPUModeLabeler: a class that cannot be read
])
def test_gpu_mode(classes: tuple[int | None, ...], mode: str) -> None:
    facts = node(*(gpu(i, pci_class=c) for i, c in enumerate(classes)))
    assert node_labels(facts, "none", NO_SHARING, "x", TS)["nvidia.com/gpu.mode"] == mode


def test_mig_capable_false_when_no_gpu_answers_for_mig_mode() -> None:
    labels = node_labels(node(gpu(0, mig_capable=False)), "none", NO_SHARING, "x", TS)
    assert labels["nvidia.com/mig.capable"] == "false"


CLUSTER = "3c1a3e26-5a3f-4b9e-9d2b-0c6f1c2d3e4f"


def fabric(clique: int, cluster: str = CLUSTER, state: int = GPU_FABRIC_STATE_COMPLETED, status: int = 0) -> FabricInfo:
    return FabricInfo(cluster_uuid=cluster, clique_id=clique, state=state, status=status)


@pytest.mark.parametrize(("fabrics", "clique"), [
    ((fabric(7), fabric(7)), f"{CLUSTER}.7"),  # imex.go: "<cluster UUID>.<clique ID>"
    ((fabric(7), None), f"{CLUSTER}.7"),  # a GPU outside the fabric is skipped
    ((fabric(7), fabric(8)), None),  # clique IDs non-unique: no label
    ((fabric(7), fabric(7, cluster="11111111-2222-3333-4444-555555555555")), None),  # cluster UUIDs non-unique
    ((fabric(7, state=GPU_FABRIC_STATE_IN_PROGRESS),), None),  # IsFabricAttached: state not COMPLETED
    ((fabric(7, cluster="00000000-0000-0000-0000-000000000000"),), None),  # no cluster UUID
    ((fabric(7, status=3),), None),  # the registration's status is not SUCCESS
    ((None,), None),
])
def test_clique(fabrics: tuple[FabricInfo | None, ...], clique: str | None) -> None:
    facts = node(*(gpu(i, fabric=f) for i, f in enumerate(fabrics)))
    assert node_labels(facts, "none", NO_SHARING, "x", TS).get("nvidia.com/gpu.clique") == clique


def test_two_part_driver_version_has_an_empty_revision() -> None:
    labels = node_labels(node(gpu(0), driver="580.159"), "none", NO_SHARING, "x", TS)
    assert labels["nvidia.com/cuda.driver.rev"] == "" and labels["nvidia.com/cuda.driver-version.revision"] == ""


@pytest.mark.parametrize("driver", ["580", "580.159.04.1"])
def test_driver_version_of_another_form_fails(driver: str) -> None:
    with pytest.raises(LabelError, match=re.escape('does not match format "X.Y[.Z]"')):
        node_labels(node(gpu(0), driver=driver), "none", NO_SHARING, "x", TS)


def test_cuda_version_with_a_minor() -> None:
    labels = node_labels(node(gpu(0), cuda=12040), "none", NO_SHARING, "x", TS)
    assert labels["nvidia.com/cuda.runtime-version.full"] == "12.4"


def test_product_name_is_sanitised() -> None:
    # resource.go sanitise: [^A-Za-z0-9-_. ] dropped, blank runs made one "-".
    labels = node_labels(node(gpu(0, name="NVIDIA  RTX (TM) 6000/Ada")), "none", NO_SHARING, "x", TS)
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-RTX-TM-6000Ada"


def test_compute_capability_refused_fails_the_labels() -> None:
    with pytest.raises(LabelError, match="compute capability"):
        node_labels(node(gpu(0, compute_capability=None)), "none", NO_SHARING, "x", TS)


def test_unknown_strategy_fails() -> None:
    with pytest.raises(LabelError, match="unknown strategy: bogus"):
        node_labels(dgx(), "bogus", NO_SHARING, "x", TS)


HOST = VgpuInfo(host_driver_version="595.71.03", host_driver_branch="r596_25")


@pytest.mark.parametrize(("vgpus", "expected"), [
    # vgpu.go: present with the host driver's version and branch, as read from record 0.
    ((HOST,), {"nvidia.com/vgpu.present": "true", "nvidia.com/vgpu.host-driver-version": "595.71.03",
               "nvidia.com/vgpu.host-driver-branch": "r596_25"}),
    # Its loop over the vGPUs overwrites the two: the last one's stay.
    ((VgpuInfo("580.95.02", "r581_36"), HOST), {"nvidia.com/vgpu.present": "true",
                                                "nvidia.com/vgpu.host-driver-version": "595.71.03",
                                                "nvidia.com/vgpu.host-driver-branch": "r596_25"}),
    # A GPU whose config space could not say counts as no vGPU (since #672 a read error is present=false).
    ((None, HOST), {"nvidia.com/vgpu.present": "true", "nvidia.com/vgpu.host-driver-version": "595.71.03",
                    "nvidia.com/vgpu.host-driver-branch": "r596_25"}),
    ((None, None), {"nvidia.com/vgpu.present": "false"}),
], ids=["one-vgpu", "last-wins", "one-unread", "none"])
def test_vgpu(vgpus: tuple[VgpuInfo | None, ...], expected: dict[str, str]) -> None:
    labels = node_labels(node(*(gpu(i, vgpu=v) for i, v in enumerate(vgpus))), "none", NO_SHARING, "x", TS)
    assert {k: v for k, v in labels.items() if k.startswith("nvidia.com/vgpu.")} == expected
    assert labels["nvidia.com/gpu.count"] == str(len(vgpus))  # the vGPUs are GPUs to the other labelers
