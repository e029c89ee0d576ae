"""The node side of the DRA driver: registration with the kubelet, the DRA service, prepared claims, and
the health stream, all from the health bus.

The kubelet's side, as read from pkg/kubelet/pluginmanager and pkg/kubelet/cm/dra:

- Its plugin watcher watches `plugins_registry` (inotify) and, for each socket that appears there (names
  not starting with "."), dials it, calls GetInfo, finds the handler for the type ("DRAPlugin"), which
  checks the name and the services the plugin lists, then NotifyRegistrationStatus (registered, or not
  with the error). A socket removed is a plugin gone (DeRegister); one re-created registers again.
- The DRA handler picks, of the services listed, the first one it speaks ("v1.DRAPlugin" from 1.34,
  "v1beta1.DRAPlugin" 1.32 and 1.33: we list both, v1 first) and keeps one gRPC connection to the
  endpoint, reconnecting by itself. With the ResourceHealthStatus gate it opens NodeWatchResources
  (v1alpha1.DRAResourceHealth; later kubelets only where it is listed, so we list it) and opens it again
  5 s after it ends. It takes a device not reported for 30 s as Unknown: the stream repeats the whole
  list every RESEND_S, besides sending it at once on every change.
- NodePrepareResources carries claim references; the plugin reads each claim from the API (ours: GET
  resource.k8s.io v1, else v1beta1 on a 1.32/1.33 server), and answers per claim UID the devices with
  their pool, name, requests and CDI device IDs, or an error for that claim. The kubelet asks again,
  for running pods after its restart too: answers must be the same (the checkpoint's). Unprepare gets
  references only (the claim may be gone from the API) and must succeed for a claim not prepared.

Sockets are NVIDIA's: `<registry dir>/gpu.nvidia.com-reg.sock`, `<plugins dir>/gpu.nvidia.com/dra.sock`,
owner-only, re-created when removed, removed at stop (the kubelet then deregisters the plugin).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common import h2grpc
from common.bus.messages import HEALTHY, DeviceState, DraEvent, DraSlices, DraState, HealthEvent, HealthState, Message
from common.bus.sockets import BusPublisher, BusSubscriber
from common.dra_checkpoint import COMPLETED, STARTED, Checkpoint, CheckpointError, Entry, PreparedDevice
from common.fswatch import DirWatcher, file_id
from common.kubeapi import READ_ERRORS, ApiStatus, ConfigError, Http, default_client, reason, request
from common.lifecycle import PermanentError, run_until_stopped
from common.pb.dra.v1 import api_pb2 as v1
from common.pb.dra.v1 import api_pb2_grpc as v1_grpc
from common.pb.dra.v1beta1 import api_pb2 as v1beta1
from common.pb.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from common.pb.drahealth.v1alpha1 import api_pb2 as health_pb
from common.pb.drahealth.v1alpha1 import api_pb2_grpc as health_grpc
from common.pb.pluginregistration.v1 import api_pb2 as reg_pb
from common.pb.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from common.settings import Settings
from services.dra_plugin.claims import (
    GROUP,
    MAX_CLAIMS_PER_CALL,
    VERSIONS,
    Allocated,
    ClaimError,
    ClaimRef,
    choose,
    claim_path,
)
from services.dra_plugin.claims import allocated as allocated_of
from services.dra_plugin.kubelet_devices import KubeletAllocations, held_gpus
from services.dra_plugin.names import DRIVER_NAME, cdi_device_id, is_claim_uid, pool_name
from services.dra_plugin.pool import served
from services.dra_plugin.specs import SpecWriter
from services.plugin_server.cdi import CdiError

log = logging.getLogger(__name__)

PLUGIN_TYPE = "DRAPlugin"
# What GetInfo lists, most preferred first: the kubelet takes the first DRA service it speaks.
SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1alpha1.DRAResourceHealth")
REGISTRATION_SOCKET = f"{DRIVER_NAME}-reg.sock"
ENDPOINT_SOCKET = "dra.sock"
RESEND_S = 10.0  # the health list again, well within the kubelet's 30 s after which a device reads Unknown
RECHECK_S = 5.0  # sockets looked at without an inotify event (a backstop, as the plugin-server's)
READ_S = 10.0  # one claim read from the API, whole; the kubelet's call waits 45 s for the answer
ANSWER_S = 1.0  # a socket left at our path is tried this long: a live one answers a connect at once
# Stale records: a claim whose unprepare never came (a node drained while the plugin was down, a kubelet
# that lost its own checkpoint) would hold its devices for ever. Looked up at start and this often; only
# records older than CLEAN_AGE_S, so that a claim being prepared now is never questioned.
CLEAN_S = 600.0
CLEAN_AGE_S = 300.0
MAX_HEALTH_STREAMS = 64  # the kubelet holds one (two while it replaces it)
ERROR_TEXT = 1000  # a claim's error as the kubelet shows it in the pod's events
HealthUpdates = AsyncIterator[health_pb.NodeWatchResourcesResponse]


@dataclass
class Result:
    """One claim's answer: its devices, or the error the kubelet shows."""

    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


