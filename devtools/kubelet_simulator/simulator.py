"""A kubelet stand-in for tests, the demo and the benchmarks: the device manager's side of
the device-plugin API, behaving as the kubelet does.

What it reproduces (kubelet pkg/kubelet/cm/devicemanager, v1beta1):
- Register is synchronous: it checks the version and the extended resource name, dials
  `<dir>/<endpoint>` (10 s timeout), calls GetDevicePluginOptions, and only then answers;
  any failure is the Register error. Then it runs ListAndWatch for the client.
- Every ListAndWatch message is the complete list: capacity = all devices listed,
  allocatable = the healthy ones.
- A new Register for a resource replaces the client in the map without closing the old
  one. When any client's stream ends, the kubelet disconnects the client that is *current*
  for the resource and marks all its devices unhealthy. (So a duplicate registration
  followed by the old stream ending takes the resource away: the simulator keeps this.)
- Restart: closes every plugin connection, removes every socket file in the directory
  (other files survive), and listens on kubelet.sock again.
- Allocate and GetPreferredAllocation go to the current client of the resource.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
DIAL_TIMEOUT_S = 10.0
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_extended_resource_name(name: str) -> bool:
    """k8s v1helper.IsExtendedResourceName: domain-prefixed, not kubernetes.io, not requests.*."""
    if "/" not in name or name.startswith("requests."):
        return False
    domain, _, short = name.partition("/")
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        return False
    return (
        len(domain) <= 253
        and bool(_DNS1123_SUBDOMAIN.match(domain))
        and len(short) <= 63
        and bool(_QUALIFIED.match(short))
    )


@dataclass
class PluginClient:
    resource: str
    endpoint: str
    options: pb.DevicePluginOptions
    channel: grpc.aio.Channel
    stub: pb_grpc.DevicePluginStub
    devices: dict[str, str] = field(default_factory=dict)  # ID -> health
    updates: int = 0
    connected: bool = True
    task: asyncio.Task[None] | None = None


@dataclass
class ResourceView:
    """What the node status would show for a resource."""

    endpoint: str = ""
    devices: dict[str, str] = field(default_factory=dict)
    connected: bool = False
    updated_at: float = 0.0


class KubeletSimulator(pb_grpc.RegistrationServicer):
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._server: grpc.aio.Server | None = None
        self.clients: dict[str, PluginClient] = {}
        self.resources: dict[str, ResourceView] = {}
        self.registrations: list[dict[str, Any]] = []
        self.disconnects = 0
        self.restarts = 0
        self.refuse: str | None = None  # when set, Register fails with this message
        self.register_delay = 0.0  # a slow kubelet: seconds spent in Register before answering
        self._changed = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_sockets()
        server = grpc.aio.server()
        pb_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix:{self.dir / KUBELET_SOCKET}")
        await server.start()
        self._server = server
        log.info("kubelet simulator listening on %s", self.dir / KUBELET_SOCKET)

    def _remove_sockets(self) -> None:
        for entry in os.scandir(self.dir):
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                    os.unlink(entry.path)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        for client in list(self.clients.values()):
            await self._close(client)
        self.clients.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / KUBELET_SOCKET).unlink()

    async def drop(self, resource: str) -> None:
        """The kubelet lets go of a plugin without restarting: its stream closes, the devices
        turn Unhealthy, and only a new registration brings them back."""
        client = self.clients.pop(resource, None)
        if client is None:
            return
        self.disconnects += 1
        await self._close(client)
        view = self.resources[resource]
        view.connected = False
        view.devices = {i: "Unhealthy" for i in view.devices}
        view.updated_at = time.time()
        await self._notify()

    async def restart(self) -> None:
        """As a kubelet restart: connections closed, sockets removed, listening again."""
        await self.stop()
        for view in self.resources.values():
            view.connected = False
        self.restarts += 1
        await self.start()
        await self._notify()

    # -- Registration service ---------------------------------------------------------
    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        self.registrations.append(
            {"resource": request.resource_name, "endpoint": request.endpoint, "time": time.time(), "ok": False}
        )
        if self.register_delay:
            await asyncio.sleep(self.register_delay)  # simulated slowness, not a wait for a condition
        if self.refuse is not None:
            await context.abort(grpc.StatusCode.UNKNOWN, self.refuse)
        if request.version != API_VERSION:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Unsupported device plugin API version: {request.version}")
        if not is_extended_resource_name(request.resource_name):
            await context.abort(grpc.StatusCode.UNKNOWN, f"Invalid resource name: {request.resource_name}")
        try:
            client = await self._connect(request)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else "timeout"
            await context.abort(
                grpc.StatusCode.UNKNOWN, f"failed to dial device plugin {request.endpoint}: {detail}"
            )
        self.registrations[-1]["ok"] = True
        self.clients[request.resource_name] = client
        view = self.resources.setdefault(request.resource_name, ResourceView())
        view.endpoint, view.connected = request.endpoint, True
        client.task = asyncio.get_running_loop().create_task(self._run_client(client))
        return pb.Empty()

    async def _connect(self, request: pb.RegisterRequest) -> PluginClient:
        channel = grpc.aio.insecure_channel(f"unix:{self.dir / request.endpoint}")
        try:
            await asyncio.wait_for(channel.channel_ready(), DIAL_TIMEOUT_S)
            stub = pb_grpc.DevicePluginStub(channel)
            options = await stub.GetDevicePluginOptions(pb.Empty(), timeout=DIAL_TIMEOUT_S)
        except BaseException:
            await channel.close()
            raise
        return PluginClient(request.resource_name, request.endpoint, options, channel, stub)

    async def _run_client(self, client: PluginClient) -> None:
        try:
            async for resp in client.stub.ListAndWatch(pb.Empty()):
                client.devices = {d.ID: d.health for d in resp.devices}
                client.updates += 1
                if self.clients.get(client.resource) is client:
                    view = self.resources[client.resource]
                    view.devices = dict(client.devices)
                    view.updated_at = time.time()
                await self._notify()
        except grpc.aio.AioRpcError as e:
            log.info("ListAndWatch for %s ended: %s", client.resource, e.code().name)
        except asyncio.CancelledError:
            return
        # The kubelet then disconnects whichever client is current for the resource.
        current = self.clients.get(client.resource)
        if current is not None:
            self.disconnects += 1
            del self.clients[client.resource]
            view = self.resources[client.resource]
            view.connected = False
            view.devices = {i: "Unhealthy" for i in view.devices}
            view.updated_at = time.time()
            if current is not client:
                await self._close(current)
            await self._notify()
        await client.channel.close()

    async def _close(self, client: PluginClient) -> None:
        if client.task is not None and client.task is not asyncio.current_task():
            client.task.cancel()
        client.connected = False
        await client.channel.close()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- what the kubelet would call --------------------------------------------------
    def _client(self, resource: str) -> PluginClient:
        client = self.clients.get(resource)
        if client is None:
            raise LookupError(f"no registered plugin for {resource}")
        return client

    async def allocate(self, resource: str, ids: list[str]) -> pb.ContainerAllocateResponse:
        resp: pb.AllocateResponse = await self._client(resource).stub.Allocate(
            pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)]), timeout=10
        )
        if not resp.container_responses:
            raise ValueError("Allocate answered no container response")  # the kubelet fails admission too
        return resp.container_responses[0]

    async def preferred(self, resource: str, available: list[str], must: list[str], size: int) -> list[str]:
        client = self._client(resource)
        if not client.options.get_preferred_allocation_available:
            raise LookupError(f"{resource} does not offer GetPreferredAllocation")
        resp = await client.stub.GetPreferredAllocation(
            pb.PreferredAllocationRequest(
                container_requests=[
                    pb.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
                    )
                ]
            ),
            timeout=10,
        )
        return list(resp.container_responses[0].deviceIDs)

    def snapshot(self) -> dict[str, Any]:
        return {
            "resources": {
                name: {
                    "endpoint": v.endpoint,
                    "connected": v.connected,
                    "devices": v.devices,
                    "capacity": len(v.devices),
                    "allocatable": sum(1 for h in v.devices.values() if h == "Healthy"),
                    "updated_at": v.updated_at,
                }
                for name, v in self.resources.items()
            },
            "registrations": self.registrations,
            "disconnects": self.disconnects,
            "restarts": self.restarts,
        }

    async def wait_for(self, predicate: Any, timeout: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except TimeoutError:
                return False
        return True
