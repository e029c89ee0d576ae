"""The committed DRA gRPC code is the kubelet's: plugin registration v1, the DRA plugin service v1 and
v1beta1, and the DRA device health service v1alpha1.

The expectations are copied from k8s.io/kubelet (pkg/apis/pluginregistration/v1, pkg/apis/dra/v1,
pkg/apis/dra/v1beta1, pkg/apis/dra-health/v1alpha1 as released with Kubernetes 1.34): packages, method
paths, messages, field names, numbers and types. That the generated files are a fresh run of the
generator is tests/unit/test_protos.py's.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from google.protobuf.descriptor import FieldDescriptor

from common.pb.dra.v1 import api_pb2 as dra_v1
from common.pb.dra.v1beta1 import api_pb2 as dra_v1beta1
from common.pb.drahealth.v1alpha1 import api_pb2 as health
from common.pb.pluginregistration.v1 import api_pb2 as reg

S, B, I64, ENUM, MSG = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_INT64,
                        FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_MESSAGE)

# module -> (package, {service: [(rpc, request, response, server streaming)]})
SERVICES: dict[str, tuple[ModuleType, str, dict[str, list[tuple[str, str, str, bool]]]]] = {
    "pluginregistration": (reg, "pluginregistration", {"Registration": [
        ("GetInfo", "InfoRequest", "PluginInfo", False),
        ("NotifyRegistrationStatus", "RegistrationStatus", "RegistrationStatusResponse", False)]}),
    "dra-v1": (dra_v1, "k8s.io.kubelet.pkg.apis.dra.v1", {"DRAPlugin": [
        ("NodePrepareResources", "NodePrepareResourcesRequest", "NodePrepareResourcesResponse", False),
        ("NodeUnprepareResources", "NodeUnprepareResourcesRequest", "NodeUnprepareResourcesResponse", False)]}),
    "dra-v1beta1": (dra_v1beta1, "k8s.io.kubelet.pkg.apis.dra.v1beta1", {"DRAPlugin": [
        ("NodePrepareResources", "NodePrepareResourcesRequest", "NodePrepareResourcesResponse", False),
        ("NodeUnprepareResources", "NodeUnprepareResourcesRequest", "NodeUnprepareResourcesResponse", False)]}),
    "dra-health-v1alpha1": (health, "v1alpha1", {"DRAResourceHealth": [
        ("NodeWatchResources", "NodeWatchResourcesRequest", "NodeWatchResourcesResponse", True)]}),
}


@pytest.mark.parametrize("api", sorted(SERVICES))
def test_services_and_method_paths(api: str) -> None:
    module, package, services = SERVICES[api]
    assert module.DESCRIPTOR.package == package
    assert sorted(module.DESCRIPTOR.services_by_name) == sorted(services)
    for service, rpcs in services.items():
        methods = module.DESCRIPTOR.services_by_name[service].methods
        got = [(f"/{package}.{service}/{m.name}", m.input_type.full_name, m.output_type.full_name,
                m.server_streaming, m.client_streaming) for m in methods]
        assert got == [(f"/{package}.{service}/{rpc}", f"{package}.{req}", f"{package}.{resp}", streaming, False)
                       for rpc, req, resp, streaming in rpcs]


# message -> [(field, number, type, repeated, message type or map)]
DRA_MESSAGES: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "NodePrepareResourcesRequest": [("claims", 1, MSG, True, "Claim")],
    "NodePrepareResourcesResponse": [("claims", 1, MSG, True, "map<string,NodePrepareResourceResponse>")],
    "NodePrepareResourceResponse": [("devices", 1, MSG, True, "Device"), ("error", 2, S, False, None)],
    "Device": [("request_names", 1, S, True, None), ("pool_name", 2, S, False, None),
               ("device_name", 3, S, False, None), ("cdi_device_ids", 4, S, True, None)],
    "NodeUnprepareResourcesRequest": [("claims", 1, MSG, True, "Claim")],
    "NodeUnprepareResourcesResponse": [("claims", 1, MSG, True, "map<string,NodeUnprepareResourceResponse>")],
    "NodeUnprepareResourceResponse": [("error", 1, S, False, None)],
    "Claim": [("namespace", 1, S, False, None), ("uid", 2, S, False, None), ("name", 3, S, False, None)],
}
REG_MESSAGES: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "PluginInfo": [("type", 1, S, False, None), ("name", 2, S, False, None), ("endpoint", 3, S, False, None),
                   ("supported_versions", 4, S, True, None)],
    "RegistrationStatus": [("plugin_registered", 1, B, False, None), ("error", 2, S, False, None)],
    "RegistrationStatusResponse": [],
    "InfoRequest": [],
}
HEALTH_MESSAGES: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "NodeWatchResourcesRequest": [],
    "DeviceIdentifier": [("pool_name", 1, S, False, None), ("device_name", 2, S, False, None)],
    "DeviceHealth": [("device", 1, MSG, False, "DeviceIdentifier"), ("health", 2, ENUM, False, "HealthStatus"),
                     ("last_updated_time", 3, I64, False, None)],
    "NodeWatchResourcesResponse": [("devices", 1, MSG, True, "DeviceHealth")],
}


def _kind(field: FieldDescriptor, package: str) -> str | None:
    if field.enum_type is not None:
        return field.enum_type.full_name.removeprefix(f"{package}.")
    mt = field.message_type
    if mt is None:
        return None
    if mt.GetOptions().map_entry:
        key, value = mt.fields_by_name["key"], mt.fields_by_name["value"]
        assert key.type == S
        return f"map<string,{value.message_type.full_name.removeprefix(f'{package}.')}>"
    return mt.full_name.removeprefix(f"{package}.")


@pytest.mark.parametrize(("module", "messages"), [
    (dra_v1, DRA_MESSAGES), (dra_v1beta1, DRA_MESSAGES), (reg, REG_MESSAGES), (health, HEALTH_MESSAGES)],
    ids=["dra-v1", "dra-v1beta1", "pluginregistration", "dra-health-v1alpha1"])
def test_messages(module: ModuleType, messages: dict[str, list[tuple[str, int, int, bool, str | None]]]) -> None:
    package = module.DESCRIPTOR.package
    assert sorted(module.DESCRIPTOR.message_types_by_name) == sorted(messages)
    for name, fields in messages.items():
        desc = module.DESCRIPTOR.message_types_by_name[name]
        got = [(f.name, f.number, f.type, f.is_repeated, _kind(f, package)) for f in desc.fields]
        assert got == fields, name


def test_health_status_values() -> None:
    assert dict(health.HealthStatus.items()) == {"UNKNOWN": 0, "HEALTHY": 1, "UNHEALTHY": 2}


def test_wire_format_of_a_prepare_answer() -> None:
    # The bytes the kubelet reads: a claim's entry (field 1, a map entry of key 1 and value 2) holds a device
    # whose CDI ID sits at field 4.
    resp = dra_v1.NodePrepareResourcesResponse()
    resp.claims["uid-1"].devices.add(pool_name="node-1", device_name="gpu-0",
                                     cdi_device_ids=["k8s.gpu.nvidia.com/claim=uid-1-gpu-0"])
    data = resp.SerializeToString(deterministic=True)
    assert dra_v1beta1.NodePrepareResourcesResponse.FromString(data).claims["uid-1"].devices[0].device_name == "gpu-0"
    device = dra_v1.Device(pool_name="p", device_name="d", cdi_device_ids=["c"]).SerializeToString()
    assert device == b"\x12\x01p\x1a\x01d\x22\x01c"