class Socket:
    """One gRPC server on a unix socket of ours (common.h2grpc: served by this process's loop), started,
    re-created when its file is removed or replaced."""

    def __init__(self, path: Path, add: Callable[[h2grpc.Server], None], what: str) -> None:
        self.path = path
        self._add = add
        self.what = what
        self._server: h2grpc.Server | None = None
        self._id = ""

    def alive(self) -> bool:
        return self._server is not None and bool(self._id) and file_id(self.path) == self._id

    async def ensure(self) -> bool:
        """Serves on the path unless it already does; True when it (re)started the server."""
        if self.alive():
            return False
        if self._server is not None:
            log.warning("%s %s was removed or replaced: creating it again", self.what, self.path)
        await self.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if await answers(self.path):
                # NVIDIA's DRA driver serves the same name and paths: unlinking its live socket would take the
                # node's GPUs from it behind its back, and the kubelet would then talk to two drivers by turns.
                raise PermanentError(
                    f"{self.what}: {self.path} is served by another live process, most likely NVIDIA's DRA "
                    f"driver ({DRIVER_NAME}) on this node; run one {DRIVER_NAME} driver per node (turn DRA off here, "
                    "or remove the other one)")
            self.path.unlink()  # a dead predecessor's: ours by name (the watcher sees it go, then come)
        server = h2grpc.Server()
        self._add(server)
        # Only around the synchronous bind, which creates the file: an await inside the window would give
        # every other task's files the process-wide umask too.
        old_umask = os.umask(0o077)  # for the kubelet (root) only
        try:
            server.add_insecure_port(f"unix:{self.path}")
        finally:
            os.umask(old_umask)
        await server.start()
        self._server, self._id = server, file_id(self.path)
        log.info("serving %s on %s", self.what, self.path)
        return True

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._id and file_id(self.path) == self._id:
            self.path.unlink(missing_ok=True)
        self._id = ""


async def answers(path: Path) -> bool:
    """Whether something listens on the unix socket at `path` (refused or not a socket: nothing does)."""
    try:
        async with asyncio.timeout(ANSWER_S):
            _, writer = await asyncio.open_unix_connection(str(path))
    except TimeoutError:
        return True  # a backlog that is full is a listener's
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class NotServed(Exception):
    """No API version the plugin reads serves ResourceClaims."""


