"""Device table: turns the health-monitor's state into the resources the kubelet sees,
and wakes ListAndWatch streams when, and only when, a resource's list changes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from common.bus.messages import HEALTHY, DeviceState, HealthState
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import Settings

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class PluginDevice:
    """One device ID offered to the kubelet, with what Allocate needs to answer for it."""

    id: str
    health: str
    numa_node: int | None
    device: DeviceState  # the physical (GPU or MIG) device behind the ID


def socket_name(resource: str) -> str:
    """nvidia.com/gpu -> nvidia-gpu.sock, nvidia.com/mig-1g.10gb -> nvidia-mig-1g.10gb.sock."""
    return "nvidia-" + resource.split("/", 1)[1] + ".sock"


def build_resources(state: HealthState, settings: Settings) -> dict[str, list[PluginDevice]]:
    """Resource name -> its devices, per the MIG strategy."""
    out: dict[str, list[PluginDevice]] = {}
    for dev in state.devices:
        if dev.kind != "gpu":
            continue
        # MIG strategy "none": every GPU is offered whole, MIG-enabled or not.
        out.setdefault(GPU_RESOURCE, []).append(PluginDevice(dev.id, dev.health, dev.numa_node, dev))
    return out


class ResourceTable:
    """The current device list of one resource; streams await `wait_changed`."""

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.version = 0
        self.devices: dict[str, PluginDevice] = {}
        self.response = pb.ListAndWatchResponse()
        self._changed = asyncio.Condition()

    @property
    def healthy(self) -> int:
        return sum(1 for d in self.devices.values() if d.health == HEALTHY)

    async def update(self, devices: list[PluginDevice]) -> bool:
        response = pb.ListAndWatchResponse(
            devices=[
                pb.Device(
                    ID=d.id,
                    health=d.health,
                    topology=None if d.numa_node is None else pb.TopologyInfo(nodes=[pb.NUMANode(ID=d.numa_node)]),
                )
                for d in devices
            ]
        )
        self.devices = {d.id: d for d in devices}
        if response == self.response:
            return False
        self.response = response
        async with self._changed:
            self.version += 1
            self._changed.notify_all()
        return True

    async def wait_changed(self, seen: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen)
