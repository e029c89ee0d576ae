"""gRPC glue for one resource's DevicePlugin service: thin, no NVML, no disk."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable

import grpc

from common.bus.messages import ENDED_STREAMS_KEPT
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

MAX_STREAMS = 256
"""ListAndWatch streams one resource socket serves at once; the next is refused with
RESOURCE_EXHAUSTED. The kubelet holds one (two for a moment when it replaces an endpoint), so this
leaves room for any watcher beside it, while a flood is kept from costing memory (~25 KB a stream)
and, on every device change, event-loop time (~35 us a stream, measured at 2 000) that the
kubelet's own update and every Allocate would wait behind."""

CLIENT_GONE = "the client went away"
STOPPING = "the plugin-server is stopping"
REPLACED = "its socket was removed or replaced: the endpoint is re-created"
RETIRED = "the resource is no longer offered"
OVER_LIMIT = f"over the limit of {MAX_STREAMS} open streams"


class StreamLog:
    """Says how each ListAndWatch stream ended (or why it was refused), once, without letting a
    flood of them flood the log: in any window of `window_s`, the first `burst` get a line each;
    the others are counted by outcome and told in one line when the window closes (or at
    `flush`). 2 000 streams refused at once are a few lines, not 2 000 warnings.

    An outcome reads "<ended|refused|failed> (<why>)"; its level is the caller's.
    """

    def __init__(self, resource: str, open_now: Callable[[], int], *, burst: int = 5, window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._resource = resource
        self._open_now = open_now
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._window_start = -math.inf
        self._told = 0
        self._held: Counter[tuple[str, int]] = Counter()  # (outcome, level) -> how many
        self._timer: asyncio.TimerHandle | None = None

    def note(self, level: int, outcome: str, lived: float | None = None) -> None:
        now = self._clock()
        if self._timer is None and now - self._window_start >= self._window_s:
            self._window_start, self._told = now, 0
        if self._told < self._burst:
            self._told += 1
            after = "" if lived is None else f" after {lived:.1f} s"
            log.log(level, "ListAndWatch stream on %s %s%s; %d open", self._resource, outcome, after, self._open_now())
            return
        self._held[(outcome, level)] += 1
        if self._timer is None:
            delay = max(self._window_start + self._window_s - now, 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Tells what is held now (the window's end, or the server's)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        level = max(lv for _, lv in self._held)
        counts = ", ".join(f"{n} {outcome}" for (outcome, _), n in self._held.most_common())
        log.log(level, "ListAndWatch streams on %s, beyond the lines above: %s; %d open", self._resource, counts,
                self._open_now())
        self._held.clear()
        self._window_start = -math.inf  # the next end opens a window of its own


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
        calls: Counter[tuple[str, str]] | None = None,
        on_call: Callable[[], None] = lambda: None,
    ) -> None:
        self._extras = extras
        # Calls by (method, gRPC code), the resource's (they outlive this servicer): for metrics, through
        # the bus. On the call's path only an increment and `on_call`, which schedules no more than a timer.
        self._calls: Counter[tuple[str, str]] = Counter() if calls is None else calls
        self._on_call = on_call
        self._table = table
        self._settings = settings
        self._on_streams = on_streams
        self._on_allocate = on_allocate
        # When each open ListAndWatch stream began (CLOCK_MONOTONIC, the same clock in every
        # process of the node): the registrar tells the kubelet's stream from others by it.
        self.stream_opened: list[float] = []
        self.stream_ended: deque[float] = deque(maxlen=ENDED_STREAMS_KEPT)  # when each ended one had begun
        self._closing = False
        self._close_reason = STOPPING
        self.stream_log = StreamLog(table.resource, lambda: self.streams)

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
        if self.streams >= MAX_STREAMS:
            self._count("ListAndWatch", "RESOURCE_EXHAUSTED")
            self.stream_log.note(logging.WARNING, f"refused ({OVER_LIMIT})")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.streams} ListAndWatch streams are open on {self._table.resource}, "
                                f"the most served at once")
        self._count("ListAndWatch", "OK")
        opened = time.monotonic()
        self.stream_opened.append(opened)
        self._on_streams(self.streams)
        # Unless `close` ends it (every stop of ours calls it first), a stream ends by gRPC
        # cancelling this handler: the client cancelled, hung up or passed its deadline.
        level, outcome = logging.INFO, f"ended ({CLIENT_GONE})"
        try:
            seen = -1
            while not self._closing:
                if seen != self._table.version:
                    seen = self._table.version
                    yield self._table.response
                await self._table.wait_changed(seen, lambda: self._closing)
        except Exception as e:
            level, outcome = logging.ERROR, f"failed ({type(e).__name__}: {e})"
            raise
        finally:
            self.stream_opened.remove(opened)
            self.stream_ended.append(opened)
            self._on_streams(self.streams)
            if self._closing and level == logging.INFO:
                outcome = f"ended ({self._close_reason})"
            self.stream_log.note(level, outcome, time.monotonic() - opened)

    async def close(self, reason: str = STOPPING) -> None:
        """Ends every ListAndWatch stream with OK, before the server stops; `reason` is logged for each.

        Why: a stream still open when the server stops is cancelled under gRPC, which logs an
        ERROR with a CancelledError traceback on every normal stop.
        """
        self._closing = True
        self._close_reason = reason
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
            self._count("GetPreferredAllocation", "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception:
            self._count("GetPreferredAllocation", "UNKNOWN")  # gRPC answers an unexpected error so
            raise
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
        self._count("GetPreferredAllocation", "OK")
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
            self._count("Allocate", "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception:
            self._count("Allocate", "UNKNOWN")  # gRPC answers an unexpected error so
            raise
        for req in request.container_requests:
            self._on_allocate(list(req.devices_ids))
        self._count("Allocate", "OK")
        return resp

    def _count(self, method: str, code: str) -> None:
        self._calls[(method, code)] += 1
        self._on_call()

    async def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()
