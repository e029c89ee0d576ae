"""The kubelet's DRA side, for tests: its plugin watcher, its DRA plugin manager and its health cache,
behaving as the kubelet does (pkg/kubelet/pluginmanager, pkg/kubelet/cm/dra, Kubernetes 1.34).

- Plugin watcher: watches the registry directory (inotify), and at start and after a restart takes every
  socket already there. A socket whose name starts with "." or that is not a socket is ignored. For each,
  it dials (10 s), calls GetInfo (1 s), looks up the handler of the type (only "DRAPlugin" here), which
  validates the name and the services listed, registers, and then calls NotifyRegistrationStatus
  (registered, or not with the kubelet's error text). A socket removed deregisters its plugin; a socket
  re-created (another file) is a new registration.
- DRA plugin manager: of the services the plugin lists, the first the kubelet speaks (v1.DRAPlugin,
  v1beta1.DRAPlugin) is the one it calls; an endpoint already registered for the driver is refused. One
  channel per plugin, which gRPC reconnects by itself. NodePrepareResources and NodeUnprepareResources
  with claim references (namespace, UID, name), 45 s per call.
- Health (ResourceHealthStatus): NodeWatchResources (v1alpha1.DRAResourceHealth) opened at registration
  and again `retry_s` after it ends (the kubelet: 5 s); every device in a message is stamped with the
  time it arrived, and one not heard of for 30 s reads Unknown.
- Restart: every connection dropped, every registration and health record forgotten, then the directory
  taken again as at start (the plugins' sockets stay: the kubelet removes none of them).

Development tool only: the product never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.fswatch import DirWatcher, file_id
from common.pb.dra.v1 import api_pb2 as v1
from common.pb.dra.v1 import api_pb2_grpc as v1_grpc
from common.pb.dra.v1beta1 import api_pb2 as v1beta1
from common.pb.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from common.pb.drahealth.v1alpha1 import api_pb2 as health_pb
from common.pb.drahealth.v1alpha1 import api_pb2_grpc as health_grpc
from common.pb.pluginregistration.v1 import api_pb2 as reg_pb
from common.pb.pluginregistration.v1 import api_pb2_grpc as reg_grpc

log = logging.getLogger(__name__)

DRA_TYPE = "DRAPlugin"
SPEAKS = ("v1.DRAPlugin", "v1beta1.DRAPlugin")  # the kubelet's DRA services, most recent first
HEALTH_SERVICE = "v1alpha1.DRAResourceHealth"
DIAL_S = 10.0
INFO_S = 1.0
NOTIFY_S = 5.0
CALL_S = 45.0
HEALTH_TIMEOUT_S = 30.0
HEALTH_NAMES = {health_pb.HEALTHY: "Healthy", health_pb.UNHEALTHY: "Unhealthy", health_pb.UNKNOWN: "Unknown"}
# A channel of its own connections, as each of the kubelet's Go ClientConns: grpc-python shares connections
# to one target between channels by default, so a new plugin's channel would inherit the dead one's backoff.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class Notice:
    """One registration attempt, as the kubelet decided it."""

    socket: str
    driver: str
    endpoint: str
    service: str  # the DRA service chosen; "" when refused
    registered: bool
    error: str
    at: float


@dataclass
class Plugin:
    driver: str
    socket: str
    socket_id: str
    endpoint: str
    service: str
    services: list[str]
    channel: grpc.aio.Channel
    health_task: asyncio.Task[None] | None = None
    health_streams: int = 0  # streams opened so far


@dataclass
class DeviceHealth:
    health: str
    at: float  # monotonic time the kubelet received it


@dataclass
class DraKubelet:
    registry_dir: Path
    retry_s: float = 0.1  # the kubelet's 5 s, short for tests
    notices: list[Notice] = field(default_factory=list)
    plugins: dict[str, list[Plugin]] = field(default_factory=dict)  # driver -> its registered plugins
    health: dict[tuple[str, str, str], DeviceHealth] = field(default_factory=dict)  # (driver, pool, device)
    health_messages: int = 0
    _watcher: DirWatcher | None = None
    _task: asyncio.Task[None] | None = None

    # -- plugin watcher ---------------------------------------------------------------------
    async def start(self) -> None:
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        self._watcher = DirWatcher(self.registry_dir, create=True)
        self._watcher.start()
        await self._scan(None)
        self._task = asyncio.create_task(self._watch(), name="dra-plugin-watcher")

    async def _watch(self) -> None:
        assert self._watcher is not None
        while True:
            names = await self._watcher.next(timeout=1.0)
            if names:
                await self._scan(None if "" in names else names)

    async def _scan(self, names: set[str] | None) -> None:
        """Registers new sockets and deregisters gone ones among `names` (None: the whole directory)."""
        paths = [self.registry_dir / n for n in names] if names is not None else list(self.registry_dir.iterdir())
        known = {p.socket: p for ps in self.plugins.values() for p in ps}
        if names is None:
            paths += [Path(s) for s in known if Path(s) not in paths]
        for path in paths:
            current = file_id(path) if _is_socket(path) and not path.name.startswith(".") else ""
            held = known.get(str(path))
            if held is not None and held.socket_id != current:
                await self._deregister(held)
            if current and (held is None or held.socket_id != current):
                await self._register(path, current)

    async def _register(self, path: Path, socket_id: str) -> None:
        target = f"unix:{path}"
        channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        try:
            async with asyncio.timeout(DIAL_S):
                await channel.channel_ready()
            stub = reg_grpc.RegistrationStub(channel)
            info: reg_pb.PluginInfo = await stub.GetInfo(reg_pb.InfoRequest(), timeout=INFO_S)
            error, service = self._validate(info, str(path))
            endpoint = info.endpoint or str(path)
            if not error:
                self._add(Plugin(info.name, str(path), socket_id, endpoint, service, list(info.supported_versions),
                                 grpc.aio.insecure_channel(f"unix:{endpoint}", options=CHANNEL_OPTIONS)))
            await stub.NotifyRegistrationStatus(reg_pb.RegistrationStatus(plugin_registered=not error, error=error),
                                                timeout=NOTIFY_S)
            self.notices.append(Notice(str(path), info.name, endpoint, service, not error, error, time.monotonic()))
            log.info("registration of %s at %s: %s", info.name, path, error or f"registered ({service})")
        except (grpc.RpcError, TimeoutError) as e:
            log.warning("registration at %s failed: %s", path, e)
            self.notices.append(Notice(str(path), "", "", "", False, f"RegisterPlugin error: {e}", time.monotonic()))
        finally:
            await channel.close()

    def _validate(self, info: reg_pb.PluginInfo, socket: str) -> tuple[str, str]:
        """(the kubelet's error, "" when valid; the DRA service it will call)."""
        if info.type != DRA_TYPE:
            return f"RegisterPlugin error -- no handler registered for plugin type: {info.type} at socket {socket}", ""
        if not info.name:
            return "RegisterPlugin error -- plugin validation failed with err: DRA driver name is empty", ""
        chosen = next((s for s in info.supported_versions if s in SPEAKS), "")
        if not chosen:
            return ("RegisterPlugin error -- plugin validation failed with err: none of services supported by the "
                    f"plugin ({list(info.supported_versions)}) are supported by the kubelet ({list(SPEAKS)})"), ""
        endpoint = info.endpoint or socket
        if any(p.endpoint == endpoint for p in self.plugins.get(info.name, [])):
            return f"endpoint {endpoint} already registered for DRA driver plugin {info.name}", ""
        return "", chosen

    def _add(self, plugin: Plugin) -> None:
        self.plugins.setdefault(plugin.driver, []).append(plugin)
        plugin.health_task = asyncio.create_task(self._health_stream(plugin), name=f"health-{plugin.driver}")

    async def _deregister(self, plugin: Plugin) -> None:
        log.info("plugin %s at %s deregistered", plugin.driver, plugin.socket)
        plugins = self.plugins.get(plugin.driver, [])
        if plugin in plugins:
            plugins.remove(plugin)
        if not plugins:
            self.plugins.pop(plugin.driver, None)
        await self._close(plugin)

    @staticmethod
    async def _close(plugin: Plugin) -> None:
        if plugin.health_task is not None:
            plugin.health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await plugin.health_task
        await plugin.channel.close()

    # -- health -----------------------------------------------------------------------------
    async def _health_stream(self, plugin: Plugin) -> None:
        stub = health_grpc.DRAResourceHealthStub(plugin.channel)
        while True:
            try:
                plugin.health_streams += 1
                async for resp in stub.NodeWatchResources(health_pb.NodeWatchResourcesRequest()):
                    now = time.monotonic()
                    self.health_messages += 1
                    for d in resp.devices:
                        key = (plugin.driver, d.device.pool_name, d.device.device_name)
                        self.health[key] = DeviceHealth(HEALTH_NAMES.get(d.health, "Unknown"), now)
            except grpc.RpcError as e:
                log.info("health stream of %s ended: %s", plugin.driver, e.code())
            await asyncio.sleep(self.retry_s)  # the kubelet's wait before it opens the stream again

    def device_health(self, driver: str, pool: str, device: str) -> str:
        """What the kubelet would put in a pod's status for this device."""
        held = self.health.get((driver, pool, device))
        if held is None or time.monotonic() - held.at > HEALTH_TIMEOUT_S:
            return "Unknown"
        return held.health

    # -- claims -----------------------------------------------------------------------------
    def plugin(self, driver: str) -> Plugin:
        """The plugin the kubelet calls: the most recently registered."""
        plugins = self.plugins.get(driver)
        if not plugins:
            raise LookupError(f"DRA driver {driver} is not registered")
        return plugins[-1]

    @staticmethod
    def _pb(plugin: Plugin) -> tuple[Any, Any]:
        if plugin.service == "v1.DRAPlugin":
            return v1, v1_grpc.DRAPluginStub(plugin.channel)
        return v1beta1, v1beta1_grpc.DRAPluginStub(plugin.channel)

    async def prepare(self, driver: str, claims: list[tuple[str, str, str]]) -> Any:
        """NodePrepareResources of (namespace, uid, name) claims; the response (of the service chosen)."""
        plugin = self.plugin(driver)
        pb, stub = self._pb(plugin)
        request = pb.NodePrepareResourcesRequest(claims=[pb.Claim(namespace=n, uid=u, name=m) for n, u, m in claims])
        return await stub.NodePrepareResources(request, timeout=CALL_S)

    async def unprepare(self, driver: str, claims: list[tuple[str, str, str]]) -> Any:
        plugin = self.plugin(driver)
        pb, stub = self._pb(plugin)
        request = pb.NodeUnprepareResourcesRequest(claims=[pb.Claim(namespace=n, uid=u, name=m) for n, u, m in claims])
        return await stub.NodeUnprepareResources(request, timeout=CALL_S)

    # -- lifecycle --------------------------------------------------------------------------
    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        for plugins in list(self.plugins.values()):
            for p in plugins:
                await self._close(p)
        self.plugins.clear()

    async def restart(self) -> None:
        """The kubelet restarts: connections dropped, registrations and health forgotten, sockets taken again."""
        await self.stop()
        self.health.clear()
        await self.start()


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False
