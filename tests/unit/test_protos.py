"""The committed gRPC code is what the generator makes from protos/, and it is the kubelet's v1beta1 API.

The expectations below are copied from the kubelet's device plugin API (k8s.io/kubelet
pkg/apis/deviceplugin/v1beta1): package, services, rpcs, messages, field names and numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
PB_DIR = Path("common/pb/deviceplugin/v1beta1")
# Every API generated from protos/: the device plugin's, and DRA's (tests/unit/test_dra_protos.py).
PB_DIRS = (PB_DIR, Path("common/pb/pluginregistration/v1"), Path("common/pb/dra/v1"), Path("common/pb/dra/v1beta1"),
           Path("common/pb/drahealth/v1alpha1"))
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-protos.sh"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_generator_makes_exactly_the_committed_files(regenerated: Path) -> None:
    made = sorted(p.relative_to(regenerated).as_posix() for p in regenerated.rglob("*") if p.is_file())
    assert made == sorted((d / name).as_posix() for d in PB_DIRS for name in GENERATED)


FILES = [d / name for d in PB_DIRS for name in GENERATED]


@pytest.mark.parametrize("path", FILES, ids=[p.as_posix() for p in FILES])
def test_committed_file_matches_a_fresh_run(regenerated: Path, path: Path) -> None:
    fresh = (regenerated / path).read_bytes()
    committed = (ROOT / path).read_bytes()
    assert fresh == committed, f"{path} is stale: run `make protos`"


def test_package() -> None:
    assert pb.DESCRIPTOR.package == "v1beta1"
    assert sorted(pb.DESCRIPTOR.services_by_name) == ["DevicePlugin", "Registration"]


# service -> [(rpc, request, response, server streaming)]
SERVICES: dict[str, list[tuple[str, str, str, bool]]] = {
    "Registration": [("Register", "RegisterRequest", "Empty", False)],
    "DevicePlugin": [
        ("GetDevicePluginOptions", "Empty", "DevicePluginOptions", False),
        ("ListAndWatch", "Empty", "ListAndWatchResponse", True),
        ("GetPreferredAllocation", "PreferredAllocationRequest", "PreferredAllocationResponse", False),
        ("Allocate", "AllocateRequest", "AllocateResponse", False),
        ("PreStartContainer", "PreStartContainerRequest", "PreStartContainerResponse", False),
    ],
}


@pytest.mark.parametrize("service", sorted(SERVICES), ids=sorted(SERVICES))
def test_service_methods(service: str) -> None:
    methods = pb.DESCRIPTOR.services_by_name[service].methods
    got = [
        (m.full_name, m.input_type.full_name, m.output_type.full_name, m.server_streaming, m.client_streaming)
        for m in methods
    ]
    assert got == [
        (f"v1beta1.{service}.{rpc}", f"v1beta1.{req}", f"v1beta1.{resp}", streaming, False)
        for rpc, req, resp, streaming in SERVICES[service]
    ]


class _RecordingChannel:
    """Stands in for a grpc channel: records the method paths a stub binds."""

    def __init__(self) -> None:
        self.paths: list[tuple[str, str]] = []

    def _bind(self, kind: str) -> Any:
        def bind(path: str, **kwargs: Any) -> str:
            self.paths.append((kind, path))
            return path

        return bind

    def __getattr__(self, kind: str) -> Any:
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._bind(kind)
        raise AttributeError(kind)


@pytest.mark.parametrize(
    ("stub", "paths"),
    [
        (pb_grpc.RegistrationStub, [("unary_unary", "/v1beta1.Registration/Register")]),
        (
            pb_grpc.DevicePluginStub,
            [
                ("unary_unary", "/v1beta1.DevicePlugin/GetDevicePluginOptions"),
                ("unary_stream", "/v1beta1.DevicePlugin/ListAndWatch"),
                ("unary_unary", "/v1beta1.DevicePlugin/GetPreferredAllocation"),
                ("unary_unary", "/v1beta1.DevicePlugin/Allocate"),
                ("unary_unary", "/v1beta1.DevicePlugin/PreStartContainer"),
            ],
        ),
    ],
    ids=["Registration", "DevicePlugin"],
)
def test_grpc_method_paths(stub: Any, paths: list[tuple[str, str]]) -> None:
    channel = _RecordingChannel()
    stub(channel)
    assert channel.paths == paths


S, B, I64, I32, MSG = (
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_MESSAGE,
)

# message -> [(field, number, type, repeated, message type or "map<string,string>" or None)]
MESSAGES: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "DevicePluginOptions": [
        ("pre_start_required", 1, B, False, None),
        ("get_preferred_allocation_available", 2, B, False, None),
    ],
    "RegisterRequest": [
        ("version", 1, S, False, None),
        ("endpoint", 2, S, False, None),
        ("resource_name", 3, S, False, None),
        ("options", 4, MSG, False, "DevicePluginOptions"),
    ],
    "Empty": [],
    "ListAndWatchResponse": [("devices", 1, MSG, True, "Device")],
    "TopologyInfo": [("nodes", 1, MSG, True, "NUMANode")],
    "NUMANode": [("ID", 1, I64, False, None)],
    "Device": [
        ("ID", 1, S, False, None),
        ("health", 2, S, False, None),
        ("topology", 3, MSG, False, "TopologyInfo"),
    ],
    "PreStartContainerRequest": [("devices_ids", 1, S, True, None)],
    "PreStartContainerResponse": [],
    "PreferredAllocationRequest": [("container_requests", 1, MSG, True, "ContainerPreferredAllocationRequest")],
    "ContainerPreferredAllocationRequest": [
        ("available_deviceIDs", 1, S, True, None),
        ("must_include_deviceIDs", 2, S, True, None),
        ("allocation_size", 3, I32, False, None),
    ],
    "PreferredAllocationResponse": [
        ("container_responses", 1, MSG, True, "ContainerPreferredAllocationResponse")
    ],
    "ContainerPreferredAllocationResponse": [("deviceIDs", 1, S, True, None)],
    "AllocateRequest": [("container_requests", 1, MSG, True, "ContainerAllocateRequest")],
    "ContainerAllocateRequest": [("devices_ids", 1, S, True, None)],
    "AllocateResponse": [("container_responses", 1, MSG, True, "ContainerAllocateResponse")],
    "ContainerAllocateResponse": [
        ("envs", 1, MSG, True, "map<string,string>"),
        ("mounts", 2, MSG, True, "Mount"),
        ("devices", 3, MSG, True, "DeviceSpec"),
        ("annotations", 4, MSG, True, "map<string,string>"),
        ("cdi_devices", 5, MSG, True, "CDIDevice"),
    ],
    "Mount": [
        ("container_path", 1, S, False, None),
        ("host_path", 2, S, False, None),
        ("read_only", 3, B, False, None),
    ],
    "DeviceSpec": [
        ("container_path", 1, S, False, None),
        ("host_path", 2, S, False, None),
        ("permissions", 3, S, False, None),
    ],
    "CDIDevice": [("name", 1, S, False, None)],
}


def test_no_extra_messages() -> None:
    assert sorted(pb.DESCRIPTOR.message_types_by_name) == sorted(MESSAGES)


def _kind(field: FieldDescriptor) -> str | None:
    mt = field.message_type
    if mt is None:
        return None
    if mt.GetOptions().map_entry:
        key, value = mt.fields_by_name["key"], mt.fields_by_name["value"]
        assert (key.type, value.type) == (S, S)
        return "map<string,string>"
    assert mt.full_name.startswith("v1beta1.")
    return mt.full_name.removeprefix("v1beta1.")


@pytest.mark.parametrize("message", sorted(MESSAGES), ids=sorted(MESSAGES))
def test_message_fields(message: str) -> None:
    desc = pb.DESCRIPTOR.message_types_by_name[message]
    got = [(f.name, f.number, f.type, f.is_repeated, _kind(f)) for f in desc.fields]
    assert got == MESSAGES[message]


def test_wire_format_of_an_allocate_response() -> None:
    # Field numbers decide the bytes the kubelet reads: a response built here parses back
    # field for field, and a mount's read_only sits at field 3 of field 2.
    resp = pb.ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": "GPU-x"},
        mounts=[pb.Mount(container_path="/c", host_path="/h", read_only=True)],
    )
    data = resp.SerializeToString(deterministic=True)
    assert pb.ContainerAllocateResponse.FromString(data) == resp
    mount = pb.Mount(container_path="/c", host_path="/h", read_only=True).SerializeToString()
    assert mount == b"\x0a\x02/c\x12\x02/h\x18\x01"
    assert b"\x12" + bytes([len(mount)]) + mount in data
