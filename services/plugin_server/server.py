"""The plugin server: health bus in, one DevicePlugin gRPC server per resource out.

It holds no state of its own worth keeping: everything it serves is rebuilt from the
next health state (replayed to it at once on subscribe), so a restart costs one round
trip. It re-creates an endpoint whose socket file vanished (a kubelet restart removes
every socket in the directory) and announces each endpoint, with the identity of its
socket file and when each open ListAndWatch stream began, on its own bus socket for the
registrar.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import h2grpc
from common.bus.messages import (
    MPS_SOCKET,
    CallCount,
    ConfigInfo,
    EndpointState,
    HealthState,
    PluginEvent,
    PluginState,
)
from common.bus.sockets import BusPublisher, BusSubscriber
from common.fswatch import DirWatcher, file_id
from common.lifecycle import PermanentError, check_dir_can_exist, run_until_stopped
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from common.settings import Settings, SettingsError
from services.plugin_server import cdi
from services.plugin_server.allocation import Extras
from services.plugin_server.device_table import MpsReadiness, ResourceTable, build_resources, serve, socket_name
from services.plugin_server.dra_claims import DraClaims
from services.plugin_server.mps_watch import watch_mps
from services.plugin_server.preferred import Topology
from services.plugin_server.servicer import (
    REPLACED,
    RETIRED,
    STOPPING,
    DevicePluginServicer,
    plugin_options,
)

log = logging.getLogger(__name__)

RECHECK_S = 5.0  # backstop for filesystem changes inotify cannot see (e.g. a new mount)
START_ATTEMPTS = 5  # starts in a row per change; a removal after the last one is a new change
# Call counts are for metrics (scraped every 15 s or more): the first count after a quiet spell goes out
# at once, the rest of a burst with one state a second at most, not one per call; an idle server sends none.
CALLS_PUBLISH_S = 1.0
REPLACE_GRACE_S = 0.5


class Endpoint:
    """One gRPC server on `<device plugin dir>/nvidia-<name>.sock`, served by this process's event loop
    (common.h2grpc: no gRPC core threads between a health change and the kubelet's stream)."""

    def __init__(self, path: Path, table: ResourceTable, servicer: Callable[[], DevicePluginServicer]) -> None:
        self.table = table
        self.path = path
        self._new_servicer = servicer  # a fresh servicer (of this table) per gRPC server
        self.socket_id = ""
        self.servicer: DevicePluginServicer | None = None
        self._grpc: h2grpc.Server | None = None
        # Health updates and the socket watcher may both (re)start an endpoint: one at a time,
        # and always stopping the old server first, or it would keep running, unreachable. First,
        # not after the new one starts: the old one's stop removes the socket path it served, and
        # that path would then be the new server's (with grpc.aio: an endless re-creation loop).
        self._lock = asyncio.Lock()
        self.retired = False  # its resource is no longer offered (a reload): never started again

    async def ensure_serving(self) -> bool:
        """(Re)starts the server when its socket is missing or replaced; True when it did."""
        async with self._lock:
            if self.alive() or self.retired:
                return False
            if self._grpc is not None:
                log.warning("socket %s was removed or replaced: re-creating it", self.path)
            for _ in range(START_ATTEMPTS):
                # Grace for the streams `close` ends: their OK is sent within a pass of the loop (the
                # stop returns as soon as no call is open); only a client that does not read waits it out.
                await self._stop(grace=REPLACE_GRACE_S, reason=REPLACED)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                await self._start()
                if self.socket_id:
                    break
                # A restarting kubelet removed the file between our bind and our stat: this
                # server is unreachable, and an empty identity must never pass for a live one.
                log.warning("socket %s was removed as soon as it was created: creating it again", self.path)
            return True

    async def _start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            log.info("removing stale socket %s", self.path)
            self.path.unlink()
        self.servicer = self._new_servicer()
        server = h2grpc.Server()
        pb_grpc.add_DevicePluginServicer_to_server(self.servicer, server)
        # Only around the synchronous bind, which creates the file: an await inside the window would give
        # every other task's files the process-wide umask too.
        old_umask = os.umask(0o077)  # the socket is for the kubelet (root) only
        try:
            server.add_insecure_port(f"unix:{self.path}")
        finally:
            os.umask(old_umask)
        await server.start()
        self._grpc = server
        # Read after the bind, so it is the identity of the file this server listens on: only
        # we create this name, and anyone else only removes it (which the watcher then sees).
        self.socket_id = file_id(self.path)
        if self.socket_id:
            log.info("serving %s on %s", self.table.resource, self.path)

    def use_settings(self, settings: Settings, extras: Extras) -> None:
        if self.servicer is not None:
            self.servicer.use_settings(settings, extras)

    def alive(self) -> bool:
        return self._grpc is not None and bool(self.socket_id) and file_id(self.path) == self.socket_id

    async def stop(self, grace: float | None = None, reason: str = STOPPING) -> None:
        async with self._lock:
            await self._stop(grace, reason)

    async def _stop(self, grace: float | None, reason: str) -> None:
        if self.servicer is not None:
            await self.servicer.close(reason)
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        if self.servicer is not None:
            self.servicer.stream_log.flush()  # the process may be about to exit: no waiting for the window
        if self.socket_id and file_id(self.path) == self.socket_id:
            self.path.unlink(missing_ok=True)
        self.socket_id = ""

    def state(self) -> EndpointState:
        opts = plugin_options()
        return EndpointState(
            resource=self.table.resource,
            endpoint=self.path.name,
            socket_id=self.socket_id,
            pre_start_required=opts.pre_start_required,
            get_preferred_allocation_available=opts.get_preferred_allocation_available,
            streams=self.servicer.streams if self.servicer else 0,
            stream_opened=list(self.servicer.stream_opened) if self.servicer else [],
            stream_ended=list(self.servicer.stream_ended) if self.servicer else [],
            healthy=self.table.healthy,
            total=len(self.table.devices),
        )


class PluginServer:
    def __init__(self, settings: Settings, publisher: BusPublisher, health_bus: Path) -> None:
        self.settings = settings
        self._pub = publisher
        self._health_bus = health_bus
        self._health: HealthState | None = None
        self._last_good: HealthState | None = None  # the last state with NVML working
        self._health_seen_at = 0.0
        self._stale = False
        self._stale_timer: asyncio.TimerHandle | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self._wake = asyncio.Event()  # the publisher loop has something to send
        self._state_changed = False
        self._events: deque[PluginEvent] = deque(maxlen=10000)  # bounded: a flood drops the oldest
        self._health_sub: BusSubscriber | None = None
        self._topology = Topology([], [])
        self._cdi = any(s.startswith("cdi-") for s in settings.device_list_strategy)
        self._cdi_spec: dict[str, Any] | None = None
        self._cdi_key: tuple[Any, ...] | None = None
        self._extra_specs: list[str] = []
        self.extras = Extras(gdrcopy=settings.gdrcopy_enabled, gds=settings.gds_enabled,
                             mofed=settings.mofed_enabled)
        self.mps = MpsReadiness({}, set())
        # The devices DRA claims hold (the dra-plugin's record): out of every resource, whatever the split.
        self.dra = DraClaims(settings.state_dir)
        # Health states, MPS reports and reloads all rebuild the resources: one at a time, each from
        # the latest state and settings, or a slower rebuild could undo a newer one (or leave a
        # retired resource behind) until the next change.
        self._apply_lock = asyncio.Lock()
        self.config = ConfigInfo()  # set by the config reloader
        # DevicePlugin calls per resource by (method, gRPC code) since the start, kept across endpoint
        # re-creations and reloads: counters for the metrics the kube-agent serves.
        self.calls: dict[str, Counter[tuple[str, str]]] = {}
        self._calls_timer: asyncio.TimerHandle | None = None
        self._calls_held = False  # counted while the timer runs: sent when it fires

    # -- bus out ----------------------------------------------------------------------
    def _mark_changed(self) -> None:
        self._state_changed = True
        self._wake.set()

    def streams_changed(self, _count: int) -> None:
        self._mark_changed()

    def allocated(self, resource: str) -> Callable[[list[str]], None]:
        def record(ids: list[str]) -> None:
            # Off the Allocate path: the publisher loop sends it after the answer.
            self._events.append(PluginEvent(time=time.time(), event="allocate", resource=resource, detail="",
                                            devices=ids))
            self._wake.set()

        return record

    def _counted(self) -> None:
        if self._calls_timer is not None:
            self._calls_held = True
            return
        self._mark_changed()
        self._calls_timer = asyncio.get_running_loop().call_later(CALLS_PUBLISH_S, self._calls_due)

    def _calls_due(self) -> None:
        self._calls_timer = None
        if self._calls_held:
            self._calls_held = False
            self._counted()

    async def _publisher_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._events:
                self._pub.publish(self._events.popleft())
            if not self._state_changed:
                continue
            self._state_changed = False
            self._pub.publish_state(
                PluginState(
                    health_incarnation=self._health.incarnation if self._health else "",
                    health_stale=self._stale,
                    endpoints=[ep.state() for ep in self.endpoints.values() if ep.socket_id],
                    bus_dropped=self._health_sub.dropped if self._health_sub else 0,
                    config=self.config,
                    calls=[CallCount(resource, method, code, n) for resource, counts in sorted(self.calls.items())
                           for (method, code), n in sorted(counts.items())],
                )
            )

    # -- bus in -----------------------------------------------------------------------
    async def _consume_health(self) -> None:
        sub = self._health_sub = BusSubscriber([self._health_bus], topics=[HealthState.TOPIC])
        try:
            while True:
                dropped = sub.dropped
                msg = await sub.recv_latest()  # no timeout here: staleness is the timer's job
                if sub.dropped != dropped:
                    self._mark_changed()
                if isinstance(msg, HealthState):
                    self._health_seen_at = time.monotonic()
                    self._rearm_staleness()
                    if self._stale:
                        log.info("health publisher is back")
                        self._stale = False
                        self._mark_changed()
                    async with self._apply_lock:
                        await self._apply(msg)
        finally:
            sub.close()

    def _rearm_staleness(self) -> None:
        """A timer that fires only if the health bus stays silent for stale_after: no periodic
        check waking the loop every second of an idle node."""
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        self._stale_timer = asyncio.get_running_loop().call_later(self.settings.stale_after, self._went_stale)

    def _went_stale(self) -> None:
        self._stale_timer = None
        silent = time.monotonic() - self._health_seen_at
        # Missing data is not a fault: keep serving the last known state.
        log.warning("health state is stale (no heartbeat for %.0f s); keeping last known state", silent)
        self._stale = True
        self._mark_changed()

    def _endpoint(self, resource: str) -> Endpoint:
        table = ResourceTable(resource)
        calls = self.calls.setdefault(resource, Counter())

        def servicer() -> DevicePluginServicer:
            return DevicePluginServicer(table, self.settings, self.streams_changed, self.allocated(resource),
                                        self.extras, calls, self._counted)

        return Endpoint(self.settings.device_plugin_dir / socket_name(resource), table, servicer)

    async def _dra_changed(self) -> None:
        async with self._apply_lock:
            if self._health is not None:
                await self._apply(self._health, force=True)

    async def _mps_changed(self) -> None:
        async with self._apply_lock:
            if self._health is not None:
                await self._apply(self._health, force=True)

    async def _apply(self, state: HealthState, force: bool = False) -> None:
        old = self._health
        self._health = state
        view = serve(old, state, self._last_good, self.settings, self.mps, force, self.dra.ids)
        if view is None:
            return  # a heartbeat
        self._last_good = view.last_good
        state, resources = view.state, view.resources
        if view.error:
            log.error("health-monitor reports NVML unavailable (%s): all devices Unhealthy", view.error)
        if view.topology_changed:
            # Built when the topology changes, never per request (16 GPUs: ~50 ms).
            self._topology = Topology([d for d in state.devices if d.kind == "gpu"], state.links)
        if self._cdi and state.nvml_ok:
            listed = [d for d in state.devices if d.kind in ("gpu", "mig")]
            key = cdi.spec_key(listed, state.driver_version)
            if key != self._cdi_key:  # the driver's files are read only when devices or driver change
                spec = cdi.build_spec(listed, self.settings, state.driver_version)
                path = cdi.write_spec(self.settings.cdi_spec_dir, spec)
                self._cdi_spec, self._cdi_key = spec, key
                log.info("CDI spec written to %s (%d devices, driver %s, %d mounts)", path, len(spec["devices"]),
                         state.driver_version, len(spec["containerEdits"]["mounts"]))
        for name, devices in resources.items():
            ep = self.endpoints.get(name)
            if ep is None:
                ep = self.endpoints[name] = self._endpoint(name)
            ep.table.topology = self._topology
            changed = await ep.table.update(devices)
            if await ep.ensure_serving() or changed:
                self._mark_changed()
        for name, ep in self.endpoints.items():
            if name not in resources and await ep.table.update([]):
                self._mark_changed()

    # -- live reload ------------------------------------------------------------------
    def set_config(self, config: ConfigInfo) -> None:
        self.config = config
        self._mark_changed()

    async def apply_settings(self, settings: Settings) -> None:
        """A config reload: the last health state served again under `settings`.

        Checked before anything changes (a MIG layout the new strategy cannot serve raises
        SettingsError: the reload is refused, the old resources keep being served). A resource the
        new settings no longer offer is stopped, its socket removed, so that the registrar drops
        it; a new one is started and registered. Allocations already made are the kubelet's
        (its checkpoint): nothing here touches them. New Allocate calls use the new settings.
        """
        try:
            if self._health is not None:
                build_resources(self._last_good or self._health, settings, self.mps, self.dra.ids)
            if any(s.startswith("cdi-") for s in settings.device_list_strategy):
                cdi.check_driver_files(settings)  # e.g. a CDI strategy without the driver root mounted
        except PermanentError as e:  # fatal at start; on a reload, a refusal
            raise SettingsError(str(e)) from e
        async with self._apply_lock:
            self.settings = settings
            self._cdi = any(s.startswith("cdi-") for s in settings.device_list_strategy)
            self._cdi_key = None  # the spec follows the new device-ID strategy and extras
            self._announce_settings()
            for ep in self.endpoints.values():
                ep.use_settings(settings, self.extras)
            if self._health is not None:
                await self._apply(self._health, force=True)
                wanted = build_resources(self._last_good or self._health, settings, self.mps, self.dra.ids)
                for name in [n for n in self.endpoints if n not in wanted]:
                    log.info("resource %s is no longer offered: stopping its endpoint", name)
                    ep = self.endpoints.pop(name)
                    ep.retired = True  # the socket watcher may hold it in a snapshot
                    await ep.stop(grace=0.5, reason=RETIRED)
        self._mark_changed()

    # -- sockets ----------------------------------------------------------------------
    async def _watch_sockets(self, stop: asyncio.Event) -> None:
        watcher = DirWatcher(self.settings.device_plugin_dir, create=True)
        watcher.start()
        try:
            while not stop.is_set():
                names = await watcher.next(timeout=RECHECK_S)
                wanted = {ep.path.name for ep in self.endpoints.values()}
                if names and "" not in names and not names & wanted:
                    continue
                # Every endpoint, not only those with an identity: one whose socket vanished
                # while it started has none, and skipping it would lose it for good.
                for ep in list(self.endpoints.values()):
                    if await ep.ensure_serving():
                        self._mark_changed()
        finally:
            watcher.close()

    def _announce_settings(self) -> None:
        s = self.settings
        log.info("MIG strategy %s; device list strategy %s; device ID strategy %s; passDeviceSpecs %s",
                 s.mig_strategy, ",".join(s.device_list_strategy), s.device_id_strategy, s.pass_device_specs)
        for section in (x for x in (s.sharing.time_slicing, s.sharing.mps) if x is not None):
            for res in section.resources:
                chosen = "all devices" if res.devices is None else f"devices {res.devices}"
                log.info("%s %s: %d replicas of %s as %s (NVIDIA's plugin ignores a device selection "
                         "and replicates all; here it is honoured)", section.kind, res.name, res.replicas, chosen,
                         section.served_name(res))
        if s.sharing.mps is not None:
            log.info("MPS replicas are offered once mps-control reports their daemon ready; pipes under %s "
                     "(host %s)", s.mps_container_root, s.mps_host_root)
        elif s.mps_root:
            log.info("MPS_ROOT / --mps-root is set (%s) but sharing.mps is not configured: no MPS", s.mps_root)
        channels = cdi.imex_channels(s)
        self.extras = Extras(gdrcopy=s.gdrcopy_enabled, gds=s.gds_enabled, mofed=s.mofed_enabled,
                             imex_channels=channels)
        if s.gds_enabled or s.mofed_enabled or s.gdrcopy_enabled or channels:
            log.info("every GPU container also gets:%s%s%s%s", " GPUDirect Storage" if s.gds_enabled else "",
                     " MOFED" if s.mofed_enabled else "", " GDRCopy" if s.gdrcopy_enabled else "",
                     f" IMEX channels {','.join(channels)}" if channels else "")
        if self._cdi:
            cdi.check_driver_files(s)
            for name, spec in cdi.extra_specs(s, channels).items():
                log.info("CDI spec written to %s", cdi.write_spec(s.cdi_spec_dir, spec, name))
                if name not in self._extra_specs:  # written again on a config reload
                    self._extra_specs.append(name)

    async def run(self, stop: asyncio.Event) -> None:
        self._announce_settings()
        check_dir_can_exist(self.settings.device_plugin_dir, "device-plugin dir")
        self.settings.device_plugin_dir.mkdir(parents=True, exist_ok=True)
        self.dra.read()  # before the first health state is served: a claimed GPU is never offered, even briefly
        self._mark_changed()
        try:
            await run_until_stopped(
                stop,
                asyncio.create_task(self._pub.run(), name="bus-heartbeat"),
                asyncio.create_task(self._publisher_loop(), name="plugin-state"),
                asyncio.create_task(self._consume_health(), name="health-consumer"),
                asyncio.create_task(self._watch_sockets(stop), name="socket-watcher"),
                asyncio.create_task(self.dra.run(self._dra_changed), name="dra-claims"),
                *([asyncio.create_task(watch_mps(self.settings.bus_path(MPS_SOCKET), self.mps, self._mps_changed),
                                       name="mps-watcher")] if self.settings.sharing.mps is not None else []),
            )
        finally:
            for ep in self.endpoints.values():
                await ep.stop(grace=0.5)
            if self._cdi_spec is not None:
                cdi.remove_spec(self.settings.cdi_spec_dir)
            for name in self._extra_specs:
                cdi.remove_spec(self.settings.cdi_spec_dir, name)
            log.info("plugin-server stopped; sockets removed")

