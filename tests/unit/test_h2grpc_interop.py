"""common/h2grpc.py against a gRPC client that shares nothing with it or with grpcio: @grpc/grpc-js, on
Node's own HTTP/2 (tests/interop/device_plugin_client.js; `make test` installs its packages, pinned in
tests/interop/package-lock.json). grpcio and the C++ client of bench/cpp are both grpc core; the kubelet
is grpc-go, a third implementation: a second one here catches what one implementation's leniency hides."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from tests.conftest import REPO
from tests.unit.test_h2grpc import Served, big_list, waited

INTEROP = REPO / "tests" / "interop"
CLIENT = INTEROP / "device_plugin_client.js"
PROTO = REPO / "protos" / "deviceplugin" / "v1beta1" / "api.proto"


@pytest.fixture
def served(short_tmp: Path) -> Iterator[Served]:
    s = Served(short_tmp)
    try:
        yield s
    finally:
        s.close()


def grpc_js(served: Served, *steps: str) -> dict[str, dict[str, Any]]:
    """The client's steps run against `served`: each step's line by its name."""
    node = shutil.which("node")
    assert node is not None, "Node.js is needed (the project's machines have it)"
    assert (INTEROP / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "tests/interop's packages are missing: `make test` installs them (npm ci --prefix tests/interop)"
    out = subprocess.run([node, str(CLIENT), str(served.path), str(PROTO), *steps], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["step"] for line in lines] == list(steps), out.stdout
    return {line["step"]: line for line in lines}


def test_grpc_js_calls_answers_errors_deadlines_and_streams(served: Served) -> None:
    details = "no such device: GPU-bad (gérée à 100% ✓)"

    async def allocate(request: pb.AllocateRequest, context: grpc.aio.ServicerContext) -> pb.AllocateResponse:
        ids = list(request.container_requests[0].devices_ids)
        if "GPU-bad" in ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)
        if "GPU-slow" in ids:
            await asyncio.Event().wait()  # until the client's deadline cancels it
        return pb.AllocateResponse(container_responses=[
            pb.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(ids)})])

    served.servicer.allocate = allocate
    unhealthy = pb.ListAndWatchResponse(devices=[pb.Device(ID="GPU-0", health="Unhealthy")])
    served.servicer.messages = [big_list(), unhealthy]
    got = grpc_js(served, "options", "allocate:GPU-0,GPU-1", "allocate:GPU-bad", "deadline:200:GPU-slow", "watch:2")

    assert got["options"]["code"] == 0 and got["options"]["result"]["pre_start_required"] is True
    answer = got["allocate:GPU-0,GPU-1"]
    assert answer["code"] == 0
    assert answer["result"]["container_responses"][0]["envs"] == {"NVIDIA_VISIBLE_DEVICES": "GPU-0,GPU-1"}
    assert ("x-caller", "node") in served.servicer.metadata
    assert ("trace-bin", b"\x00\xff\x10") in served.servicer.metadata  # base64 on the wire both ways
    refused = got["allocate:GPU-bad"]
    assert (refused["code"], refused["details"]) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], details)
    assert got["deadline:200:GPU-slow"]["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    waited(served.servicer.cancelled, "the handler cancelled at the client's deadline")
    watched = got["watch:2"]
    assert watched["code"] == 0, watched  # two messages, the first past HTTP/2's initial window, then cancelled
    assert watched["result"] == [{"devices": len(big_list().devices), "first": big_list().devices[0].ID},
                                 {"devices": 1, "first": "GPU-0"}]
    waited(served.servicer.closed, "the stream's generator closed when the client cancelled")
