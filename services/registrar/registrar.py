"""The registrar: registers every endpoint the plugin-server announces with the kubelet,
and again whenever the kubelet restarts (a new kubelet.sock) or an endpoint is re-created.

The rules (once per identity pair, adoption, backoff, which stream is the kubelet's) are in
`rules.py`, plain code; this module does the I/O: it watches the bus and the device-plugin
directory, sends Register over gRPC, and publishes the registrar's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import grpc

from common.bus.messages import EndpointState, KubeletPresence, PluginState, RegistrarEvent, RegistrarState
from common.bus.sockets import BusPublisher, BusSubscriber
from common.fswatch import DirWatcher, file_id, stat_id
from common.lifecycle import run_until_stopped
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from common.settings import Settings
from services.registrar.rules import IDLE_S, RegistrationRules

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
# The kubelet dials the endpoint inside Register with a 10 s timeout; allow for it.
REGISTER_TIMEOUT_S = 12.0
# While a Register is in flight, kubelet.sock's identity is re-read at least this often, in
# case inotify misses a change (it does not while the directory exists; this is a backstop).
KUBELET_RECHECK_S = 1.0


class Registrar:
    def __init__(self, kubelet_socket: Path, publisher: BusPublisher, plugin_bus: Path,
                 stream_lost_grace: float = Settings.stream_lost_grace) -> None:
        self._kubelet_socket = kubelet_socket
        self._dir = kubelet_socket.parent
        self._pub = publisher
        self._plugin_bus = plugin_bus
        self.rules = RegistrationRules(stream_lost_grace)
        self._kubelet_state: KubeletPresence = "absent"
        self._wake = asyncio.Event()
        self._published: RegistrarState | None = None  # as last built, unstamped
        self._kubelet_changed = asyncio.Event()  # kubelet.sock may have been removed or replaced
        # For metrics (through the bus), since the start: Registers accepted and failed, and kubelet.sock
        # identities that followed another (a kubelet restart re-creates it; gone and back counts once).
        self.registers = 0
        self.register_failures = 0
        self.kubelet_restarts = 0
        self._last_kubelet_id = ""

    # -- inputs -----------------------------------------------------------------------
    async def _consume_plugin(self) -> None:
        sub = BusSubscriber([self._plugin_bus], topics=[PluginState.TOPIC])
        try:
            while True:
                msg = await sub.recv_latest()
                if isinstance(msg, PluginState):
                    # Heartbeats too: an endpoint the kubelet was registered with but does not
                    # stream from shows only by looking again after the registration.
                    self.rules.endpoints_announced(msg.endpoints)
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
                    e.endpoint in names for e in self.rules.endpoints.values()
                ):
                    self.rules.sockets_changed()
                    self._wake.set()
        finally:
            watcher.close()

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
        if kubelet_id and kubelet_id != self._last_kubelet_id:
            if self._last_kubelet_id:
                self.kubelet_restarts += 1
            self._last_kubelet_id = kubelet_id
        if not kubelet_id:
            self._set_kubelet("absent")
            self._publish_state(kubelet_id)
            return IDLE_S
        if self._kubelet_state == "absent":
            self._set_kubelet("present")
        plan = self.rules.plan(kubelet_id, lambda name: file_id(self._dir / name))
        next_s = plan.next_s
        for ep in plan.register:
            if not await self._register(ep, kubelet_id):
                return 0.0  # kubelet.sock was replaced meanwhile: start over with the new kubelet
            retry = self.rules.retry_in(ep.resource)
            if retry is not None:
                next_s = min(next_s, retry)
        self._publish_state(kubelet_id)
        return next_s

    async def _register(self, ep: EndpointState, kubelet_id: str) -> bool:
        """One Register, to the kubelet.sock whose identity is `kubelet_id` and to no other.

        False when that kubelet.sock was removed or replaced before the answer came: the
        Register is then abandoned at once, not left to wait out its timeout (a kubelet that
        has gone may never answer), and it is no failure of the new kubelet's.
        """
        resource = ep.resource
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
        self.registers += 1
        self.rules.registered_ok(ep, kubelet_id, began)
        log.info("registered %s (endpoint %s) with the kubelet", resource, ep.endpoint)
        self._pub.publish(RegistrarEvent(time.time(), "registered", resource, ep.endpoint))
        return True

    async def _until_kubelet_replaced(self, kubelet_id: str) -> None:
        while file_id(self._kubelet_socket) == kubelet_id:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kubelet_changed.wait(), KUBELET_RECHECK_S)
            self._kubelet_changed.clear()

    async def _failed(self, resource: str, error: str) -> None:
        self._set_kubelet("refusing")
        self.register_failures += 1
        if self.rules.failed(resource, error):  # said once per state change, not per retry
            log.warning("registering %s failed (%s); retrying with backoff", resource, error)
            self._pub.publish(RegistrarEvent(time.time(), "failed", resource, error))

    def _publish_state(self, kubelet_id: str) -> None:
        """Publishes the state when it changed; the publisher's heartbeat repeats it meanwhile."""
        # Compared unstamped: the publisher stamps incarnation, seq and time on what it sends.
        state = RegistrarState(
            kubelet=self._kubelet_state,
            kubelet_id=kubelet_id,
            registrations=list(self.rules.registered.values()),
            pending=self.rules.pending(kubelet_id),
            last_error="; ".join(f"{r}: {e}" for r, e in sorted(self.rules.errors.items())),
            registers=self.registers,
            register_failures=self.register_failures,
            kubelet_restarts=self.kubelet_restarts,
        )
        if state == self._published:
            return
        self._published = state
        self._pub.publish_state(state)

    async def run(self, stop: asyncio.Event) -> None:
        await run_until_stopped(
            stop,
            asyncio.create_task(self._pub.run(), name="bus-heartbeat"),
            asyncio.create_task(self._consume_plugin(), name="plugin-consumer"),
            asyncio.create_task(self._watch_kubelet(), name="kubelet-watcher"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
        )
