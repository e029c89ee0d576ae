"""The GPUs the kubelet's device manager has handed to pods, read from its checkpoint, so that DRA leaves
them alone.

Why: the split between the two APIs (DRA_DEVICES) is read at start. When it changes under running pods
(a helm upgrade turning DRA on while `nvidia.com/gpu` pods hold GPUs), the device plugin stops offering
those GPUs, but the pods keep them: the device manager never takes a GPU back. Published in our slices,
such a GPU would be allocated to a claim and used twice. Until the kubelet frees it, the dra-plugin
withholds it from its slices and refuses to prepare it.

The record is the device manager's checkpoint, `kubelet_internal_checkpoint` in the device-plugins
directory (k8s.io/kubernetes pkg/kubelet/cm/devicemanager/checkpoint): JSON {"Data": {"PodDeviceEntries":
[{"PodUID", "ContainerName", "ResourceName", "DeviceIDs": {"<NUMA node>": [IDs]}, "AllocResp"}],
"RegisteredDevices": {resource: [IDs]}}, "Checksum": n}; kubelets before 1.20 wrote DeviceIDs as a plain
list, also read. Only resources under `nvidia.com/` are ours to look at (another vendor's IDs are not our
GPUs'). The IDs are what the plugin-server served: a GPU or MIG UUID, an index ("3", "3:1") with
deviceIDStrategy=index, or a replica "<ID>::<n>"; a MIG device holds its GPU (DRA's unit is the GPU).

The kubelet writes the file by rename; it is read again when the directory says it changed, and every
RECHECK_S as a backstop, within MAX_BYTES. A file that cannot be read or parsed is logged once (until it
reads again) and the last IDs read stay: the kubelet's own checkpoint is not ours to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from common.bus.messages import DeviceState
from common.watched_ids import WatchedIds

FILE: Final = "kubelet_internal_checkpoint"
MAX_BYTES: Final = 16 << 20  # a node's pods and their AllocResp (base64) are well under this
RESOURCE_PREFIX: Final = "nvidia.com/"
RECHECK_S: Final = 30.0


class KubeletCheckpointError(Exception):
    """The device manager's checkpoint cannot be read (the text says why)."""


def device_ids(data: bytes) -> frozenset[str]:
    """The IDs of `nvidia.com/` resources the checkpoint records as allocated to pods, replica suffixes
    stripped ("GPU-x::2" -> "GPU-x")."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise KubeletCheckpointError(f"not JSON ({e})") from None
    inner = doc.get("Data") if isinstance(doc, dict) else None
    entries = inner.get("PodDeviceEntries") if isinstance(inner, dict) else None
    if entries is None and isinstance(inner, dict):
        return frozenset()  # no pod holds a device ("null" in Go's JSON)
    if not isinstance(entries, list):
        raise KubeletCheckpointError("Data.PodDeviceEntries: not a list")
    out: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise KubeletCheckpointError(f"Data.PodDeviceEntries[{i}]: not an object")
        resource = entry.get("ResourceName")
        if not isinstance(resource, str) or not resource.startswith(RESOURCE_PREFIX):
            continue
        out.update(i.split("::", 1)[0] for i in _ids(entry.get("DeviceIDs"), i))
    return frozenset(out)


def _ids(value: Any, i: int) -> list[str]:
    # Since 1.20 per NUMA node ({"0": [...], "-1": [...]}); before, a list.
    lists = list(value.values()) if isinstance(value, dict) else [value] if value is not None else []
    if not all(isinstance(ids, list) and all(isinstance(x, str) for x in ids) for ids in lists):
        raise KubeletCheckpointError(f"Data.PodDeviceEntries[{i}].DeviceIDs: not lists of strings")
    return [x for ids in lists for x in ids]


def held_gpus(ids: Iterable[str], devices: Iterable[DeviceState]) -> frozenset[str]:
    """The UUIDs of the GPUs the IDs name (by UUID or index; a MIG device names its GPU)."""
    wanted = set(ids)
    listed = list(devices)
    by_index = {d.index: d for d in listed}
    out: set[str] = set()
    for d in listed:
        if d.id in wanted or d.index in wanted:
            gpu = d if d.kind == "gpu" else next((g for g in listed if g.id == d.parent), None)
            if gpu is not None:
                out.add(gpu.id)
    # An index of a MIG device ("3:1") whose device the bus does not list: its GPU ("3") still is held.
    for x in wanted:
        parent = by_index.get(x.split(":", 1)[0]) if ":" in x else None
        if parent is not None and parent.kind == "gpu":
            out.add(parent.id)
    return frozenset(out)


class KubeletAllocations(WatchedIds):
    """The device manager's allocated IDs (`ids`), kept up to date by `run(changed)`."""

    def __init__(self, device_plugin_dir: Path) -> None:
        super().__init__(device_plugin_dir / FILE, device_ids, MAX_BYTES, "the kubelet's device-manager checkpoint",
                         "the GPUs it was last read to hold stay withheld from DRA", (KubeletCheckpointError,),
                         recheck_s=RECHECK_S)
