"""Allocate answers over the whole matrix: device-list strategy x device-ID strategy x
sharing (plain GPUs, time-sliced replicas) x MIG (whole GPUs, MIG devices), with and
without DeviceSpecs, and every rejection, against answers written out here.

The expected answers are composed from two literal tables, never from the code under
test: per scenario the runtime names and device nodes, per device-list strategy which
parts of the answer appear. A few complete answers are also written out in full.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import Settings, resolve
from services.plugin_server.allocation import AllocationError, container_response, validate
from services.plugin_server.device_table import PluginDevice

G0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
G1 = "GPU-bbbbbbbb-1111-4111-8111-111111111111"
G2 = "GPU-cccccccc-2222-4222-8222-222222222222"  # MIG enabled
M20 = "MIG-dddddddd-2020-4020-8020-202020202020"  # 2:0, caps 21, 22
M21 = "MIG-eeeeeeee-2121-4121-8121-212121212121"  # 2:1, caps 30, 31
ANNOTATION_ID = "11111111-2222-4333-8444-555555555555"
GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-1g.10gb"
PREFIX = f'invalid allocation request for "{GPU}": invalid request: '


def _gpu(uuid: str, index: int, minor: int, mig: bool = False) -> DeviceState:
    return DeviceState(id=uuid, kind="gpu", index=str(index), name="NVIDIA H100 80GB HBM3", health=HEALTHY,
                       reason="", since=0.0, minor=minor, numa_node=0, mig_enabled=mig)


def _mig(uuid: str, gpu: str, index: str, caps: list[int]) -> DeviceState:
    return DeviceState(id=uuid, kind="mig", index=index, name="NVIDIA H100 80GB HBM3 MIG 1g.10gb", health=HEALTHY,
                       reason="", since=0.0, parent=gpu, profile="1g.10gb", caps=caps, numa_node=0)


# Minors differ from indices on purpose: a mix-up between the two shows.
GPU0 = _gpu(G0, 0, 4)
GPU1 = _gpu(G1, 1, 5)
GPU2 = _gpu(G2, 2, 6, mig=True)
MIG20 = _mig(M20, G2, "2:0", [21, 22])
MIG21 = _mig(M21, G2, "2:1", [30, 31])


def _whole(d: DeviceState, health: str = HEALTHY) -> PluginDevice:
    return PluginDevice(d.id, health, 0, d)


def _replica(d: DeviceState, n: int, parent: DeviceState | None = None, health: str = HEALTHY) -> PluginDevice:
    return PluginDevice(f"{d.id}::{n}", health, 0, d, parent=parent, replica=n)


def _migdev(d: DeviceState, health: str = HEALTHY) -> PluginDevice:
    return PluginDevice(d.id, health, 0, d, parent=GPU2)


def _table(*devices: PluginDevice) -> dict[str, PluginDevice]:
    return {d.id: d for d in devices}


GPUS = _table(_whole(GPU0), _whole(GPU1), _whole(GPU2))  # MIG strategy none: the MIG-enabled GPU whole
REPLICAS = _table(_replica(GPU0, 0), _replica(GPU0, 1), _replica(GPU1, 0), _replica(GPU1, 1))
MIGS = _table(_migdev(MIG20), _migdev(MIG21))
MIG_REPLICAS = _table(_replica(MIG20, 0, GPU2), _replica(MIG20, 1, GPU2), _replica(MIG21, 0, GPU2))

CAP = "/dev/nvidia-caps/nvidia-cap"

# scenario: resource, devices, requested IDs, runtime names {uuid, index}, device nodes in order
SCENARIOS: dict[str, tuple[str, dict[str, PluginDevice], list[str], dict[str, list[str]], list[str]]] = {
    "gpus": (GPU, GPUS, [G1, G0], {"uuid": [G1, G0], "index": ["1", "0"]}, ["/dev/nvidia5", "/dev/nvidia4"]),
    "gpu-one": (GPU, GPUS, [G0], {"uuid": [G0], "index": ["0"]}, ["/dev/nvidia4"]),
    "gpu-mig-enabled-whole": (GPU, GPUS, [G2, G0], {"uuid": [G2, G0], "index": ["2", "0"]},
                              ["/dev/nvidia6", "/dev/nvidia4"]),
    "replicas": (GPU, REPLICAS, [f"{G1}::1", f"{G0}::0", f"{G1}::0"], {"uuid": [G1, G0], "index": ["1", "0"]},
                 ["/dev/nvidia5", "/dev/nvidia4"]),
    "replicas-one-gpu": (GPU, REPLICAS, [f"{G0}::1", f"{G0}::0"], {"uuid": [G0], "index": ["0"]},
                         ["/dev/nvidia4"]),
    "mig": (MIG, MIGS, [M21, M20], {"uuid": [M21, M20], "index": ["2:1", "2:0"]},
            ["/dev/nvidia6", f"{CAP}30", f"{CAP}31", f"{CAP}21", f"{CAP}22"]),
    "mig-one": (MIG, MIGS, [M20], {"uuid": [M20], "index": ["2:0"]}, ["/dev/nvidia6", f"{CAP}21", f"{CAP}22"]),
    "mig-replicas": (MIG, MIG_REPLICAS, [f"{M20}::1", f"{M21}::0", f"{M20}::0"],
                     {"uuid": [M20, M21], "index": ["2:0", "2:1"]},
                     ["/dev/nvidia6", f"{CAP}21", f"{CAP}22", f"{CAP}30", f"{CAP}31"]),
}

# DEVICE_LIST_STRATEGY: NVIDIA_VISIBLE_DEVICES ("list", "mounts" or None), annotation, cdi_devices.
# DeviceSpecs (with PASS_DEVICE_SPECS) come exactly where NVIDIA_VISIBLE_DEVICES does.
STRATEGIES: dict[str, tuple[str | None, bool, bool]] = {
    "envvar": ("list", False, False),
    "volume-mounts": ("mounts", False, False),
    "envvar,volume-mounts": ("mounts", False, False),
    "volume-mounts,envvar": ("mounts", False, False),
    "cdi-annotations": (None, True, False),
    "cdi-cri": (None, False, True),
    "cdi-annotations,cdi-cri": (None, True, True),
    "cdi-cri,cdi-annotations": (None, True, True),
    "envvar,cdi-annotations": ("list", True, False),
    "envvar,cdi-cri": ("list", False, True),
    "cdi-cri,volume-mounts": ("mounts", False, True),
    "envvar,volume-mounts,cdi-annotations,cdi-cri": ("mounts", True, True),
}

# PASS_DEVICE_SPECS, NVIDIA_DEV_ROOT (None: default = driver root "/"), host path prefix of the nodes
SPECS: dict[str, tuple[bool, str | None, str]] = {
    "no-specs": (False, None, ""),
    "specs-root": (True, None, ""),
    "specs-dev-root": (True, "/run/nvidia/driver", "/run/nvidia/driver"),
    "specs-dev-root-slash": (True, "/run/nvidia/driver/", "/run/nvidia/driver"),
}


def _settings(environ: dict[str, str], config: Path | None = None) -> Settings:
    if config is not None:
        environ = {**environ, "CONFIG_FILE": str(config)}
    return resolve(environ=environ)


def _expected(
    strategy: str, names: list[str], nodes: list[str], specs: bool, root: str
) -> pb.ContainerAllocateResponse:
    visible, annotation, cri = STRATEGIES[strategy]
    cdi = [f"k8s.device-plugin.nvidia.com/gpu={n}" for n in names]
    out = pb.ContainerAllocateResponse()
    if visible == "list":
        out.envs["NVIDIA_VISIBLE_DEVICES"] = ",".join(names)
    elif visible == "mounts":
        out.envs["NVIDIA_VISIBLE_DEVICES"] = "/var/run/nvidia-container-devices"
        for n in names:
            out.mounts.add(container_path=f"/var/run/nvidia-container-devices/{n}", host_path="/dev/null")
    if visible is not None and specs:
        for node in nodes:
            out.devices.add(container_path=node, host_path=root + node, permissions="rw")
    if annotation:
        out.annotations[f"cdi.k8s.io/nvidia-device-plugin_{ANNOTATION_ID}"] = ",".join(cdi)
    for name in cdi if cri else []:
        out.cdi_devices.add(name=name)
    return out


def _matrix() -> Iterator[object]:
    for scenario in SCENARIOS:
        for strategy in STRATEGIES:
            for id_strategy in ("uuid", "index"):
                for specs in SPECS:
                    yield pytest.param(scenario, strategy, id_strategy, specs,
                                       id=f"{scenario}-{strategy}-{id_strategy}-{specs}")


@pytest.mark.parametrize(("scenario", "strategy", "id_strategy", "specs"), list(_matrix()))
def test_matrix(scenario: str, strategy: str, id_strategy: str, specs: str) -> None:
    resource, devices, ids, names, nodes = SCENARIOS[scenario]
    pass_specs, dev_root, root = SPECS[specs]
    environ = {"DEVICE_LIST_STRATEGY": strategy, "DEVICE_ID_STRATEGY": id_strategy,
               "PASS_DEVICE_SPECS": str(pass_specs).lower()}
    if dev_root is not None:
        environ["NVIDIA_DEV_ROOT"] = dev_root
    calls: list[int] = []

    def annotation_id() -> str:
        calls.append(1)
        return ANNOTATION_ID

    resp = container_response(resource, ids, devices, _settings(environ), annotation_id=annotation_id)
    expected = _expected(strategy, names[id_strategy], nodes, pass_specs, root)
    # field by field first, for a readable failure; then the whole message
    assert dict(resp.envs) == dict(expected.envs)
    assert list(resp.mounts) == list(expected.mounts)
    assert list(resp.devices) == list(expected.devices)
    assert dict(resp.annotations) == dict(expected.annotations)
    assert list(resp.cdi_devices) == list(expected.cdi_devices)
    assert resp == expected
    assert len(calls) == (1 if "cdi-annotations" in strategy else 0)


# Complete answers, written out in full.
FULL: list[tuple[str, str, dict[str, str], list[str], pb.ContainerAllocateResponse]] = [
    ("gpus-envvar-uuid", GPU, {}, [G1, G0],
     pb.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": f"{G1},{G0}"})),
    ("gpus-envvar-index-specs", GPU, {"DEVICE_ID_STRATEGY": "index", "PASS_DEVICE_SPECS": "true"}, [G0, G1],
     pb.ContainerAllocateResponse(
         envs={"NVIDIA_VISIBLE_DEVICES": "0,1"},
         devices=[pb.DeviceSpec(container_path="/dev/nvidia4", host_path="/dev/nvidia4", permissions="rw"),
                  pb.DeviceSpec(container_path="/dev/nvidia5", host_path="/dev/nvidia5", permissions="rw")])),
    ("mig-volume-mounts-cdi-annotations-index-specs-devroot", MIG,
     {"DEVICE_LIST_STRATEGY": "volume-mounts,cdi-annotations", "DEVICE_ID_STRATEGY": "index",
      "PASS_DEVICE_SPECS": "true", "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"}, [M20],
     pb.ContainerAllocateResponse(
         envs={"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
         mounts=[pb.Mount(container_path="/var/run/nvidia-container-devices/2:0", host_path="/dev/null")],
         devices=[
             pb.DeviceSpec(container_path="/dev/nvidia6", host_path="/run/nvidia/driver/dev/nvidia6", permissions="rw"),
             pb.DeviceSpec(container_path="/dev/nvidia-caps/nvidia-cap21",
                           host_path="/run/nvidia/driver/dev/nvidia-caps/nvidia-cap21", permissions="rw"),
             pb.DeviceSpec(container_path="/dev/nvidia-caps/nvidia-cap22",
                           host_path="/run/nvidia/driver/dev/nvidia-caps/nvidia-cap22", permissions="rw"),
         ],
         annotations={f"cdi.k8s.io/nvidia-device-plugin_{ANNOTATION_ID}": "k8s.device-plugin.nvidia.com/gpu=2:0"})),
    ("replicas-cdi-only-uuid-specs-ignored", GPU,
     {"DEVICE_LIST_STRATEGY": "cdi-annotations,cdi-cri", "PASS_DEVICE_SPECS": "true"},
     [f"{G0}::1", f"{G1}::0", f"{G0}::0"],
     pb.ContainerAllocateResponse(
         annotations={f"cdi.k8s.io/nvidia-device-plugin_{ANNOTATION_ID}":
                      f"k8s.device-plugin.nvidia.com/gpu={G0},k8s.device-plugin.nvidia.com/gpu={G1}"},
         cdi_devices=[pb.CDIDevice(name=f"k8s.device-plugin.nvidia.com/gpu={G0}"),
                      pb.CDIDevice(name=f"k8s.device-plugin.nvidia.com/gpu={G1}")])),
    ("custom-annotation-prefix", GPU,
     {"DEVICE_LIST_STRATEGY": "envvar,cdi-annotations", "CDI_ANNOTATION_PREFIX": "cdi.example.com/"}, [G1],
     pb.ContainerAllocateResponse(
         envs={"NVIDIA_VISIBLE_DEVICES": G1},
         annotations={f"cdi.example.com/nvidia-device-plugin_{ANNOTATION_ID}":
                      f"k8s.device-plugin.nvidia.com/gpu={G1}"})),
]
_ALL = {**GPUS, **REPLICAS, **MIGS}


@pytest.mark.parametrize(("resource", "environ", "ids", "expected"), [f[1:] for f in FULL], ids=[f[0] for f in FULL])
def test_full_answers(resource: str, environ: dict[str, str], ids: list[str],
                      expected: pb.ContainerAllocateResponse) -> None:
    resp = container_response(resource, ids, _ALL, _settings(environ), annotation_id=lambda: ANNOTATION_ID)
    assert resp == expected
    assert resp.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_default_annotation_id_is_a_fresh_uuid4_per_answer() -> None:
    settings = _settings({"DEVICE_LIST_STRATEGY": "cdi-annotations"})
    keys = [next(iter(container_response(GPU, [G0], GPUS, settings).annotations)) for _ in range(2)]
    pattern = r"cdi\.k8s\.io/nvidia-device-plugin_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    for key in keys:
        assert re.fullmatch(pattern, key), key
    assert keys[0] != keys[1]


# ---- rejections ----

def _sharing_config(tmp_path: Path, fail: bool) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "version: v1\nsharing:\n  timeSlicing:\n"
        f"    failRequestsGreaterThanOne: {str(fail).lower()}\n"
        "    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n",
        encoding="utf-8",
    )
    return path


BOGUS = [f"GPU-bogus-{n:02d}" for n in range(12)]
SICK = _table(*(PluginDevice(f"GPU-sick-{n:02d}", UNHEALTHY, 0, _gpu(f"GPU-sick-{n:02d}", n, n))
                for n in range(12)))
MIXED_HEALTH = _table(_whole(GPU0), _whole(GPU1, UNHEALTHY), _replica(GPU0, 0), _replica(GPU0, 1, health=UNHEALTHY),
                      _migdev(MIG20), _migdev(MIG21, UNHEALTHY))

# id, devices, requested IDs, fail_requests_greater_than_one (None: no sharing config), message
REJECTIONS: list[tuple[str, dict[str, PluginDevice], list[str], bool | None, str]] = [
    ("empty", GPUS, [], None, "no devices requested"),
    ("empty-shared", REPLICAS, [], True, "no devices requested"),
    ("unknown-one", GPUS, ["GPU-nope"], None, "unknown device: GPU-nope"),
    ("unknown-among-known", GPUS, [G0, "GPU-x", G1, "GPU-y"], None, "unknown device: GPU-x, GPU-y"),
    ("unknown-replica-of-whole-gpu", GPUS, [f"{G0}::0"], None, f"unknown device: {G0}::0"),
    ("unknown-whole-gpu-of-replicas", REPLICAS, [G0], True, f"unknown device: {G0}"),
    ("unknown-mig-parent", MIGS, [G2], None, f"unknown device: {G2}"),
    ("unknown-ten-named", GPUS, BOGUS[:10], None, "unknown device: " + ", ".join(BOGUS[:10])),
    ("unknown-over-ten", GPUS, BOGUS, None, "unknown device: " + ", ".join(BOGUS[:10]) + " (and 2 more)"),
    ("unknown-before-duplicate", GPUS, [G0, G0, "GPU-x"], None, "unknown device: GPU-x"),
    ("duplicate", GPUS, [G0, G0], None, f"duplicate device: {G0}"),
    ("duplicates-named-once-in-order", GPUS, [G1, G0, G1, G0, G1], None, f"duplicate device: {G1}, {G0}"),
    ("duplicate-replica", REPLICAS, [f"{G0}::0", f"{G0}::1", f"{G0}::0"], None, f"duplicate device: {G0}::0"),
    ("duplicate-mig", MIGS, [M20, M21, M20], None, f"duplicate device: {M20}"),
    ("duplicate-before-unhealthy", MIXED_HEALTH, [G1, G1], None, f"duplicate device: {G1}"),
    ("duplicate-before-shared-limit", REPLICAS, [f"{G0}::0", f"{G0}::0"], True, f"duplicate device: {G0}::0"),
    ("unhealthy-gpu", MIXED_HEALTH, [G0, G1], None, f"unhealthy device: {G1}"),
    ("unhealthy-replica", MIXED_HEALTH, [f"{G0}::1"], None, f"unhealthy device: {G0}::1"),
    ("unhealthy-mig", MIXED_HEALTH, [M21, M20], None, f"unhealthy device: {M21}"),
    ("unhealthy-several", MIXED_HEALTH, [M21, G0, G1, f"{G0}::1"], None,
     f"unhealthy device: {M21}, {G1}, {G0}::1"),
    ("unhealthy-over-ten", SICK, list(SICK), None,
     "unhealthy device: " + ", ".join(list(SICK)[:10]) + " (and 2 more)"),
    ("unhealthy-before-shared-limit", MIXED_HEALTH, [f"{G0}::0", f"{G0}::1"], True, f"unhealthy device: {G0}::1"),
    ("shared-two", REPLICAS, [f"{G0}::0", f"{G1}::0"], True, "maximum request size for shared resources is 1; found 2"),
    ("shared-same-gpu", REPLICAS, [f"{G0}::0", f"{G0}::1"], True,
     "maximum request size for shared resources is 1; found 2"),
    ("shared-four", REPLICAS, list(REPLICAS), True, "maximum request size for shared resources is 1; found 4"),
    ("shared-mig-replicas", MIG_REPLICAS, [f"{M20}::0", f"{M21}::0"], True,
     "maximum request size for shared resources is 1; found 2"),
]


@pytest.mark.parametrize(("devices", "ids", "fail", "message"), [r[1:] for r in REJECTIONS],
                         ids=[r[0] for r in REJECTIONS])
@pytest.mark.parametrize("strategy", ["envvar", "volume-mounts", "cdi-annotations,cdi-cri"])
def test_rejections(tmp_path: Path, strategy: str, devices: dict[str, PluginDevice], ids: list[str],
                    fail: bool | None, message: str) -> None:
    config = None if fail is None else _sharing_config(tmp_path, fail)
    settings = _settings({"DEVICE_LIST_STRATEGY": strategy, "PASS_DEVICE_SPECS": "true"}, config)
    assert settings.sharing.fail_requests_greater_than_one is bool(fail)
    resource = "nvidia.com/gpu"
    with pytest.raises(AllocationError) as err:
        container_response(resource, ids, devices, settings, annotation_id=lambda: ANNOTATION_ID)
    assert str(err.value) == PREFIX + message
    assert len(str(err.value)) < 1000


# id, devices, requested IDs, fail_requests_greater_than_one: accepted, and what NVIDIA_VISIBLE_DEVICES says
ACCEPTED: list[tuple[str, dict[str, PluginDevice], list[str], bool | None, str]] = [
    ("shared-one-with-limit", REPLICAS, [f"{G1}::1"], True, G1),
    ("shared-two-without-limit", REPLICAS, [f"{G0}::0", f"{G1}::0"], False, f"{G0},{G1}"),
    ("shared-two-no-sharing-config", REPLICAS, [f"{G0}::1", f"{G0}::0"], None, G0),
    ("whole-gpus-with-limit", GPUS, [G0, G1, G2], True, f"{G0},{G1},{G2}"),
    ("mig-devices-with-limit", MIGS, [M21, M20], True, f"{M21},{M20}"),
    ("healthy-among-unhealthy", MIXED_HEALTH, [G0, f"{G0}::0", M20], None, f"{G0},{M20}"),
]


@pytest.mark.parametrize(("devices", "ids", "fail", "visible"), [a[1:] for a in ACCEPTED],
                         ids=[a[0] for a in ACCEPTED])
def test_accepted(tmp_path: Path, devices: dict[str, PluginDevice], ids: list[str], fail: bool | None,
                  visible: str) -> None:
    config = None if fail is None else _sharing_config(tmp_path, fail)
    settings = _settings({}, config)
    assert settings.sharing.fail_requests_greater_than_one is bool(fail)
    resp = container_response(GPU, ids, devices, settings)
    assert resp == pb.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": visible})


def test_validate_without_settings_skips_only_the_shared_limit() -> None:
    validate(GPU, [f"{G0}::0", f"{G1}::0"], REPLICAS)
    with pytest.raises(AllocationError, match=r"unknown device: GPU-x$"):
        validate(GPU, ["GPU-x"], REPLICAS)
    with pytest.raises(AllocationError, match=r"unhealthy device: " + re.escape(G1) + "$"):
        validate(GPU, [G1], MIXED_HEALTH)


def test_other_resource_named_in_message() -> None:
    with pytest.raises(AllocationError) as err:
        container_response(MIG, [M20, "MIG-x"], MIGS, _settings({}))
    assert str(err.value) == f'invalid allocation request for "{MIG}": invalid request: unknown device: MIG-x'
