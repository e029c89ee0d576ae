"""MPS replicas as the plugin-server lists them and answers Allocate for them, against answers
written out here from NVIDIA's plugin (internal/plugin/server.go, mps.go): CUDA_MPS_PIPE_DIRECTORY
and the pipe and /dev/shm mounts come with every device-list strategy, CDI-only included, before
the device mounts; the IDs are "<UUID>::<n>" as for time-slicing."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, HealthState
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import Settings, resolve
from services.plugin_server.allocation import AllocationError, container_response
from services.plugin_server.device_table import MpsReadiness, SharingError, build_resources

G = [f"GPU-{n}{n}{n}{n}{n}{n}{n}{n}-0000-4000-8000-00000000000{n}" for n in range(4)]
AID = "11111111-2222-4333-8444-555555555555"


def _gpu(n: int, health: str = HEALTHY, mig: bool = False) -> DeviceState:
    return DeviceState(id=G[n], kind="gpu", index=str(n), name="NVIDIA H100 80GB HBM3", health=health, reason="",
                       since=0.0, minor=n, numa_node=0, memory_mb=81559, mig_enabled=mig)


def _state(*devices: DeviceState) -> HealthState:
    return HealthState(incarnation="i", seq=1, sent_at=1.0, nvml_ok=True, error="", driver_version="580",
                       devices=list(devices))


def _settings(tmp_path: Path, sharing: str, **env: str) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\nsharing:\n" + sharing)
    return resolve(environ={"CONFIG_FILE": str(path), **env})


MPS = "  mps:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n"
READY = MpsReadiness({"nvidia.com/gpu": True}, {"nvidia.com/gpu"})


def test_mps_replicas_are_listed_as_nvidia_lists_them(tmp_path: Path) -> None:
    s = _settings(tmp_path, MPS)
    out = build_resources(_state(_gpu(0), _gpu(1, UNHEALTHY)), s, READY)
    assert [(d.id, d.health, d.replica, d.sharing) for d in out["nvidia.com/gpu"]] == [
        *((f"{G[0]}::{n}", HEALTHY, n, "mps") for n in range(4)),
        *((f"{G[1]}::{n}", UNHEALTHY, n, "mps") for n in range(4)),  # a GPU fault marks its replicas
    ]


@pytest.mark.parametrize(("sharing", "name"), [
    ("  mps:\n    renameByDefault: true\n    resources:\n    - {name: nvidia.com/gpu, replicas: 2}\n",
     "nvidia.com/gpu.shared"),
    ("  mps:\n    resources:\n    - {name: nvidia.com/gpu, rename: nvidia.com/gpu-mps, replicas: 2}\n",
     "nvidia.com/gpu-mps"),
], ids=["renameByDefault", "rename"])
def test_mps_names(tmp_path: Path, sharing: str, name: str) -> None:
    s = _settings(tmp_path, sharing)
    out = build_resources(_state(_gpu(0)), s, MpsReadiness({name: True}, {name}))
    assert list(out) == [name] and len(out[name]) == 2


def test_mps_replicas_wait_for_their_daemon_and_turn_unhealthy_without_it(tmp_path: Path) -> None:
    s = _settings(tmp_path, MPS)
    state = _state(_gpu(0))
    assert build_resources(state, s, MpsReadiness({}, set())) == {}  # never ready: not offered at all
    assert build_resources(state, s) == {}
    down = build_resources(state, s, MpsReadiness({"nvidia.com/gpu": False}, {"nvidia.com/gpu"}))
    assert {d.health for d in down["nvidia.com/gpu"]} == {UNHEALTHY}


def test_mps_beside_time_slicing_on_other_gpus(tmp_path: Path) -> None:
    s = _settings(tmp_path, "  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [2, 3]}]}\n"
                            "  mps: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/gpu-mps, replicas: 3, "
                            "devices: [0, 1]}]}\n")
    out = build_resources(_state(*(_gpu(n) for n in range(4))), s,
                          MpsReadiness({"nvidia.com/gpu-mps": True}, {"nvidia.com/gpu-mps"}))
    assert [(d.id, d.sharing) for d in out["nvidia.com/gpu-mps"]] == [
        (f"{G[g]}::{n}", "mps") for g in (0, 1) for n in range(3)]
    assert [(d.id, d.sharing) for d in out["nvidia.com/gpu"]] == [
        (f"{G[g]}::{n}", "timeSlicing") for g in (2, 3) for n in range(2)]


def test_a_gpu_selected_by_both_by_uuid_stops_the_server(tmp_path: Path) -> None:
    s = _settings(tmp_path, f"  timeSlicing: {{resources: [{{name: nvidia.com/gpu, replicas: 2, devices: [1]}}]}}\n"
                            f"  mps: {{resources: [{{name: nvidia.com/gpu, rename: nvidia.com/m, replicas: 2, "
                            f"devices: [{G[1]}]}}]}}\n")
    with pytest.raises(SharingError, match=f"GPU 1 \\({G[1]}\\) is selected by both"):
        build_resources(_state(_gpu(0), _gpu(1)), s, READY)


def test_mig_devices_are_refused_with_the_single_strategy(tmp_path: Path) -> None:
    mig = DeviceState(id="MIG-aaaaaaaa-0000-4000-8000-000000000000", kind="mig", index="0:0", name="MIG 1g.10gb",
                      health=HEALTHY, reason="", since=0.0, parent=G[0], profile="1g.10gb", caps=[1, 2])
    s = _settings(tmp_path, MPS, MIG_STRATEGY="single")
    with pytest.raises(SharingError, match="sharing using MPS is not supported for MIG devices"):
        build_resources(_state(_gpu(0, mig=True), mig), s, READY)


PIPE = pb.Mount(container_path="/mps/nvidia.com/gpu/pipe", host_path="/run/nvidia/mps/nvidia.com/gpu/pipe")
SHM = pb.Mount(container_path="/dev/shm", host_path="/run/nvidia/mps/shm")
MPS_ENV = {"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}
ANNOTATION = f"cdi.k8s.io/nvidia-device-plugin_{AID}"


@pytest.mark.parametrize(("strategy", "expected"), [
    ("envvar", pb.ContainerAllocateResponse(envs={**MPS_ENV, "NVIDIA_VISIBLE_DEVICES": G[0]}, mounts=[PIPE, SHM])),
    ("volume-mounts", pb.ContainerAllocateResponse(
        envs={**MPS_ENV, "NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"},
        mounts=[PIPE, SHM, pb.Mount(container_path=f"/var/run/nvidia-container-devices/{G[0]}",
                                    host_path="/dev/null")])),
    ("cdi-annotations", pb.ContainerAllocateResponse(
        envs=MPS_ENV, mounts=[PIPE, SHM], annotations={ANNOTATION: f"k8s.device-plugin.nvidia.com/gpu={G[0]}"})),
    ("cdi-cri", pb.ContainerAllocateResponse(
        envs=MPS_ENV, mounts=[PIPE, SHM], cdi_devices=[pb.CDIDevice(name=f"k8s.device-plugin.nvidia.com/gpu={G[0]}")])),
    ("envvar,cdi-annotations", pb.ContainerAllocateResponse(
        envs={**MPS_ENV, "NVIDIA_VISIBLE_DEVICES": G[0]}, mounts=[PIPE, SHM],
        annotations={ANNOTATION: f"k8s.device-plugin.nvidia.com/gpu={G[0]}"})),
], ids=["envvar", "volume-mounts", "cdi-annotations", "cdi-cri", "envvar+cdi"])
def test_allocate_answers_as_nvidia_for_each_strategy(tmp_path: Path, strategy: str,
                                                      expected: pb.ContainerAllocateResponse) -> None:
    s = _settings(tmp_path, MPS, DEVICE_LIST_STRATEGY=strategy)
    devices = {d.id: d for d in build_resources(_state(_gpu(0), _gpu(1)), s, READY)["nvidia.com/gpu"]}
    assert container_response("nvidia.com/gpu", [f"{G[0]}::2"], devices, s, annotation_id=lambda: AID) == expected


def test_allocate_uses_the_served_name_the_mps_root_and_the_index(tmp_path: Path) -> None:
    s = _settings(tmp_path, "  mps:\n    renameByDefault: true\n    resources:\n    - {name: nvidia.com/gpu, "
                            "replicas: 2}\n", MPS_ROOT="/var/mps", DEVICE_ID_STRATEGY="index")
    name = "nvidia.com/gpu.shared"
    devices = {d.id: d for d in build_resources(_state(_gpu(0), _gpu(1)), s, MpsReadiness({name: True}, {name}))[name]}
    assert container_response(name, [f"{G[1]}::0"], devices, s) == pb.ContainerAllocateResponse(
        envs={"CUDA_MPS_PIPE_DIRECTORY": f"/mps/{name}/pipe", "NVIDIA_VISIBLE_DEVICES": "1"},
        mounts=[pb.Mount(container_path=f"/mps/{name}/pipe", host_path=f"/var/mps/{name}/pipe"),
                pb.Mount(container_path="/dev/shm", host_path="/var/mps/shm")])


def test_more_than_one_mps_replica_is_refused_by_default_and_allowed_when_relaxed(tmp_path: Path) -> None:
    ids = [f"{G[0]}::0", f"{G[1]}::0"]
    s = _settings(tmp_path, MPS)
    devices = {d.id: d for d in build_resources(_state(_gpu(0), _gpu(1)), s, READY)["nvidia.com/gpu"]}
    with pytest.raises(AllocationError, match="maximum request size for shared resources is 1; found 2"):
        container_response("nvidia.com/gpu", ids, devices, s)
    relaxed = _settings(tmp_path, "  mps:\n    failRequestsGreaterThanOne: false\n    resources:\n"
                                  "    - {name: nvidia.com/gpu, replicas: 4}\n")
    answer = container_response("nvidia.com/gpu", ids, devices, relaxed)
    assert answer.envs["NVIDIA_VISIBLE_DEVICES"] == f"{G[0]},{G[1]}" and list(answer.mounts) == [PIPE, SHM]


def test_time_sliced_replicas_get_no_mps_answer_beside_mps(tmp_path: Path) -> None:
    s = _settings(tmp_path, "  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [1]}]}\n"
                            "  mps: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/gpu-mps, replicas: 2, "
                            "devices: [0]}]}\n")
    devices = {d.id: d for d in build_resources(_state(_gpu(0), _gpu(1)), s, READY)["nvidia.com/gpu"]}
    answer = container_response("nvidia.com/gpu", [f"{G[1]}::0"], devices, s)
    assert dict(answer.envs) == {"NVIDIA_VISIBLE_DEVICES": G[1]} and not answer.mounts
