"""Which GPUs of this node are served through Kubernetes DRA (DRA_DEVICES): the dra-plugin publishes them
in ResourceSlices and the plugin-server leaves them out of every device-plugin resource, so that no GPU
is ever offered through both APIs (the kubelet would hand it to a DRA claim and to an `nvidia.com/gpu`
container at once).

The unit is the whole GPU: a GPU served through DRA goes with its MIG devices, its time-slicing and MPS
replicas. Both processes read the setting once at start (a config reload that changes it is applied at
the next start of the pod): two processes changing it live at different moments would offer a GPU
twice, or not at all, in between.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from common.settings.values import SettingsError, show

# A GPU as NVIDIA's variables name one: its NVML index, or its UUID (GPU-<8-4-4-4-12 hex>).
_INDEX = re.compile(r"\d{1,4}")
_GPU_UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
MAX_ITEMS = 1024


class _Device(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def index(self) -> str: ...
    @property
    def id(self) -> str: ...


D = TypeVar("D", bound=_Device)


@dataclass(frozen=True)
class DraDevices:
    """All GPUs, none (the default: nothing changes for the device plugin), or these indexes and UUIDs."""

    every: bool = False
    ids: frozenset[str] = frozenset()  # "3" (an index, without leading zeros) or "GPU-..." (lower-case hex)

    @property
    def none(self) -> bool:
        return not self.every and not self.ids

    def serves(self, index: str, uuid: str) -> bool:
        """Whether the GPU of this NVML index and UUID goes to DRA (a MIG device: ask for its GPU)."""
        return self.every or index in self.ids or _canonical_uuid(uuid) in self.ids

    def device_plugin_gpus(self, devices: Iterable[D], held: frozenset[str] = frozenset()) -> list[D]:
        """The GPUs of `devices` the device plugin serves, in their order: not those DRA serves, nor those
        in `held` (GPU UUIDs a DRA claim still holds). The one rule the plugin-server and mps-control
        number a sharing rule's GPUs by."""
        return [d for d in devices if d.kind == "gpu" and not self.serves(d.index, d.id) and d.id not in held]

    def __str__(self) -> str:
        if self.every:
            return "all"
        if not self.ids:
            return "none"
        indexes = sorted((i for i in self.ids if i.isdigit()), key=int)
        return ",".join([*indexes, *sorted(i for i in self.ids if not i.isdigit())])


def _canonical_uuid(uuid: str) -> str:
    # NVML writes UUIDs in lower-case hex; an operator may paste them in either case.
    return "GPU-" + uuid[4:].lower() if uuid[:4].upper() == "GPU-" else uuid


def dra_devices(value: Any, where: str) -> DraDevices:
    """`all`, `none` (or empty), or GPUs: a comma list (flag, environment) or a list (config file) of NVML
    indexes and GPU UUIDs. A MIG device is refused: DRA takes whole GPUs."""
    if isinstance(value, str) and value.strip().lower() in ("all", "none", ""):
        return DraDevices(every=value.strip().lower() == "all")
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    if len(items) > MAX_ITEMS:
        raise SettingsError(f"{where}: {len(items)} items; at most {MAX_ITEMS}")
    ids: set[str] = set()
    for i, item in enumerate(items):
        text = str(item).strip() if isinstance(item, str | int) and not isinstance(item, bool) else None
        if text is None or not text:
            raise SettingsError(f"{where}: item {i}: {show(item)} is not a GPU index or UUID")
        if text.lower() in ("all", "none"):
            raise SettingsError(f"{where}: {text!r} stands alone, not in a list")
        if _INDEX.fullmatch(text):
            ids.add(str(int(text)))
        elif _GPU_UUID.fullmatch(text):
            ids.add(_canonical_uuid(text))
        elif text.upper().startswith("MIG-"):
            raise SettingsError(f"{where}: {show(text)} is a MIG device: DRA serves whole GPUs; name its GPU")
        else:
            raise SettingsError(f"{where}: item {i}: {show(text)} is not a GPU index or UUID "
                                "(allowed: all, none, or indexes and GPU-... UUIDs, comma-separated)")
    return DraDevices(ids=frozenset(ids))
