"""gRPC glue for one resource's DevicePlugin service: thin, no NVML, no disk."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from common.settings import Settings
from services.plugin_server.allocation import (
    NO_EXTRAS,
    AllocationError,
    Extras,
    check_disjoint,
    container_response,
    preferred_candidates,
)
from services.plugin_server.device_table import ResourceTable
from services.plugin_server.preferred import preferred_gpus, preferred_shared

log = logging.getLogger(__name__)


def plugin_options() -> pb.DevicePluginOptions:
    """The options both GetDevicePluginOptions and the registration announce."""
    return pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


def preferred(available: list[str], must_include: list[str], size: int) -> list[str]:
    """must_include first, then the rest of `available` in order, up to `size`.

    Never an error: an error here fails the pod's admission.
    """
    chosen = list(dict.fromkeys(must_include))
    for dev in available:
        if len(chosen) >= size:
            break
        if dev not in chosen:
            chosen.append(dev)
    return chosen


class DevicePluginServicer(pb_grpc.DevicePluginServicer):
    def __init__(
        self,
        table: ResourceTable,
        settings: Settings,
        on_streams: Callable[[int], None],
        on_allocate: Callable[[list[str]], None],
        extras: Extras = NO_EXTRAS,
    ) -> None:
        self._extras = extras
        self._table = table
        self._settings = settings
        self._on_streams = on_streams
        self._on_allocate = on_allocate
        # When each open ListAndWatch stream began (CLOCK_MONOTONIC, the same clock in every
        # process of the node): the registrar tells the kubelet's stream from others by it.
        self.stream_opened: list[float] = []
        self._closing = False

    def use_settings(self, settings: Settings, extras: Extras) -> None:
        """A config reload: the next Allocate answers with these (one running is not affected)."""
        self._settings, self._extras = settings, extras

    @property
    def streams(self) -> int:
        return len(self.stream_opened)

    async def GetDevicePluginOptions(
        self, request: pb.Empty, context: grpc.aio.ServicerContext
    ) -> pb.DevicePluginOptions:
        return plugin_options()

    async def ListAndWatch(
        self, request: pb.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListAndWatchResponse]:
        opened = time.monotonic()
        self.stream_opened.append(opened)
        self._on_streams(self.streams)
        try:
            seen = -1
            while not self._closing:
                if seen != self._table.version:
                    seen = self._table.version
                    yield self._table.response
                await self._table.wait_changed(seen, lambda: self._closing)
        finally:
            self.stream_opened.remove(opened)
            self._on_streams(self.streams)

    async def close(self) -> None:
        """Ends every ListAndWatch stream with OK, before the server stops.

        Why: a stream still open when the server stops is cancelled under gRPC, which logs an
        ERROR with a CancelledError traceback on every normal stop.
        """
        self._closing = True
        await self._table.wake()

    async def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreferredAllocationResponse:
        resp = pb.PreferredAllocationResponse()
        table = self._table
        devices = table.devices
        try:
            if not request.container_requests:
                raise AllocationError(f'invalid preferred allocation request for "{table.resource}": '
                                      "no container requests")
            checked = [(preferred_candidates(table.resource, req.available_deviceIDs, req.must_include_deviceIDs,
                                             req.allocation_size, devices), list(req.must_include_deviceIDs),
                        req.allocation_size) for req in request.container_requests]
        except AllocationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for candidates, must, size in checked:
            available = list(candidates)
            try:
                if table.shared:
                    ids = preferred_shared(devices, available, must, size,
                                           self._settings.shared_devices_allocation_policy)
                else:
                    ids = preferred_gpus(table.topology, available, must, size)
            except Exception:
                # An error here fails the pod's admission: a plain answer is always better.
                log.exception("preferred allocation failed; answering in request order")
                ids = preferred(available, must, size)
            resp.container_responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return resp

    async def Allocate(self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext) -> pb.AllocateResponse:
        resp = pb.AllocateResponse()
        devices = self._table.devices
        try:
            if not request.container_requests:
                raise AllocationError(f'invalid allocation request for "{self._table.resource}": no container requests')
            check_disjoint(self._table.resource, [req.devices_ids for req in request.container_requests])
            for req in request.container_requests:
                ids = list(req.devices_ids)
                resp.container_responses.append(container_response(self._table.resource, ids, devices, self._settings,
                                                                  extras=self._extras))
        except AllocationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        for req in request.container_requests:
            self._on_allocate(list(req.devices_ids))
        return resp

    async def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()
