"""Node health in the API: the kube-agent's part that writes the GPUUnhealthy condition on its Node's
status and the Events about it, from the health bus (what to write: services.kube_agent.node_health
and node_events; this module only listens, writes and retries).

Nothing on the node waits for it: the health-monitor tells the kubelet (through the plugin-server)
first, and this process hears the same bus on its own. While the API refuses or is away, the node
serves on; the reason is on the kube bus (`node_health_error`, shown by `gpu-plugin status`) and
each writer retries after a pause that grows from RETRY_MIN_S to RETRY_MAX_S (a 429's or 503's
Retry-After is honoured, up to common.kubeapi.RETRY_AFTER_MAX_S).

The condition is desired state: each write sends the latest, so when the API comes back after a
fault and a recovery it gets one write of what is true now, not the transitions it missed.
lastTransitionTime is the time the status changed (as this agent saw it; at start, the Node's own,
when it already says the same), lastHeartbeatTime the time of the write, refreshed every HEARTBEAT_S.
The write is a strategic merge patch of nodes/<name>/status: conditions merge by type, so the
kubelet's and other writers' conditions are untouched, as node-problem-detector does.

Events go to namespace "default", about the Node as the kubelet names it (kind Node, name and uid
the node's name), source gpu-device-plugin on this host; repeats are PATCHes of count and
lastTimestamp, as client-go's recorder does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from common.bus.messages import HealthEvent, HealthState
from common.bus.sockets import BusSubscriber
from common.kubeapi import (
    MAX_ANSWER_BYTES,
    READ_ERRORS,
    ApiStatus,
    Backoff,
    ClientFactory,
    ConfigError,
    Http,
    default_client,
    reason,
    request,
    rfc3339,
    wait_event,
)
from services.kube_agent.board import KubeBoard
from services.kube_agent.node_events import Correlator, Write
from services.kube_agent.node_health import (
    CONDITION_TYPE,
    HEARTBEAT_S,
    SILENT_S,
    Changes,
    Condition,
    Occurrence,
    condition_of,
)

log = logging.getLogger(__name__)

COMPONENT: Final = "gpu-device-plugin"  # the Events' source and reporting component
EVENT_NAMESPACE: Final = "default"  # where the kubelet records a Node's Events (a Node has no namespace)
SMP: Final = "application/strategic-merge-patch+json"
RETRY_MIN_S: Final = 0.5
RETRY_MAX_S: Final = 30.0
# How long the bus may be quiet before the silence itself is looked at (the monitor re-sends its
# state every few seconds: this is reached while it is gone, or between two of its heartbeats).
CHECK_S: Final = 5.0
# An answer we do not use (the Node, after the status patch) is still read, within the bound every
# reader of the API has: a smaller one here would take a write that landed, on a Node larger than
# it, for a failed one, retried forever.
ANSWER_LIMIT: Final = MAX_ANSWER_BYTES


class NodeHealth:
    def __init__(self, node: str, health_bus: Path, board: KubeBoard, *, condition: bool, events: bool,
                 silent_s: float = SILENT_S, client: ClientFactory = default_client) -> None:
        self.node = node
        self.silent_s = silent_s  # the health bus silent this long: the condition says Unknown
        self._bus = health_bus
        self._board = board
        self._condition_on, self._events_on = condition, events
        self._client_factory = client
        # One client per writer ("condition", "events"): a client dropped after a ConfigError is closed
        # at once, which no other writer's request in flight on it could survive.
        self._http: dict[str, Http] = {}
        self._path = f"/api/v1/nodes/{quote(node, safe='')}"
        self._events_path = f"/api/v1/namespaces/{EVENT_NAMESPACE}/events"
        # What the bus said
        self._state: HealthState | None = None
        self._heard = 0.0  # monotonic time of the last health state (heartbeats included)
        self._heard_at = 0.0  # the same as unix time, for the condition's message
        self._changes = Changes()
        self._correlator = Correlator(node)
        # The condition: what should be written, and since when its status is what it is
        self._desired: Condition | None = None
        self._transition = ""  # RFC 3339
        self._status_changed = False  # since the agent started: the Node's older transition time does not hold
        self._condition_wake = asyncio.Event()
        self._event_wake = asyncio.Event()
        # For the bus
        self._condition_error = ""
        self._event_error = ""
        self._events_written = 0

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._follow(), name="node-health-bus")
                if self._condition_on:
                    tg.create_task(self._condition_loop(), name="node-condition")
                if self._events_on:
                    tg.create_task(self._event_loop(), name="node-events")
        finally:
            for http in self._http.values():
                await http.aclose()
            self._http.clear()

    # -- the health bus -----------------------------------------------------------------
    async def _follow(self) -> None:
        sub = BusSubscriber([self._bus], topics=[HealthState.TOPIC, HealthEvent.TOPIC])
        try:
            while True:
                # In a storm the writers get their turns: recv lets the loop run every few messages.
                msg = await sub.recv_timeout(CHECK_S)
                now = time.monotonic()
                if isinstance(msg, HealthState):
                    self._heard, self._heard_at = now, time.time()
                    if msg.is_new(self._state):
                        self._state = msg
                        if self._events_on:
                            self._observe(self._changes.on_state(msg, time.time()), now)
                    self._reconsider(now)  # a heartbeat too: the monitor heard again after a silence
                elif isinstance(msg, HealthEvent):
                    if self._events_on:
                        self._observe(self._changes.on_event(msg, msg.time or time.time()), now)
                else:
                    self._reconsider(now)  # quiet: is the monitor silent for too long?
        finally:
            sub.close()

    def _observe(self, occurrences: list[Occurrence], now: float) -> None:
        for occ in occurrences:
            self._correlator.observe(occ, now)
        if occurrences:
            self._event_wake.set()

    def _reconsider(self, now: float) -> None:
        if self._state is None or not self._condition_on:
            return
        desired = condition_of(self._state, now - self._heard, self._heard_at, self.silent_s)
        if self._desired is None or desired.status != self._desired.status:
            self._status_changed = self._desired is not None
            self._transition = rfc3339(time.time())
        if desired != self._desired:
            self._desired = desired
            self._condition_wake.set()

    # -- the API --------------------------------------------------------------------------
    def _client(self, writer: str) -> Http:
        http = self._http.get(writer)
        if http is None:
            http = self._http[writer] = self._client_factory()
        return http

    async def _drop_client(self, writer: str) -> None:
        """After a ConfigError (no cluster found, credentials refused by their plugin): the writer's
        client is closed, its pooled connections with it, and the next request builds one again."""
        http = self._http.pop(writer, None)
        if http is not None:
            await http.aclose()

    def _publish(self, **condition: str) -> None:
        self._board.update(
            node_health_error="; ".join(e for e in (self._condition_error, self._event_error) if e),
            node_events_written=self._events_written, node_events_pending=self._correlator.pending,
            node_events_dropped=self._correlator.dropped, **condition)

    def _failed(self, what: str, e: BaseException) -> str:
        text = f"{what}: {reason(e)}"
        if text not in (self._condition_error, self._event_error):
            log.warning("%s (the node serves on; retrying)", text)
        return text

    # -- the condition ------------------------------------------------------------------
    async def _condition_loop(self) -> None:
        backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        written: Condition | None = None
        written_at = float("-inf")
        read = False  # the Node's own condition read since start
        while True:
            desired, now = self._desired, time.monotonic()
            if desired is None or (desired == written and now - written_at < HEARTBEAT_S):
                self._condition_wake.clear()
                await wait_event(self._condition_wake, None if desired is None else written_at + HEARTBEAT_S - now)
                continue
            try:
                if not read:
                    await self._adopt_transition(desired)
                    read = True
                await request(self._client("condition"), "PATCH", f"{self._path}/status",
                              f"status patch of node {self.node}", body=self._condition_patch(desired),
                              content_type=SMP, limit=ANSWER_LIMIT)
            except READ_ERRORS as e:
                self._condition_error = self._failed(f"node condition {CONDITION_TYPE}", e)
                self._publish()
                if isinstance(e, ConfigError):
                    await self._drop_client("condition")
                # A pause between attempts, growing while the API refuses; not a wait for a condition.
                await asyncio.sleep(backoff.failed(e))
                continue
            if written is None or written.status != desired.status or self._condition_error:
                log.info("node %s: condition %s=%s (%s)", self.node, CONDITION_TYPE, desired.status, desired.reason)
            written, written_at = desired, now
            backoff.succeeded()
            self._condition_error = ""
            self._publish(node_condition=desired.status, node_condition_reason=desired.reason)

    def _condition_patch(self, c: Condition) -> dict[str, Any]:
        return {"status": {"conditions": [{
            "type": CONDITION_TYPE, "status": c.status, "reason": c.reason, "message": c.message,
            "lastHeartbeatTime": rfc3339(time.time()), "lastTransitionTime": self._transition}]}}

    async def _adopt_transition(self, desired: Condition) -> None:
        """Before the first write: a Node that already has the condition with this status keeps its
        lastTransitionTime (a restart of this agent is not a change of the GPUs' health). A Node
        this agent may not read (RBAC without get) is written with the time seen here."""
        try:
            node = await request(self._client("condition"), "GET", self._path, f"GET of node {self.node}",
                                 limit=ANSWER_LIMIT)
        except ApiStatus as e:
            if e.code != 403:
                raise
            log.warning("node %s: may not read the Node (%s): lastTransitionTime is this agent's", self.node,
                        reason(e))
            return
        status = node.get("status") if isinstance(node, dict) else None
        conditions = status.get("conditions") if isinstance(status, dict) else None
        for c in conditions if isinstance(conditions, list) else ():
            if (isinstance(c, dict) and c.get("type") == CONDITION_TYPE and c.get("status") == desired.status
                    and isinstance(c.get("lastTransitionTime"), str) and not self._status_changed):
                self._transition = c["lastTransitionTime"]

    # -- the Events -----------------------------------------------------------------------
    async def _event_loop(self) -> None:
        backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        while True:
            now = time.monotonic()
            write = self._correlator.take(now)
            if write is None:
                self._publish()
                self._event_wake.clear()
                at = self._correlator.next_at(now)
                await wait_event(self._event_wake, None if at is None else at - now)
                continue
            try:
                await self._send(write)
            except READ_ERRORS as e:
                self._event_error = self._failed(f"Event {write.reason}", e)
                if isinstance(e, ApiStatus) and e.code in (400, 422):
                    # The Event itself is refused: the same body would be again. Given up, counted.
                    log.error("node %s: Event %s refused, dropped: %s", self.node, write.reason, reason(e))
                    self._correlator.refused(write)
                    continue
                self._correlator.failed(write, time.monotonic())
                self._publish()
                if isinstance(e, ConfigError):
                    await self._drop_client("events")
                # A pause between attempts, growing while the API refuses; not a wait for a condition.
                await asyncio.sleep(backoff.failed(e))
                continue
            self._events_written += 1
            self._event_error = ""
            backoff.succeeded()

    async def _send(self, write: Write) -> None:
        """Creates or patches the Event. A create that finds it there (an earlier try landed, its
        answer lost) is a success whose count may be older: patched next. A patch that finds it gone
        (expired) creates it again."""
        if not write.create:
            try:
                await request(self._client("events"), "PATCH", f"{self._events_path}/{quote(write.name, safe='')}",
                              f"patch of Event {write.name}", content_type=SMP, limit=ANSWER_LIMIT,
                              body={"count": write.count, "lastTimestamp": rfc3339(write.last),
                                    "message": write.message})
                self._correlator.written(write)
                return
            except ApiStatus as e:
                if e.code != 404:
                    raise
                write = self._correlator.gone(write)
        try:
            await request(self._client("events"), "POST", self._events_path, f"create of Event {write.name}",
                          body=self._event(write), limit=ANSWER_LIMIT)
        except ApiStatus as e:
            if e.code != 409:
                raise
            self._correlator.written(write)
            self._correlator.again(write)
            return
        self._correlator.written(write)

    def _event(self, w: Write) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": w.name, "namespace": EVENT_NAMESPACE},
            # As the kubelet refers to its Node: no namespace, the name as uid.
            "involvedObject": {"kind": "Node", "name": self.node, "uid": self.node},
            "reason": w.reason, "message": w.message, "type": w.type,
            "source": {"component": COMPONENT, "host": self.node},
            "firstTimestamp": rfc3339(w.first), "lastTimestamp": rfc3339(w.last), "count": w.count,
            "reportingComponent": COMPONENT, "reportingInstance": self.node,
        }

