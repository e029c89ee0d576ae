"""The registrar's rules as plain code: what to register, adopt, retry or register again, given
what the plugin-server announces, which kubelet.sock is there, and the time. No sockets, no
gRPC, no clock of its own: the registrar (`registrar.py`) does the I/O and tells these rules
what happened; tests drive them in-process with a fake clock.

Duplicate registrations are harmful, not merely wasteful: the kubelet replaces its client
for the resource, and when the replaced client's stream ends it disconnects whichever
client is current, marking every device of the resource unhealthy. So an endpoint is
registered once per (kubelet.sock identity, endpoint socket identity), and a registrar
restarting alone adopts endpoints that a kubelet already streams from (the plugin-server
reports when each open ListAndWatch stream began) instead of registering them again. Only the
kubelet's own stream says that the kubelet holds an endpoint: any client may open one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.bus.messages import EndpointState, Registration

log = logging.getLogger(__name__)

BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
IDLE_S = 5.0  # the longest wait between two passes when nothing wakes the registrar


@dataclass(frozen=True)
class Plan:
    register: list[EndpointState]  # to register now, in this order
    next_s: float  # when to look again unless something changes first


class RegistrationRules:
    def __init__(self, stream_lost_grace: float, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._grace = stream_lost_grace
        self._now = monotonic
        self._wall = wall
        self.endpoints: dict[str, EndpointState] = {}
        self.registered: dict[str, Registration] = {}
        self.errors: dict[str, str] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._stream_lost_at: dict[str, float] = {}
        # Which ListAndWatch stream is the kubelet's (any other client may stream too). Times are
        # CLOCK_MONOTONIC, which the plugin-server's stream_opened share.
        self._started = monotonic()
        self._register_began: dict[str, float] = {}  # our last successful Register was sent then
        self._kubelet_stream: dict[str, float] = {}  # the first stream that began after it
        self._adopted_streams: dict[str, frozenset[float]] = {}  # held at adoption: the kubelet's among them
        self._decided: set[str] = set()  # adopted or registered once: never adopted (again) later

    # -- what happened -------------------------------------------------------------------
    def endpoints_announced(self, endpoints: list[EndpointState]) -> None:
        """The plugin-server's endpoints; notices a kubelet that does not stream from one it holds.

        The kubelet opens ListAndWatch within milliseconds of a registration; an endpoint that
        stays without the kubelet's stream for the grace period was let go (or never taken up).
        """
        self.endpoints = {e.resource: e for e in endpoints}
        now = self._now()
        for resource, ep in self.endpoints.items():
            reg = self.registered.get(resource)
            if reg is None or reg.socket_id != ep.socket_id:
                continue
            if self._kubelet_streaming(resource, ep):
                self._stream_lost_at.pop(resource, None)
            else:
                self._stream_lost_at.setdefault(resource, now)

    def sockets_changed(self) -> None:
        """kubelet.sock or an endpoint appeared, vanished or was replaced: retry at once."""
        self._failures.clear()
        self._retry_at.clear()

    def registered_ok(self, ep: EndpointState, kubelet_id: str, began: float) -> None:
        resource = ep.resource
        self._failures.pop(resource, None)
        self._retry_at.pop(resource, None)
        self.errors.pop(resource, None)
        self.registered[resource] = Registration(resource, ep.endpoint, ep.socket_id, kubelet_id, self._wall(),
                                                 adopted=False)
        self._forget_streams(resource)
        self._register_began[resource] = began
        self._decided.add(resource)

    def failed(self, resource: str, error: str) -> bool:
        """Backs off before the next try; True when the error is new (say it once, not per retry)."""
        failures = self._failures.get(resource, 0)
        self._failures[resource] = failures + 1
        self._retry_at[resource] = self._now() + BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
        new = self.errors.get(resource) != error
        self.errors[resource] = error
        return new

    def retry_in(self, resource: str) -> float | None:
        at = self._retry_at.get(resource)
        return None if at is None else max(at - self._now(), 0.0)

    # -- what to do ----------------------------------------------------------------------
    def plan(self, kubelet_id: str, on_disk: Callable[[str], str]) -> Plan:
        """One pass with kubelet.sock of identity `kubelet_id` there; `on_disk(name)` is the
        identity of an endpoint socket file as it is now. Adoptions happen here (no I/O)."""
        now = self._now()
        register: list[EndpointState] = []
        next_s = IDLE_S
        for resource, ep in self.endpoints.items():
            reg = self.registered.get(resource)
            if reg and (reg.kubelet_id, reg.socket_id) == (kubelet_id, ep.socket_id):
                if not self._stream_lost(resource, now):
                    if resource in self._stream_lost_at:
                        next_s = min(next_s, self._grace)
                    continue
                reg = None  # the kubelet let go of it: register again below
            if not ep.socket_id or on_disk(ep.endpoint) != ep.socket_id:
                continue  # being re-created: the plugin-server will announce the new socket
            if reg is None and resource not in self._decided and (held := self._streams_before_us(ep)) is not None:
                log.info("%s: kubelet already streams from %s; adopting, not re-registering", resource, ep.endpoint)
                self.registered[resource] = Registration(resource, ep.endpoint, ep.socket_id, kubelet_id,
                                                         self._wall(), adopted=True)
                self._forget_streams(resource)
                self._adopted_streams[resource] = held
                self._decided.add(resource)
                continue
            if self._retry_at.get(resource, 0.0) > now:
                next_s = min(next_s, self._retry_at[resource] - now)
                continue
            register.append(ep)
        return Plan(register, max(next_s, 0.0))

    def pending(self, kubelet_id: str) -> list[str]:
        """Resources not registered with this kubelet for their current socket."""
        return sorted(
            r for r, ep in self.endpoints.items()
            if (reg := self.registered.get(r)) is None or (reg.kubelet_id, reg.socket_id) != (kubelet_id, ep.socket_id)
        )

    # -- streams -------------------------------------------------------------------------
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
            # stream to begin after our Register was sent is its own, also when it has ended by the
            # first state we read (dropped at once) and another client's began after it.
            after = [t for t in (*ep.stream_opened, *ep.stream_ended) if t >= began]
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
        if lost is None or now - lost < self._grace:
            return False
        # The kubelet dropped its ListAndWatch stream (its devices are now Unhealthy there) but
        # neither socket changed: only a new registration brings the resource back.
        log.warning("%s: the kubelet stopped streaming from %s; registering again", resource,
                    self.endpoints[resource].endpoint)
        self._stream_lost_at.pop(resource, None)
        self.registered.pop(resource, None)
        self._forget_streams(resource)
        return True