class DraPlugin:
    def __init__(self, settings: Settings, node: str, publisher: BusPublisher, health_bus: Path,
                 kubelet: KubeletAllocations, http: Callable[[], Http] = default_client, clean_s: float = CLEAN_S,
                 clean_age_s: float = CLEAN_AGE_S) -> None:
        self.settings = settings
        self.node = node
        self.pool = pool_name(node)
        self._pub = publisher
        self._health_bus = health_bus
        self._new_http = http
        self._clean_s, self._clean_age_s = clean_s, clean_age_s
        # The device plugin's pods' GPUs (the kubelet's device manager): not DRA's while they hold them.
        self.kubelet = kubelet
        self._http: Http | None = None
        self._version = 0  # index into VERSIONS of the API version that served the last claim
        self.registration_path = settings.kubelet_registrar_dir / REGISTRATION_SOCKET
        self.endpoint_path = settings.kubelet_plugins_dir / DRIVER_NAME / ENDPOINT_SOCKET
        self.checkpoint = Checkpoint(settings.state_dir)
        self.specs = SpecWriter(settings)
        self._lock = asyncio.Lock()  # claims are recorded and their specs written one at a time
        self.health: HealthState | None = None
        self._health_at = 0.0  # monotonic time the health state was last heard (heartbeats too)
        self.stale = False
        self.offered: dict[str, DeviceState] = {}
        self.gpus: dict[str, DeviceState] = {}
        self._news = asyncio.Event()  # set (and replaced) whenever what the health stream says changes
        self._view: tuple[Any, ...] = ()
        # For the bus
        self.registered = False
        self.registration_error = ""
        self.registered_at = 0.0
        self.info_calls = 0
        self.prepares = 0
        self.prepare_failures = 0
        self.unprepares = 0
        self.health_streams = 0
        self.last_error = ""
        self.checkpoint_error = ""
        self.slices: DraSlices | None = None  # the API side's last report (None: it has not reported)
        self.endpoint = Socket(self.endpoint_path, self._add_node_services, "the DRA service")
        self.registration = Socket(self.registration_path, self._add_registration, "plugin registration")

    # -- servers ------------------------------------------------------------------------------
    def _add_node_services(self, server: h2grpc.Server) -> None:
        v1_grpc.add_DRAPluginServicer_to_server(NodeV1(self), server)
        v1beta1_grpc.add_DRAPluginServicer_to_server(NodeV1beta1(self), server)
        health_grpc.add_DRAResourceHealthServicer_to_server(Health(self), server)

    def _add_registration(self, server: h2grpc.Server) -> None:
        reg_grpc.add_RegistrationServicer_to_server(Registration(self), server)

    async def _ensure_sockets(self) -> None:
        # The endpoint first: the kubelet dials it as soon as the registration answers.
        await self.endpoint.ensure()
        await self.registration.ensure()

    async def _watch_sockets(self) -> None:
        watchers = [DirWatcher(self.registration_path.parent, create=True),
                    DirWatcher(self.endpoint_path.parent, create=True)]
        for w in watchers:
            w.start()
        try:
            while True:
                # Either directory's news, or the backstop: then both sockets are looked at.
                waits = [asyncio.create_task(w.next(timeout=RECHECK_S)) for w in watchers]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in waits:
                        t.cancel()
                await self._ensure_sockets()
        finally:
            for w in watchers:
                w.close()

    def slices_changed(self, slices: DraSlices) -> None:
        """The API side's report (its ResourceSlices), for the bus."""
        self.slices = slices
        self.publish()

    async def run(self, stop: asyncio.Event, *beside: tuple[str, Coroutine[Any, Any, None]],
                  health_to: Callable[[Message], None] | None = None) -> None:
        """Serves until `stop`; `beside`: the program's other work (named), run and ended with it. `health_to`:
        handed every message of the health bus too, HealthEvents included (the program's ResourceSlices writer:
        one subscriber to the bus in the process)."""
        try:
            self.checkpoint.load()
        except CheckpointError as e:
            self.checkpoint_error = f"unreadable, moved aside, started empty: {e}"
            log.error("checkpoint %s", self.checkpoint_error)
        if self.checkpoint.entries:
            log.info("checkpoint: %d claims prepared before this start (%s)", len(self.checkpoint.entries),
                     ", ".join(str(e) for e in list(self.checkpoint.entries.values())[:5]))
        sub = BusSubscriber([self._health_bus],
                            topics=[HealthState.TOPIC] + ([HealthEvent.TOPIC] if health_to is not None else []))
        self.publish()
        try:
            try:
                await self._ensure_sockets()
            except BaseException:
                for _, work in beside:  # never started: closed, so that none is left never awaited
                    work.close()
                raise
            await run_until_stopped(
                stop,
                asyncio.create_task(self._pub.run(), name="bus-heartbeat"),
                asyncio.create_task(self._follow_health(sub, health_to), name="health-bus"),
                asyncio.create_task(self._watch_sockets(), name="sockets"),
                asyncio.create_task(self._clean_loop(), name="stale-claims"),
                *(asyncio.create_task(work, name=name) for name, work in beside),
            )
        finally:
            sub.close()
            # The registration first: the kubelet deregisters the plugin, then its endpoint goes.
            await self.registration.stop(0)
            await self.endpoint.stop(0)
            if self._http is not None:
                with contextlib.suppress(Exception):
                    await self._http.aclose()

    # -- health bus ---------------------------------------------------------------------------
    async def _follow_health(self, sub: BusSubscriber, health_to: Callable[[Message], None] | None) -> None:
        stale_after = self.settings.stale_after
        while True:
            if self.stale:  # nothing to time: the next state ends it
                msg: Message | None = await sub.recv()
            else:  # woken by the next message or when the last state gets stale, not every second
                msg = await sub.recv_timeout(max(0.0, self._health_at + stale_after - time.monotonic()))
            now = time.monotonic()
            if msg is not None and health_to is not None:
                health_to(msg)
            if isinstance(msg, HealthState):
                self._health_at = now
                if msg.is_new(self.health):
                    self.health = msg
                    # What DRA_DEVICES gives to DRA (the plugin-server serves the rest): the slices' devices.
                    # Without NVML the monitor knows no devices: the last ones known stay listed, as Unknown.
                    if msg.nvml_ok:
                        self.offered = served(msg.devices, self.settings.dra_devices)
                    self.gpus = {d.id: d for d in msg.devices if d.kind == "gpu"}
            stale = self.health is None or now - self._health_at >= stale_after
            if stale != self.stale:
                self.stale = stale
                if stale:
                    log.warning("no health state for %.0f s: the devices are reported Unknown", stale_after)
                else:
                    log.info("health state heard again")
            self._changed()

    def _changed(self) -> None:
        """Tells the health streams and the bus when what they show changed."""
        view = (self.unknown, tuple((n, d.health) for n, d in sorted(self.offered.items())),
                self.health.incarnation if self.health else "")
        if view == self._view:
            return
        self._view = view
        self._news.set()
        self._news = asyncio.Event()
        self.publish()

    @property
    def unknown(self) -> bool:
        """No health to tell: the bus is silent, or the health-monitor cannot use NVML."""
        return self.stale or (self.health is not None and not self.health.nvml_ok)

    def device_health(self) -> health_pb.NodeWatchResourcesResponse:
        now = int(time.time())
        out = health_pb.NodeWatchResourcesResponse()
        for name, d in sorted(self.offered.items()):
            health = health_pb.UNKNOWN if self.unknown else health_pb.HEALTHY if d.health == HEALTHY \
                else health_pb.UNHEALTHY
            out.devices.add(device=health_pb.DeviceIdentifier(pool_name=self.pool, device_name=name), health=health,
                            last_updated_time=now)
        return out

    async def watch_health(self, context: grpc.aio.ServicerContext) -> HealthUpdates:
        if self.health_streams >= MAX_HEALTH_STREAMS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.health_streams} health streams open already, the most this plugin serves")
        self.health_streams += 1
        self.publish()
        log.info("health stream opened (%d open)", self.health_streams)
        try:
            while True:
                news = self._news
                yield self.device_health()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESEND_S):
                        await news.wait()
        finally:
            self.health_streams -= 1
            self.publish()
            log.info("health stream ended (%d open)", self.health_streams)

    # -- registration -------------------------------------------------------------------------
    def info(self) -> reg_pb.PluginInfo:
        self.info_calls += 1
        self.publish()
        return reg_pb.PluginInfo(type=PLUGIN_TYPE, name=DRIVER_NAME, endpoint=str(self.endpoint_path),
                                 supported_versions=list(SERVICES))

    def notified(self, registered: bool, error: str) -> None:
        shown = error[:ERROR_TEXT]
        if registered:
            log.info("the kubelet registered %s (endpoint %s)", DRIVER_NAME, self.endpoint_path)
            self.registered_at = time.time()
        else:
            log.error("the kubelet refused the registration of %s: %s", DRIVER_NAME, shown or "no reason given")
        self.registered, self.registration_error = registered, "" if registered else (shown or "no reason given")
        self._event("registration", "", "registered" if registered else f"refused: {self.registration_error}")
        self.publish()

    # -- claims -------------------------------------------------------------------------------
    def _client(self) -> Http:
        if self._http is None:
            try:
                self._http = self._new_http()
            except ConfigError as e:
                raise ClaimError(f"cannot read ResourceClaims: no API access configured ({e})") from None
        return self._http

    async def _get_claim(self, http: Http, ref: ClaimRef, what: str) -> tuple[str, Any]:
        """(API version, answer) of the claim, from the first version that serves ResourceClaims (the one
        that served last asked first). Raises what `request` raises (a missing claim: 404 NotFound), or
        NotServed when no version is."""
        for version in [*VERSIONS[self._version:], *VERSIONS[:self._version]]:
            try:
                async with asyncio.timeout(READ_S):
                    answer = await request(http, "GET", claim_path(version, ref), what)
            except ApiStatus as e:
                if e.code == 404 and e.reason != "NotFound":
                    continue  # not a Status of a missing claim: this API version is not served
                raise
            self._version = VERSIONS.index(version)
            return version, answer
        raise NotServed(f"the API server serves no ResourceClaims ({', '.join(f'{GROUP}/{v}' for v in VERSIONS)})")

    async def _read(self, ref: ClaimRef) -> list[Allocated]:
        """The claim's results for our driver, read from the API (ClaimError: why it cannot be prepared)."""
        http = self._client()
        what = f"ResourceClaim {ref.namespace}/{ref.name}"
        try:
            version, answer = await self._get_claim(http, ref, what)
        except TimeoutError:  # before READ_ERRORS: a TimeoutError is an OSError
            raise ClaimError(f"reading {what}: no answer within {READ_S:.0f} s") from None
        except ApiStatus as e:
            if e.code == 404:
                raise ClaimError(f"{what} not found") from None
            raise ClaimError(f"reading {what}: {reason(e)}") from None
        except (NotServed, *READ_ERRORS) as e:
            raise ClaimError(f"reading {what}: {e if isinstance(e, NotServed) else reason(e)}") from None
        return allocated_of(answer, ref, version, DRIVER_NAME, self.pool)

    async def _gone_why(self, entry: Entry) -> str:
        """Why the claim of a record is gone from the API: "" when it is there, or when the API does not say
        (away, refusing, no access): only a clear answer removes a record."""
        ref = ClaimRef(entry.namespace, entry.uid, entry.name)
        what = f"ResourceClaim {ref.namespace}/{ref.name}"
        try:
            _, answer = await self._get_claim(self._client(), ref, what)
        except ApiStatus as e:
            return f"{what} is not in the API" if e.code == 404 else ""
        except (ClaimError, NotServed, TimeoutError, *READ_ERRORS):
            return ""
        meta = answer.get("metadata") if isinstance(answer, dict) else None
        uid = meta.get("uid") if isinstance(meta, dict) else None
        if isinstance(uid, str) and uid and uid != entry.uid:
            return f"{what} is now another claim (UID {uid})"
        return ""

    async def clean_stale(self) -> list[str]:
        """One pass: the records older than the age whose claim is gone from the API (deleted, or its name
        now another claim's) are removed with their specs; the UIDs removed."""
        cutoff = time.time() - self._clean_age_s
        removed: list[str] = []
        for entry in [e for e in self.checkpoint.entries.values() if e.since < cutoff]:
            why = await self._gone_why(entry)
            if not why:
                continue
            async with self._lock:
                if self.checkpoint.entries.get(entry.uid) != entry:
                    continue  # unprepared or prepared again while the API was asked
                try:
                    self.specs.remove(entry.uid)
                    self.checkpoint.remove(entry.uid)
                except (CheckpointError, OSError) as e:
                    log.warning("claim %s: stale record (%s) not removed: %s", entry, why, e)
                    continue
            removed.append(entry.uid)
            log.warning("claim %s: record and CDI spec removed, no unprepare came and %s", entry, why)
            self._event("unprepare", str(entry), f"stale record removed: {why}",
                        [d.name for d in entry.devices])
        if removed:
            self.publish()
        return removed

    async def _clean_loop(self) -> None:
        while True:
            await self.clean_stale()
            # A period between passes, not a wait for a condition.
            await asyncio.sleep(self._clean_s)

    async def prepare(self, refs: list[ClaimRef]) -> dict[str, Result]:
        results: dict[str, Result] = {}
        pending: list[ClaimRef] = []
        for ref in refs:
            try:
                ref.check()
            except ClaimError as e:
                results[ref.uid] = self._failed(ref, e)
                continue
            entry = self.checkpoint.entries.get(ref.uid)
            if entry is not None and entry.phase == COMPLETED:
                async with self._lock:
                    results[ref.uid] = self._again(ref, entry)
            else:
                pending.append(ref)
        # The API reads of the call at once, and outside the lock: a slow API holds no other claim up.
        reads = await asyncio.gather(*(self._read(ref) for ref in pending), return_exceptions=True)
        async with self._lock:
            for ref, got in zip(pending, reads, strict=True):
                if isinstance(got, BaseException) and not isinstance(got, ClaimError):
                    raise got
                results[ref.uid] = self._prepare_one(ref, got)
        self.publish()
        return results

    def _again(self, ref: ClaimRef, entry: Entry) -> Result:
        """A claim prepared before (this process or an earlier one): the same answer. Its spec is written
        again if it went (a node reboot empties /var/run/cdi), from the devices it was prepared with."""
        if (entry.namespace, entry.name) != (ref.namespace, ref.name):
            return self._failed(ref, ClaimError(f"claim UID {ref.uid} was prepared as {entry.namespace}/{entry.name}"))
        if entry.devices and not self.specs.exists(ref.uid):
            if self.health is None or not self.health.nvml_ok:
                # Nothing is known of the devices yet (a start before the first health state): that is not
                # "gone from this node", and the kubelet's next try will find them.
                why = "no device state from the health-monitor yet" if self.health is None else \
                    f"the health-monitor cannot use NVML: {self.health.error}"
                return self._failed(ref, ClaimError(f"claim {ref}: its CDI spec is gone and cannot be written "
                                                    f"again yet: {why}"))
            by_uuid = {d.id: (name, d) for name, d in self.offered.items()}
            devices: dict[str, DeviceState] = {}
            for p in entry.devices:
                found = by_uuid.get(p.uuid)
                if found is None or found[0] != p.name:
                    return self._failed(ref, ClaimError(f"claim {ref}: its CDI spec is gone and device {p.name} "
                                                        f"({p.uuid}) is no longer on this node to write it again"))
                devices[p.name] = found[1]
            try:
                self._write_spec(ref, devices)
            except ClaimError as e:
                return self._failed(ref, e)
            log.info("claim %s: its CDI spec was gone; written again", ref)
        self.prepares += 1
        return Result(entry.devices)

    def _write_spec(self, ref: ClaimRef, devices: dict[str, DeviceState]) -> None:
        assert self.health is not None
        try:
            spec = self.specs.build(ref.uid, devices, self.gpus, self.health.driver_version)
            self.specs.write(ref.uid, spec)
        except CdiError as e:
            raise ClaimError(f"claim {ref}: {e}") from None

    def _prepare_one(self, ref: ClaimRef, got: list[Allocated] | ClaimError) -> Result:
        if isinstance(got, ClaimError):
            return self._failed(ref, got)
        entry = self.checkpoint.entries.get(ref.uid)
        if entry is not None and entry.phase == COMPLETED:
            return self._again(ref, entry)  # prepared by a call that ran while this one read the API
        if self.health is None or not self.health.nvml_ok:
            why = "no device state from the health-monitor yet" if self.health is None else \
                f"the health-monitor cannot use NVML: {self.health.error}"
            return self._failed(ref, ClaimError(f"claim {ref}: {why}"))
        try:
            chosen = choose(got, self.offered, self.checkpoint.in_use(except_uid=ref.uid), ref,
                            held_gpus(self.kubelet.ids, self.health.devices))
        except ClaimError as e:
            return self._failed(ref, e)
        devices = tuple(PreparedDevice(c.requests, c.pool, c.name, c.device.id, (cdi_device_id(ref.uid, c.name),),
                                       c.admin_access) for c in chosen)
        try:
            # Started before the spec: a restart in between leaves a record that an unprepare cleans up.
            self.checkpoint.put(Entry(ref.uid, ref.namespace, ref.name, STARTED, devices))
        except CheckpointError as e:
            return self._failed(ref, ClaimError(f"claim {ref}: checkpoint {e}"), checkpoint=str(e))
        try:
            if devices:
                self._write_spec(ref, {c.name: c.device for c in chosen})
            self.checkpoint.put(Entry(ref.uid, ref.namespace, ref.name, COMPLETED, devices))
        except (ClaimError, CheckpointError) as e:
            with contextlib.suppress(OSError):
                self.specs.remove(ref.uid)
            with contextlib.suppress(CheckpointError):
                self.checkpoint.remove(ref.uid)
            error = e if isinstance(e, ClaimError) else ClaimError(f"claim {ref}: checkpoint {e}")
            return self._failed(ref, error, checkpoint="" if isinstance(e, ClaimError) else str(e))
        self.checkpoint_error = ""
        self.prepares += 1
        names = [d.name for d in devices]
        log.info("prepared claim %s: %s", ref, ", ".join(names) or "no devices of ours")
        self._event("prepare", str(ref), "prepared", names)
        return Result(devices)

    def _failed(self, ref: ClaimRef, e: ClaimError, checkpoint: str = "") -> Result:
        text = str(e)[:ERROR_TEXT]
        self.prepare_failures += 1
        self.last_error = text
        if checkpoint:
            self.checkpoint_error = checkpoint
        log.warning("claim %s not prepared: %s", ref, text)
        self._event("prepare", str(ref), f"refused: {text}")
        return Result(error=text)

    async def unprepare(self, refs: list[ClaimRef]) -> dict[str, str]:
        """Per claim UID, "" or why it could not be undone; a claim not prepared is undone already."""
        out: dict[str, str] = {}
        async with self._lock:
            for ref in refs:
                try:
                    if not is_claim_uid(ref.uid):  # the UID names the spec file: it must be one
                        raise ClaimError(f"UID {ref.uid[:80]!r} is not a UID")
                    self.specs.remove(ref.uid)
                    known = self.checkpoint.remove(ref.uid)
                except (ClaimError, CheckpointError, OSError) as e:
                    out[ref.uid] = f"claim {ref}: {e}"[:ERROR_TEXT]
                    self.last_error = out[ref.uid]
                    log.warning("claim %s not unprepared: %s", ref, out[ref.uid])
                    continue
                out[ref.uid] = ""
                self.unprepares += 1
                if known:
                    log.info("unprepared claim %s", ref)
                    self._event("unprepare", str(ref), "unprepared")
        self.publish()
        return out

    # -- bus ----------------------------------------------------------------------------------
    def _event(self, kind: Any, claim: str, detail: str, devices: Iterable[str] = ()) -> None:
        self._pub.publish(DraEvent(time=time.time(), event=kind, claim=claim, detail=detail, devices=list(devices)))

    def publish(self) -> None:
        h = self.health
        self._pub.publish_state(DraState(
            driver=DRIVER_NAME, node=self.node, registration_socket=str(self.registration_path),
            endpoint=str(self.endpoint_path), services=list(SERVICES), registered=self.registered,
            registration_error=self.registration_error, registered_at=self.registered_at, info_calls=self.info_calls,
            health_incarnation=h.incarnation if h else "", health_stale=self.stale, devices=len(self.offered),
            unhealthy=sum(d.health != HEALTHY for d in self.offered.values()),
            claims=[e.state() for e in self.checkpoint.entries.values()], prepares=self.prepares,
            prepare_failures=self.prepare_failures, unprepares=self.unprepares, health_streams=self.health_streams,
            last_error=self.last_error, checkpoint_error=self.checkpoint_error, slices=self.slices))


