"""The dra-plugin's API side: this node's ResourceSlices kept equal to what the health bus says, as
NVIDIA's DRA driver publishes them (services.dra_plugin.pool decides what; services.dra_plugin.slice_api
reads and writes; this module follows the bus, converges and retries).

Desired state, not events: every pass compares what the API holds with the pool the latest health state
makes and writes only the difference (a new pool generation, every slice of it, leftovers deleted). A
fault is in the API one write after the bus says it (XID -> taint), and a recovery one write after that.
While the API refuses or is away the node serves on; the reason is in SliceStatus.error (the program
puts it on its bus) and the next try comes after a pause growing from RETRY_MIN_S to RETRY_MAX_S (a
429's or 503's Retry-After honoured up to common.kubeapi.RETRY_AFTER_MAX_S); when it answers again the latest state is
written once, not the changes it missed.

What the API holds is read once (a list of this node's slices of our driver) and then followed by a
watch, so that slices deleted behind our back are written again at once: the kubelet deletes all of a
node's slices when it starts, and a driver's 30 s after its registration socket goes (a restart of this
program that takes longer). The watch is renewed every WATCH_RENEW_S from a new list (a watch that died
silently costs at most that), and a write refused with 409 (someone else's write came first) or 404
(the slice went) reads the slices again.

Found at start and after any failure: the version of resource.k8s.io the server serves (v1, v1beta2 or
v1beta1) and, when a device is to be tainted, whether the server keeps device taints (a dry-run create:
see slice_api). A server that drops them gets the Unhealthy devices left out of the pool instead: a
taint it does not keep would leave the device schedulable.

The slices stay when the program stops: a restart finds and adopts them (a new generation only if
something changed), and the kubelet removes them if the plugin does not come back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from common.bus.messages import HealthEvent, HealthState, Message
from common.bus.sockets import BusSubscriber
from common.kubeapi import (
    READ_ERRORS,
    ApiStatus,
    Backoff,
    ClientFactory,
    ConfigError,
    Http,
    default_client,
    reason,
    wait_event,
)
from common.settings import DraDevices
from services.dra_plugin.kubelet_devices import held_gpus
from services.dra_plugin.names import DRIVER_NAME
from services.dra_plugin.pool import FULL, Capabilities, Held, MonitorOnlyXids, build_pool, plan
from services.dra_plugin.slice_api import GROUP, SliceApi

log = logging.getLogger(__name__)

RETRY_MIN_S: Final = 0.5
RETRY_MAX_S: Final = 30.0
# 409/404 on a write: another writer (or the kubelet's cleanup) came first. Read again and retry at once,
# this many times in a row; then with the growing pause (a writer fighting over our slices).
CONFLICTS_AT_ONCE: Final = 3
# The server ends each watch at WATCH_SERVER_S; one that outlives WATCH_RENEW_S (a connection that died
# without a word) is given up and the slices read again.
WATCH_SERVER_S: Final = 240
WATCH_RENEW_S: Final = 300.0
CHECK_S: Final = 5.0  # the bus's silence is looked at this often (nothing here depends on it: the last state stays)


@dataclass(frozen=True)
class SliceStatus:
    """What the API side did last, for the program's bus state and `gpu-plugin status`."""

    api_version: str = ""  # resource.k8s.io's version spoken ("v1", "v1beta2", "v1beta1"); "" = not found yet
    taints: str = ""  # what the server keeps of device taints (Capabilities.describe); "" = not asked yet
    published: bool = False  # the API holds the pool of the latest health state
    generation: int = 0  # the pool's generation in the API
    slices: int = 0
    devices: int = 0
    tainted: int = 0  # devices published with a taint
    left_out: tuple[str, ...] = ()  # Unhealthy devices not published (the server keeps no taints)
    writes: int = 0  # creates, updates and deletes the API took, since the start
    deleted_behind: int = 0  # our slices deleted by someone else (the kubelet) and written again
    error: str = ""  # why the last pass failed; "" = it went through


