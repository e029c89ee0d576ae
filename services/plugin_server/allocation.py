"""Allocate: pure functions from requested device IDs to a ContainerAllocateResponse.

Validation comes first and names the offending IDs, with NVIDIA's wording, because an
Allocate error fails the pod for good (UnexpectedAdmissionError) and the operator needs
to know why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import Settings
from services.plugin_server.device_table import PluginDevice

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
VOLUME_MOUNT_ROOT = "/var/run/nvidia-container-devices"
MAX_REPORTED_IDS = 10  # keep error messages readable when a request is absurd


class AllocationError(ValueError):
    """The request cannot be honoured; the message is returned as INVALID_ARGUMENT."""


def _names(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_REPORTED_IDS])
    more = len(ids) - MAX_REPORTED_IDS
    return shown + (f" (and {more} more)" if more > 0 else "")


def validate(resource: str, ids: Sequence[str], devices: Mapping[str, PluginDevice]) -> None:
    prefix = f'invalid allocation request for "{resource}": invalid request'
    if not ids:
        raise AllocationError(f"{prefix}: no devices requested")
    unknown = [i for i in ids if i not in devices]
    if unknown:
        raise AllocationError(f"{prefix}: unknown device: {_names(unknown)}")


def runtime_ids(ids: Sequence[str], devices: Mapping[str, PluginDevice], id_strategy: str) -> list[str]:
    """The names the container runtime gets: UUIDs or indices, replicas collapsed."""
    out: list[str] = []
    for i in ids:
        dev = devices[i].device
        name = dev.id if id_strategy == "uuid" else dev.index
        if name not in out:
            out.append(name)
    return out


def container_response(
    resource: str, ids: Sequence[str], devices: Mapping[str, PluginDevice], settings: Settings
) -> pb.ContainerAllocateResponse:
    validate(resource, ids, devices)
    names = runtime_ids(ids, devices, settings.device_id_strategy)
    resp = pb.ContainerAllocateResponse()
    strategies = settings.device_list_strategy
    if "volume-mounts" in strategies:
        resp.envs[VISIBLE_DEVICES] = VOLUME_MOUNT_ROOT
        for name in names:
            resp.mounts.append(pb.Mount(container_path=f"{VOLUME_MOUNT_ROOT}/{name}", host_path="/dev/null"))
    elif "envvar" in strategies:
        resp.envs[VISIBLE_DEVICES] = ",".join(names)
    return resp