# -- gRPC servicers: thin, the plugin does the work ------------------------------------------------

def _refs(claims: Iterable[Any]) -> list[ClaimRef]:
    return [ClaimRef(c.namespace, c.uid, c.name) for c in claims]


async def _too_many(claims: Any, context: grpc.aio.ServicerContext) -> None:
    if len(claims) > MAX_CLAIMS_PER_CALL:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{len(claims)} claims in one call; a pod has at most {MAX_CLAIMS_PER_CALL}")


def _fill(pb: Any, results: dict[str, Result]) -> Any:
    """A NodePrepareResourcesResponse of the API version module `pb` (v1 and v1beta1 are the same messages)."""
    resp = pb.NodePrepareResourcesResponse()
    for uid, r in results.items():
        entry = resp.claims[uid]
        if r.error:
            entry.error = r.error
            continue
        for d in r.devices:
            entry.devices.add(request_names=list(d.requests), pool_name=d.pool, device_name=d.name,
                              cdi_device_ids=list(d.cdi_ids))
    return resp


class NodeV1(v1_grpc.DRAPluginServicer):
    def __init__(self, plugin: DraPlugin) -> None:
        self.plugin = plugin

    async def NodePrepareResources(self, request: v1.NodePrepareResourcesRequest,
                                   context: grpc.aio.ServicerContext) -> v1.NodePrepareResourcesResponse:
        await _too_many(request.claims, context)
        return _fill(v1, await self.plugin.prepare(_refs(request.claims)))  # type: ignore[no-any-return]

    async def NodeUnprepareResources(self, request: v1.NodeUnprepareResourcesRequest,
                                     context: grpc.aio.ServicerContext) -> v1.NodeUnprepareResourcesResponse:
        await _too_many(request.claims, context)
        resp = v1.NodeUnprepareResourcesResponse()
        for uid, error in (await self.plugin.unprepare(_refs(request.claims))).items():
            resp.claims[uid].error = error
        return resp


