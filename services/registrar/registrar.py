"""The registrar: registers every endpoint the plugin-server announces with the kubelet,
and again whenever the kubelet restarts (a new kubelet.sock) or an endpoint is re-created.

Duplicate registrations are harmful, not merely wasteful: the kubelet replaces its client
for the resource, and when the replaced client's stream ends it disconnects whichever
client is current, marking every device of the resource unhealthy. So an endpoint is
registered once per (kubelet.sock identity, endpoint socket identity), and a registrar
restarting alone adopts endpoints that a kubelet already streams from (the plugin-server
reports when each open ListAndWatch stream began) instead of registering them again. Only the
kubelet's own stream says that the kubelet holds an endpoint: any client may open one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import grpc

from common.bus.messages import (
    EndpointState,
    KubeletPresence,
    PluginState,
    RegistrarEvent,
    RegistrarState,
    Registration,
)
from common.bus.sockets import BusPublisher, BusSubscriber
from common.fswatch import DirWatcher, file_id, stat_id
from common.lifecycle import run_until_stopped
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from common.settings import Settings

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
# The kubelet dials the endpoint inside Register with a 10 s timeout; allow for it.
REGISTER_TIMEOUT_S = 12.0
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# While a Register is in flight, kubelet.sock's identity is re-read at least this often, in
# case inotify misses a change (it does not while the directory exists; this is a backstop).
KUBELET_RECHECK_S = 1.0


class Registrar:
    def __init__(self, kubelet_socket: Path, publisher: BusPublisher, plugin_bus: Path,
                 stream_lost_grace: float = Settings.stream_lost_grace) -> None:
        # A stream that stays closed this long (no socket changed) means the kubelet let go of us.
        self._stream_lost_grace = stream_lost_grace
        self._kubelet_socket = kubelet_socket
        self._dir = kubelet_socket.parent
        self._pub = publisher
        self._plugin_bus = plugin_bus
        self._endpoints: dict[str, EndpointState] = {}
        self.registered: dict[str, Registration] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._errors: dict[str, str] = {}
        self._kubelet_state: KubeletPresence = "absent"
        self._wake = asyncio.Event()
        self._published: tuple[object, ...] = ()
        self._stream_lost_at: dict[str, float] = {}
        self._kubelet_changed = asyncio.Event()  # kubelet.sock may have been removed or replaced
        # Which ListAndWatch stream is the kubelet's (any other client may stream too). Times are
        # CLOCK_MONOTONIC, which the plugin-server's stream_opened share.
        self._started = time.monotonic()
        self._register_began: dict[str, float] = {}  # our last successful Register was sent then
        self._kubelet_stream: dict[str, float] = {}  # the first stream that began after it
        self._adopted_streams: dict[str, frozenset[float]] = {}  # held at adoption: the kubelet's among them
        self._decided: set[str] = set()  # adopted or registered once: never adopted (again) later

    # -- inputs -----------------------------------------------------------------------
    async def _consume_plugin(self) -> None:
        sub = BusSubscriber([self._plugin_bus], topics=[PluginState.TOPIC])
        try:
            while True:
                msg = await sub.recv_latest()
                if isinstance(msg, PluginState):
                    self._endpoints = {e.resource: e for e in msg.endpoints}
                    self._track_streams()
                    self._wake.set()
        finally:
            sub.close()

    async def _watch_kubelet(self) -> None:
        watcher = DirWatcher(self._dir)
        watcher.start()
        try:
            while True:
                names = await watcher.next(timeout=5.0)
                if self._kubelet_socket.name in names or "" in names:
                    self._kubelet_changed.set()
                if self._kubelet_socket.name in names or "" in names or any(
                    e.endpoint in names for e in self._endpoints.values()
                ):
                    self._failures.clear()
                    self._retry_at.clear()
                    self._wake.set()
        finally:
            watcher.close()

    def _track_streams(self) -> None:
        """Notices a kubelet that does not stream from an endpoint registered with it.

        The kubelet opens ListAndWatch within milliseconds of a registration; an endpoint that
        stays without a stream for the stream-lost grace was let go (or never taken up).
        """
        now = time.monotonic()
        for resource, ep in self._endpoints.items():
            reg = self.registered.get(resource)
            if reg is None or reg.socket_id != ep.socket_id:
                continue
            if self._kubelet_streaming(resource, ep):
                self._stream_lost_at.pop(resource, None)
            else:
                self._stream_lost_at.setdefault(resource, now)

    def _kubelet_streaming(self, resource: str, ep: EndpointState) -> bool:
        """Whether the kubelet's own stream is open: another client's stream must not hide a drop."""
        if not ep.stream_opened:
            return ep.streams > 0  # none open, or a plugin-server that does not say when they began
        open_now = set(ep.stream_opened)
        adopted = self._adopted_streams.get(resource)
        if adopted is not None:
            # We cannot know which of them is the kubelet's: once any has ended, register again
            # (a needless registration costs less than a resource the kubelet dropped for good).
            return adopted <= open_now
        began = self._register_began.get(resource)
        if began is None:
            return False
        kubelet = self._kubelet_stream.get(resource)
        if kubelet is None:
            # The kubelet dials the endpoint inside Register and streams right after: the first
            # stream to begin after our Register was sent is its own.
            after = [t for t in ep.stream_opened if t >= began]
            if not after:
                return False
            kubelet = self._kubelet_stream[resource] = min(after)
        return kubelet in open_now

    def _forget_streams(self, resource: str) -> None:
        self._register_began.pop(resource, None)
        self._kubelet_stream.pop(resource, None)
        self._adopted_streams.pop(resource, None)

    def _streams_before_us(self, ep: EndpointState) -> frozenset[float] | None:
        """The streams a kubelet may hold from an earlier registrar's registration; None: none.

        Only a stream that began before this registrar did can be the kubelet's without our
        Register; one that began since is another client's.
        """
        if not ep.stream_opened:
            return frozenset() if ep.streams > 0 else None  # a plugin-server that does not say when
        held = frozenset(t for t in ep.stream_opened if t < self._started)
        return held or None

    def _stream_lost(self, resource: str, now: float) -> bool:
        lost = self._stream_lost_at.get(resource)
        if lost is None or now - lost < self._stream_lost_grace:
            return False
        # The kubelet dropped its ListAndWatch stream (its devices are now Unhealthy there) but
        # neither socket changed: only a new registration brings the resource back.
        log.warning("%s: the kubelet stopped streaming from %s; registering again", resource,
                    self._endpoints[resource].endpoint)
        self._stream_lost_at.pop(resource, None)
        self.registered.pop(resource, None)
        self._forget_streams(resource)
        return True

    # -- reconcile --------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while True:
            delay = await self._reconcile()
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
                # arrives as the wake-up does (SIGTERM as kubelet.sock vanishes), and the loop ran on.
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    def _set_kubelet(self, state: KubeletPresence) -> None:
        if state != self._kubelet_state:
            log.info("kubelet: %s -> %s", self._kubelet_state, state)
            self._kubelet_state = state

    async def _reconcile(self) -> float:
        """One pass; returns how long to sleep before the next unless woken."""
        kubelet_id = file_id(self._kubelet_socket)
        if not kubelet_id:
            self._set_kubelet("absent")
            await self._publish_state(kubelet_id)
            return 5.0
        if self._kubelet_state == "absent":
            self._set_kubelet("present")
        next_s = 5.0
        now = time.monotonic()
        for resource, ep in self._endpoints.items():
            reg = self.registered.get(resource)
            if reg and (reg.kubelet_id, reg.socket_id) == (kubelet_id, ep.socket_id):
                if not self._stream_lost(resource, now):
                    if resource in self._stream_lost_at:
                        next_s = min(next_s, self._stream_lost_grace)
                    continue
                reg = None  # the kubelet let go of it: register again below
            if not ep.socket_id or file_id(self._dir / ep.endpoint) != ep.socket_id:
                continue  # being re-created: the plugin-server will announce the new socket
            if reg is None and resource not in self._decided and (held := self._streams_before_us(ep)) is not None:
                log.info("%s: kubelet already streams from %s; adopting, not re-registering", resource, ep.endpoint)
                self.registered[resource] = Registration(resource, ep.endpoint, ep.socket_id, kubelet_id,
                                                         time.time(), adopted=True)
                self._forget_streams(resource)
                self._adopted_streams[resource] = held
                self._decided.add(resource)
                continue
            if self._retry_at.get(resource, 0.0) > now:
                next_s = min(next_s, self._retry_at[resource] - now)
                continue
            if not await self._register(resource, ep, kubelet_id):
                return 0.0  # kubelet.sock was replaced meanwhile: start over with the new kubelet
            if resource in self._retry_at:
                next_s = min(next_s, self._retry_at[resource] - time.monotonic())
        await self._publish_state(kubelet_id)
        return max(next_s, 0.0)

    async def _register(self, resource: str, ep: EndpointState, kubelet_id: str) -> bool:
        """One Register, to the kubelet.sock whose identity is `kubelet_id` and to no other.

        False when that kubelet.sock was removed or replaced before the answer came: the
        Register is then abandoned at once, not left to wait out its timeout (a kubelet that
        has gone may never answer), and it is no failure of the new kubelet's.
        """
        request = pb.RegisterRequest(
            version=API_VERSION,
            endpoint=ep.endpoint,
            resource_name=resource,
            options=pb.DevicePluginOptions(
                pre_start_required=ep.pre_start_required,
                get_preferred_allocation_available=ep.get_preferred_allocation_available,
            ),
        )
        try:
            # Dialled through a descriptor of the file we identified: a kubelet.sock re-created
            # after the identity was read cannot receive a registration recorded as the old one's.
            fd = os.open(self._kubelet_socket, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            if file_id(self._kubelet_socket) != kubelet_id:
                return False  # gone since we looked: the next pass sees what is there now
            await self._failed(resource, f"cannot open {self._kubelet_socket}: {e.strerror}")
            return True
        try:
            if stat_id(os.fstat(fd)) != kubelet_id:
                return False
            self._kubelet_changed.clear()
            began = time.monotonic()
            # A private subchannel pool: the same target string (a reused descriptor number)
            # must never reuse a connection made to an earlier kubelet.
            async with grpc.aio.insecure_channel(f"unix:/proc/self/fd/{fd}",
                                                 options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                call = pb_grpc.RegistrationStub(channel).Register(request, timeout=REGISTER_TIMEOUT_S)
                answer = asyncio.ensure_future(call)
                replaced = asyncio.ensure_future(self._until_kubelet_replaced(kubelet_id))
                try:
                    await asyncio.wait((answer, replaced), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    replaced.cancel()
                    if not answer.done():
                        call.cancel()
                        await asyncio.wait((answer,))
                if answer.cancelled():  # only by us, and only because kubelet.sock was replaced
                    log.info("kubelet.sock was replaced while registering %s: registering with the new kubelet",
                             resource)
                    return False
                error = answer.exception()
                if error is not None and not isinstance(error, grpc.aio.AioRpcError):
                    raise error
        finally:
            os.close(fd)
        if error is not None:
            if file_id(self._kubelet_socket) != kubelet_id:
                return False  # the kubelet that failed us has gone: no backoff against its successor
            # An operator knows kubelet.sock, not the descriptor we dialled it through.
            details = (error.details() or "").replace(f"/proc/self/fd/{fd}", str(self._kubelet_socket))
            await self._failed(resource, f"{error.code().name}: {details}")
            return True
        self._set_kubelet("present")
        self._failures.pop(resource, None)
        self._retry_at.pop(resource, None)
        self._errors.pop(resource, None)
        self.registered[resource] = Registration(resource, ep.endpoint, ep.socket_id, kubelet_id, time.time(),
                                                 adopted=False)
        self._forget_streams(resource)
        self._register_began[resource] = began
        self._decided.add(resource)
        log.info("registered %s (endpoint %s) with the kubelet", resource, ep.endpoint)
        await self._pub.publish(RegistrarEvent(time.time(), "registered", resource, ep.endpoint))
        return True

    async def _until_kubelet_replaced(self, kubelet_id: str) -> None:
        while file_id(self._kubelet_socket) == kubelet_id:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kubelet_changed.wait(), KUBELET_RECHECK_S)
            self._kubelet_changed.clear()

    async def _failed(self, resource: str, error: str) -> None:
        failures = self._failures.get(resource, 0)
        delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
        self._failures[resource] = failures + 1
        self._retry_at[resource] = time.monotonic() + delay
        self._set_kubelet("refusing")
        if self._errors.get(resource) != error:  # log once per state change, not per retry
            self._errors[resource] = error
            log.warning("registering %s failed (%s); retrying with backoff", resource, error)
            await self._pub.publish(RegistrarEvent(time.time(), "failed", resource, error))

    async def _publish_state(self, kubelet_id: str) -> None:
        """Publishes the state when it changed; the publisher's heartbeat repeats it meanwhile."""
        pending = sorted(
            r for r, ep in self._endpoints.items()
            if (reg := self.registered.get(r)) is None or (reg.kubelet_id, reg.socket_id) != (kubelet_id, ep.socket_id)
        )
        content = (self._kubelet_state, kubelet_id, list(self.registered.values()), pending,
                   "; ".join(f"{r}: {e}" for r, e in sorted(self._errors.items())))
        if content == self._published:
            return
        self._published = content
        kubelet, kid, registrations, pending, last_error = content
        await self._pub.publish_state(
            RegistrarState(
                kubelet=kubelet,
                kubelet_id=kid,
                registrations=registrations,
                pending=pending,
                last_error=last_error,
            )
        )

    async def run(self, stop: asyncio.Event) -> None:
        await run_until_stopped(
            stop,
            asyncio.create_task(self._pub.run(), name="bus-heartbeat"),
            asyncio.create_task(self._consume_plugin(), name="plugin-consumer"),
            asyncio.create_task(self._watch_kubelet(), name="kubelet-watcher"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
        )