class SlicePublisher:
    """`health_bus`: the socket it follows by itself; None: the program follows it and hands each message to
    `heard` (the dra-plugin's one subscriber, shared with the kubelet plugin)."""

    def __init__(self, node: str, health_bus: Path | None, selection: DraDevices, *,
                 client: ClientFactory = default_client,
                 on_status: Callable[[SliceStatus], None] | None = None, renew_s: float = WATCH_RENEW_S,
                 retry_min_s: float = RETRY_MIN_S, monitor_only: MonitorOnlyXids | None = None,
                 kubelet_ids: Callable[[], frozenset[str]] = frozenset) -> None:
        self.node = node
        self.selection = selection
        self.status = SliceStatus()
        self._bus = health_bus
        self._client_factory = client
        self._on_status = on_status
        self._renew_s = renew_s
        self._retry_min_s = retry_min_s  # tests shorten it
        self._state: HealthState | None = None
        self._xids = monitor_only or MonitorOnlyXids()
        self._kubelet_ids = kubelet_ids  # device IDs the kubelet's device manager gave to pods (kubelet_devices)
        self._wake = asyncio.Event()
        self._http: Http | None = None
        self._version: str | None = None  # resource.k8s.io's, found by discovery
        self._caps: Capabilities | None = None  # None: not asked yet
        self._held: dict[str, Held] | None = None  # what the API holds, by name; None: to be read
        self._watch: asyncio.Task[None] | None = None
        self._generation = 0  # the last generation written: the next change goes past it
        self._deleting: set[str] = set()  # deletes of ours, not to be taken for someone else's
        self.stale_answers = 0  # write answers older than a delete the watch told first: not cached
        # Slices the watch said were deleted during the current pass (name -> the delete as the watch told it):
        # a write's answer can be read after the watch's events of that slice, and is then not what the API holds.
        self._gone: dict[str, Held] = {}

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                if self._bus is not None:
                    tg.create_task(self._follow(self._bus), name="dra-slices-bus")
                tg.create_task(self._converge_loop(), name="dra-slices")
        finally:
            self._stop_watch()
            if self._http is not None:
                await self._http.aclose()

    def wake(self) -> None:
        """Something the pool depends on besides the bus changed (the device manager's allocations)."""
        self._wake.set()

    # -- the health bus -----------------------------------------------------------------
    async def _follow(self, bus: Path) -> None:
        sub = BusSubscriber([bus], topics=[HealthState.TOPIC, HealthEvent.TOPIC])
        try:
            while True:
                msg = await sub.recv_timeout(CHECK_S)  # lets the writer run during a backlog (BusSubscriber.recv)
                if msg is not None:
                    self.heard(msg)
        finally:
            sub.close()

    def heard(self, msg: Message) -> None:
        """A message of the health bus: a new state or a monitor-only XID wakes the converging (a heartbeat,
        another topic, does not). The bus's silence is nothing here: the last state stays."""
        if isinstance(msg, HealthState):
            if msg.is_new(self._state):
                self._state = msg
                self._wake.set()
        elif isinstance(msg, HealthEvent) and self._xids.on_event(msg):
            self._wake.set()

    # -- converging -------------------------------------------------------------------------
    async def _converge_loop(self) -> None:
        backoff, conflicts = Backoff(self._retry_min_s, RETRY_MAX_S), 0
        while True:
            if self._state is None:
                await self._wake.wait()
            self._wake.clear()
            try:
                await self._converge()
            except READ_ERRORS as e:
                if (isinstance(e, ApiStatus) and e.code in (404, 409) and conflicts < CONFLICTS_AT_ONCE
                        and self._version is not None):
                    conflicts += 1
                    log.info("ResourceSlices of %s: %s; reading them again", self.node, reason(e))
                    self._held = None
                    self._wake.set()
                    continue
                self._failed(e)
                # A pause between attempts, growing while the API refuses; not a wait for a condition.
                await asyncio.sleep(backoff.failed(e))
                continue
            backoff.succeeded()
            conflicts = 0
            # Until something changes (the bus, the API's slices) or a monitor-only XID expires.
            expiry = self._xids.next_expiry()
            await wait_event(self._wake, None if expiry is None else expiry - time.time())

    def _failed(self, e: BaseException) -> None:
        text = reason(e)
        if isinstance(e, ApiStatus) and e.code == 404 and self._version is None:
            text = f"the API server serves no {GROUP} (DRA off in this cluster?): {text}"
        if text != self.status.error:
            log.warning("ResourceSlices of %s: %s (the node serves on; retrying)", self.node, text)
        self._report(error=text, published=False)
        if isinstance(e, ConfigError):
            self._http = None  # built again at the next try (the old one may hold a watch being torn down)
        # After a failure everything is found again: the server may have been upgraded or replaced.
        self._version, self._caps, self._held = None, None, None
        self._stop_watch()

    def _client(self) -> Http:
        if self._http is None:
            self._http = self._client_factory()
        return self._http

    async def _converge(self) -> None:
        state = self._state
        assert state is not None
        http = self._client()
        if self._version is None:
            self._version = await SliceApi.discover(http)
            log.info("ResourceSlices of %s: speaking %s/%s", self.node, GROUP, self._version)
            self._report(api_version=self._version)
        api = SliceApi(http, self.node, self._version)
        if self._held is None:
            held, version = await api.read()
            self._held = {h.name: h for h in held}
            # A delete of ours whose watch event was missed (the watch was cut) would otherwise stay listed
            # and make a later delete of that name by someone else look like ours.
            self._deleting.clear()
            self._start_watch(api, version)
        cache = self._held
        foreign = sorted(h.name for h in cache.values() if not h.ours)
        if foreign:
            # Another driver publishes gpu.nvidia.com on this node: writing our pool would fight it over the same
            # pool name, and deleting its slices would take its devices away. Nothing is written until they go
            # (the watch wakes this when they do).
            text = (f"{len(foreign)} ResourceSlices of {DRIVER_NAME} on this node were not written by this plugin "
                    f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}): another {DRIVER_NAME} "
                    "driver (NVIDIA's?) publishes here; not writing until they are gone")
            if text != self.status.error:
                log.error("ResourceSlices of %s: %s", self.node, text)
            self._report(error=text, published=False)
            return
        self._gone.clear()  # only a write of this pass can be answered after its slice's delete
        shown = self._xids.current(time.time())
        kubelet_held = held_gpus(self._kubelet_ids(), state.devices)
        pool = build_pool(state, self.node, self.selection, self._caps or FULL, shown, kubelet_held)
        if pool.wants_taints and self._caps is None:
            self._caps = await api.capabilities()
            log.info("ResourceSlices of %s: device taints %s", self.node, self._caps.describe())
            self._report(taints=self._caps.describe())
            pool = build_pool(state, self.node, self.selection, self._caps, shown, kubelet_held)
        writes, generation = plan(list(cache.values()), pool, self._generation)
        for w in writes:
            if w.verb == "delete":
                self._deleting.add(w.name)
                await api.delete(w.name, w.version)
                cache.pop(w.name, None)
            else:
                assert w.spec is not None
                written = await (api.create(w.spec) if w.verb == "create" else api.update(w.name, w.version, w.spec))
                gone = self._gone.get(written.name)
                # Deleted since it was written (the kubelet's cleanup, between the write and our reading its
                # answer): the watch's delete, already applied, woke the next pass, which writes it again.
                if gone is None or not _newer(gone, written):
                    cache[written.name] = written
                else:
                    self.stale_answers += 1
            self._report(writes=self.status.writes + 1)
        if writes:
            log.info("ResourceSlices of %s: generation %d, %d devices in %d slices (%d tainted%s)", self.node,
                     generation, len(pool.devices), len(pool.chunks), pool.tainted,
                     f"; left out, Unhealthy: {', '.join(pool.left_out)}" if pool.left_out else "")
            if pool.withheld:
                log.info("ResourceSlices of %s: withheld, their GPUs held by device-plugin pods: %s", self.node,
                         ", ".join(pool.withheld))
        if self.status.error:
            log.info("ResourceSlices of %s: the API takes them again", self.node)
        self._generation = generation
        self._report(published=True, error="", generation=generation, slices=len(pool.chunks),
                     devices=len(pool.devices), tainted=pool.tainted, left_out=tuple(pool.left_out))

    # -- following the API's slices ----------------------------------------------------------
    def _start_watch(self, api: SliceApi, version: str) -> None:
        self._stop_watch()
        self._watch = asyncio.create_task(self._follow_slices(api, version), name="dra-slices-watch")

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def _follow_slices(self, api: SliceApi, version: str) -> None:
        """Keeps the cache of what the API holds up to date, and wakes the converging when it changes.
        When the watch ends (renewed, cut, 410 Gone), the slices are read again."""
        cache = self._held
        try:
            async with asyncio.timeout(self._renew_s), aclosing(api.watch(
                    version, min(WATCH_SERVER_S, max(1, int(self._renew_s * 0.8))))) as events:
                async for kind, held, _ in events:
                    if held is None or self._held is not cache or cache is None:
                        continue  # a BOOKMARK; or a cache read again since
                    if kind == "DELETED":
                        self._gone[held.name] = held
                        was = cache.pop(held.name, None)
                        if was is not None and was.ours and held.name not in self._deleting:
                            log.warning("ResourceSlices of %s: %s was deleted by another client (the kubelet "
                                        "cleans a node's slices when it starts): writing it again", self.node,
                                        held.name)
                            self._report(deleted_behind=self.status.deleted_behind + 1, published=False)
                        self._deleting.discard(held.name)
                    elif _newer(held, cache.get(held.name)):
                        cache[held.name] = held
                    self._wake.set()
        except TimeoutError:
            log.debug("watch of %s's ResourceSlices renewed after %.0f s", self.node, self._renew_s)
        except READ_ERRORS as e:
            log.info("watch of %s's ResourceSlices ended: %s; reading them again", self.node, reason(e))
        if self._held is cache:
            self._held = None
            self._wake.set()

    def _report(self, **changes: object) -> None:
        new = dataclasses.replace(self.status, **changes)  # type: ignore[arg-type]
        if new != self.status:
            self.status = new
            if self._on_status is not None:
                self._on_status(new)


def _newer(event: Held, cached: Held | None) -> bool:
    """Whether a watch event is newer than what a write's answer already put in the cache. resourceVersions
    are opaque, but the server's are increasing numbers: compared as such when they are."""
    if cached is None:
        return True
    if event.version.isdigit() and cached.version.isdigit():
        return int(event.version) >= int(cached.version)
    return event.version != cached.version