class NodeV1beta1(v1beta1_grpc.DRAPluginServicer):
    def __init__(self, plugin: DraPlugin) -> None:
        self.plugin = plugin

    async def NodePrepareResources(self, request: v1beta1.NodePrepareResourcesRequest,
                                   context: grpc.aio.ServicerContext) -> v1beta1.NodePrepareResourcesResponse:
        await _too_many(request.claims, context)
        return _fill(v1beta1, await self.plugin.prepare(_refs(request.claims)))  # type: ignore[no-any-return]

    async def NodeUnprepareResources(self, request: v1beta1.NodeUnprepareResourcesRequest,
                                     context: grpc.aio.ServicerContext) -> v1beta1.NodeUnprepareResourcesResponse:
        await _too_many(request.claims, context)
        resp = v1beta1.NodeUnprepareResourcesResponse()
        for uid, error in (await self.plugin.unprepare(_refs(request.claims))).items():
            resp.claims[uid].error = error
        return resp


class Health(health_grpc.DRAResourceHealthServicer):
    def __init__(self, plugin: DraPlugin) -> None:
        self.plugin = plugin

    async def NodeWatchResources(self, request: health_pb.NodeWatchResourcesRequest,
                                 context: grpc.aio.ServicerContext) -> HealthUpdates:
        async for resp in self.plugin.watch_health(context):
            yield resp


class Registration(reg_grpc.RegistrationServicer):
    def __init__(self, plugin: DraPlugin) -> None:
        self.plugin = plugin

    async def GetInfo(self, request: reg_pb.InfoRequest, context: grpc.aio.ServicerContext) -> reg_pb.PluginInfo:
        return self.plugin.info()

    async def NotifyRegistrationStatus(self, request: reg_pb.RegistrationStatus,
                                       context: grpc.aio.ServicerContext) -> reg_pb.RegistrationStatusResponse:
        self.plugin.notified(request.plugin_registered, request.error)
        return reg_pb.RegistrationStatusResponse()

