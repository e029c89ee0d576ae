"""The pod's Prometheus metrics, served by the kube-agent from the buses (METRICS_PORT; 0: off).

Why here: one endpoint for the pod covers every process, since every process publishes its complete
state on its bus; none of them opens a TCP listener or imports a metrics library, and a service that
restarts is seen restarting instead of taking its endpoint away.

Per-device series carry DCGM exporter's label names and values (`gpu`, `UUID`, `pci_bus_id`,
`device`, `modelName`, on MIG devices `GPU_I_PROFILE` and `GPU_I_ID`, and `Hostname`; as DCGM's
collector writes them: a MIG device is named by its GPU's index, UUID, bus ID, device node and
model, plus its GPU instance), so that a PromQL join with DCGM's series needs no relabelling:
`DCGM_FI_DEV_XID_ERRORS * on(UUID) group_left gpu_plugin_device_healthy{GPU_I_ID=""}`. Ours beside
them: `mig_uuid` on MIG devices (two compute instances of one GPU instance are two devices here).

Counters are the counting process's own, as if it served them itself: the health-monitor's per-device
XID and ECC counts, the plugin-server's calls, the registrar's registrations and the services' config
reloads come in their states and restart from 0 when that service restarts, which Prometheus' rate()
and increase() take as a counter reset. Nothing is accumulated here, so a kube-agent restart changes
none of them. What only the kube-agent counts (XIDs by code and health transitions, from the
health-monitor's events; service restarts, from the states' incarnations) is counted from its start.

The text format is written here (a few families, no client library): the kube-agent imports nothing
for it and renders it per scrape from the last states, which the bus keeps current.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from common.bus.messages import (
    HEALTH_SOCKET,
    HEALTHY,
    KUBE_SOCKET,
    MPS_SOCKET,
    PLUGIN_SOCKET,
    REGISTRAR_SOCKET,
    ConfigInfo,
    DeviceState,
    HealthEvent,
    HealthState,
    KubeState,
    Message,
    MpsState,
    PluginState,
    RegistrarState,
    StateMessage,
)
from common.bus.sockets import BusSubscriber
from common.settings import Settings
from common.version import VERSION
from services.kube_agent.board import CONFIG_PART, HEALTH_PART

log = logging.getLogger(__name__)

# DCGM exporter's label names (internal/pkg/collector: its metric template and toMetric), verbatim.
GPU = "gpu"
UUID = "UUID"
PCI_BUS_ID = "pci_bus_id"
DEVICE = "device"
MODEL_NAME = "modelName"
GPU_I_PROFILE = "GPU_I_PROFILE"
GPU_I_ID = "GPU_I_ID"
HOSTNAME = "Hostname"
MIG_UUID = "mig_uuid"  # ours

# DCGM exporter's Hostname: NODE_NAME where set (a DaemonSet sets it from spec.nodeName), else the host name.
NODE_NAME = "NODE_NAME"

# Each bus by the first word of its topics; the endpoint every pod has come first (their silence shows
# from the start), MPS and the kube-agent's own only where they run.
BUSES = {"health": HEALTH_SOCKET, "plugin": PLUGIN_SOCKET, "registrar": REGISTRAR_SOCKET, "mps": MPS_SOCKET,
         "kube": KUBE_SOCKET}
ALWAYS = ("health", "plugin", "registrar")
TOPICS = (HealthState.TOPIC, HealthEvent.TOPIC, PluginState.TOPIC, RegistrarState.TOPIC, MpsState.TOPIC,
          KubeState.TOPIC)
SERVICE_OF = {HealthState.TOPIC: "health-monitor", PluginState.TOPIC: "plugin-server",
              RegistrarState.TOPIC: "registrar", MpsState.TOPIC: "mps-control"}
KUBELET_STATES = ("absent", "present", "refusing")
CONDITION_STATUSES = ("True", "False", "Unknown")
# Series counted from events, per family: a flood of XID codes or device names costs this many at most;
# what comes beyond is counted under xid="other" (by code: on the device where the node has it, else
# under UUID="other") or not at all (per device).
MAX_EVENT_SERIES = 4096
OTHER = -1
OTHER_DEVICE = "other"

# The HTTP side: a scraper's request is a line and a few headers.
MAX_REQUEST_BYTES = 8192
HEAD_TIMEOUT_S = 5.0  # a scraper sends its request at once: a connection silent this long is closed
IO_TIMEOUT_S = 10.0  # the answer written whole
# Connections held at once. When full, a new one takes the place of the oldest that has not sent its
# request yet (idle connections, or a client that connects and waits, must not lock scrapers out);
# only when every one is being answered is the new one closed unanswered.
MAX_CLIENTS = 16
BIND_RETRY_S = 10.0  # a port another process holds is tried again this often
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float]
K = TypeVar("K")


def hostname_of(environ: Mapping[str, str]) -> str:
    return environ.get(NODE_NAME) or socket.gethostname()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _series(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{pairs}}} {_number(value)}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class Exposition:
    """Prometheus' text format (0.0.4), one family after another; empty families are left out."""

    lines: list[str] = field(default_factory=list)

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        rows = [_series(name, labels, value) for labels, value in samples]
        if rows:
            self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *rows]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Collector:
    """What the buses said, as metrics: fed with each message (`observe`), read by each scrape (`render`).

    Plain code, no sockets: the states are kept as they came (the last of each topic) and the series
    built from them at scrape time; only the counts of events and incarnations are kept here.
    """

    def __init__(self, hostname: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._hostname = hostname
        self._now = monotonic
        self._started = monotonic()
        self.health: HealthState | None = None
        self._inventory: frozenset[str] = frozenset()  # the devices the last health state lists
        self.plugin: PluginState | None = None
        self.registrar: RegistrarState | None = None
        self.mps: MpsState | None = None
        self.kube: KubeState | None = None
        self.dropped = 0  # bus payloads the kube-agent's own subscriber refused
        self._heard: dict[str, float] = {}  # bus -> when its last message came (monotonic)
        self._incarnation: dict[str, str] = {}  # service -> the incarnation last seen
        self.restarts: dict[str, int] = {}  # service -> incarnations that followed another
        self._xids: dict[tuple[str, int, str], int] = {}  # (device, XID or OTHER, verdict) -> count
        self._last_xid: dict[str, int] = {}  # device -> the last XID seen on it
        self._transitions: dict[tuple[str, str], int] = {}  # (device, health it went to) -> count

    # -- in ---------------------------------------------------------------------------
    def observe(self, msg: Message) -> None:
        self._heard[msg.TOPIC.split(".", 1)[0]] = self._now()
        if isinstance(msg, StateMessage):
            self._count_restart(msg)
        if isinstance(msg, HealthState):
            if self.health is None or msg.devices is not self.health.devices:
                self._inventory = frozenset(d.id for d in msg.devices)
            self.health = msg
        elif isinstance(msg, HealthEvent):
            self._event(msg)
        elif isinstance(msg, PluginState):
            self.plugin = msg
        elif isinstance(msg, RegistrarState):
            self.registrar = msg
        elif isinstance(msg, MpsState):
            self.mps = msg
        elif isinstance(msg, KubeState):
            self.kube = msg

    def _count_restart(self, msg: StateMessage) -> None:
        service = SERVICE_OF.get(msg.TOPIC)
        if service is None or not msg.incarnation:
            return
        last = self._incarnation.get(service)
        if last != msg.incarnation:
            self._incarnation[service] = msg.incarnation
            self.restarts[service] = self.restarts.get(service, 0) + (last is not None)

    def _event(self, event: HealthEvent) -> None:
        # An XID naming no device hits every GPU (NVIDIA's rule, and the monitor's own count).
        if event.device:
            devices = [event.device]
        elif self.health is not None:
            devices = [d.id for d in self.health.devices if d.kind == "gpu"]
        else:
            devices = []
        for device in devices:
            if event.event == "xid":
                # Past the bound, an overflow key per device only for the node's own devices (a bounded
                # inventory): a flood of device names must not add one per name.
                overflow = device if device in self._inventory else OTHER_DEVICE
                self._bump(self._xids, (device, event.xid, event.reason), (overflow, OTHER, event.reason))
                if device in self._last_xid or len(self._last_xid) < MAX_EVENT_SERIES:
                    self._last_xid[device] = event.xid
            elif event.event == "transition" and event.new:
                self._bump(self._transitions, (device, event.new), None)

    @staticmethod
    def _bump(counts: dict[K, int], key: K, overflow: K | None) -> None:
        if key not in counts and len(counts) >= MAX_EVENT_SERIES:
            if overflow is None:
                return
            key = overflow
        counts[key] = counts.get(key, 0) + 1

    # -- out --------------------------------------------------------------------------
    def render(self) -> str:
        out = Exposition()
        host = ((HOSTNAME, self._hostname),)
        out.family("gpu_plugin_build_info", "gauge", "The gpu-device-plugin version serving these metrics",
                   [((("version", VERSION), *host), 1)])
        self._devices(out)
        self._plugin(out)
        self._registrar(out)
        self._config(out)
        self._node_health(out)
        self._mps(out)
        now = self._now()
        buses = [*ALWAYS, *(b for b in BUSES if b not in ALWAYS and b in self._heard)]
        out.family("gpu_plugin_bus_message_age_seconds", "gauge",
                   "Seconds since the last message of each bus (each re-sends its state every "
                   "GPU_PLUGIN_STALE_AFTER/3, 5 s by default, and at once on a change; since the kube-agent's start "
                   "for a bus not heard yet)",
                   [((("bus", b), *host), now - self._heard.get(b, self._started)) for b in buses])
        out.family("gpu_plugin_service_restarts_total", "counter",
                   "Service restarts seen by the kube-agent (a new incarnation on its bus) since it started",
                   [((("service", s), *host), n) for s, n in sorted(self.restarts.items())])
        dropped = [((("subscriber", "kube-agent"), *host), self.dropped)]
        if self.plugin is not None:
            dropped.append(((("subscriber", "plugin-server"), *host), self.plugin.bus_dropped))
        out.family("gpu_plugin_bus_messages_dropped_total", "counter",
                   "Bus payloads a subscriber refused (malformed, unknown topic, other schema version)", dropped)
        return out.text()

    def _device_labels(self, device: str, by_id: Mapping[str, DeviceState]) -> Labels:
        """DCGM exporter's labels of a device: a MIG device by its GPU's index, UUID, bus ID, node and model."""
        dev = by_id.get(device)
        if dev is None:  # named by an event the last state does not list
            return ((UUID, device), (HOSTNAME, self._hostname))
        gpu = by_id.get(dev.parent) if dev.kind == "mig" else dev
        if gpu is None:  # a MIG device whose GPU the state lacks: its own facts
            gpu = DeviceState(id=dev.parent, kind="gpu", index=dev.index.split(":", 1)[0], name=dev.name,
                              health=dev.health, reason="", since=0.0, pci_bus_id=dev.pci_bus_id)
        # DCGM names the node by its GPU ID, the NVML index (not the minor number, where they differ).
        labels = [(GPU, gpu.index), (UUID, gpu.id), (PCI_BUS_ID, gpu.pci_bus_id), (DEVICE, f"nvidia{gpu.index}"),
                  (MODEL_NAME, gpu.name)]
        if dev.kind == "mig":
            labels += [(GPU_I_PROFILE, dev.profile), (GPU_I_ID, str(dev.gpu_instance_id))]
        labels.append((HOSTNAME, self._hostname))
        if dev.kind == "mig":
            labels.append((MIG_UUID, dev.id))
        return tuple(labels)

    def _devices(self, out: Exposition) -> None:
        state = self.health
        devices = state.devices if state is not None else []
        by_id = {d.id: d for d in devices}
        labels = {d.id: self._device_labels(d.id, by_id) for d in devices}

        def of(device: str) -> Labels:
            return labels.get(device) or self._device_labels(device, by_id)

        if state is not None:
            out.family("gpu_plugin_nvml_ok", "gauge", "1 while the health-monitor can use NVML",
                       [(((HOSTNAME, self._hostname),), 1 if state.nvml_ok else 0)])
        out.family("gpu_plugin_device_healthy", "gauge", "1 while the device is Healthy (schedulable)",
                   [(labels[d.id], 1 if d.health == HEALTHY else 0) for d in devices])
        out.family("gpu_plugin_device_cordoned", "gauge", "1 while an operator's cordon holds the device",
                   [(labels[d.id], 1 if d.cordoned else 0) for d in devices])
        out.family("gpu_plugin_device_health_since_timestamp_seconds", "gauge",
                   "Unix time of the device's last health change (its discovery, when none)",
                   [(labels[d.id], d.since) for d in devices])
        out.family("gpu_plugin_device_xid_errors_total", "counter",
                   "XID errors on the device since the health-monitor started, any verdict",
                   [(labels[d.id], d.xid_count) for d in devices])
        out.family("gpu_plugin_device_ecc_errors_total", "counter",
                   "ECC error events on the device since the health-monitor started (type: sbe corrected, "
                   "dbe uncorrected)",
                   [((*labels[d.id], ("type", kind)), n) for d in devices
                    for kind, n in (("sbe", d.sbe_count), ("dbe", d.dbe_count))])
        out.family("gpu_plugin_device_xid_by_code_total", "counter",
                   "XID errors by code and the health policy's verdict, seen since the kube-agent started "
                   "(the device the driver's event named)",
                   [((*of(dev), ("xid", "other" if xid == OTHER else str(xid)), ("verdict", verdict)), n)
                    for (dev, xid, verdict), n in sorted(self._xids.items())])
        out.family("gpu_plugin_device_last_xid", "gauge",
                   "The last XID seen on the device since the kube-agent started (DCGM_FI_DEV_XID_ERRORS' meaning)",
                   [(of(dev), xid) for dev, xid in sorted(self._last_xid.items())])
        out.family("gpu_plugin_device_health_transitions_total", "counter",
                   "Health changes of the device by the health it went to, seen since the kube-agent started",
                   [((*of(dev), ("to", to)), n) for (dev, to), n in sorted(self._transitions.items())])

    def _plugin(self, out: Exposition) -> None:
        state = self.plugin
        if state is None:
            return
        host = ((HOSTNAME, self._hostname),)
        out.family("gpu_plugin_health_state_stale", "gauge",
                   "1 while the plugin-server serves the last health state because the health bus went silent",
                   [(host, 1 if state.health_stale else 0)])
        eps = sorted(state.endpoints, key=lambda e: e.resource)
        out.family("gpu_plugin_resource_devices", "gauge", "Devices the resource lists to the kubelet",
                   [((("resource", e.resource), *host), e.total) for e in eps])
        out.family("gpu_plugin_resource_healthy_devices", "gauge", "Healthy devices the resource lists to the kubelet",
                   [((("resource", e.resource), *host), e.healthy) for e in eps])
        out.family("gpu_plugin_listandwatch_streams", "gauge", "Open ListAndWatch streams (the kubelet's and others')",
                   [((("resource", e.resource), *host), e.streams) for e in eps])
        out.family("gpu_plugin_grpc_calls_total", "counter",
                   "DevicePlugin calls by resource, method and gRPC status code since the plugin-server started "
                   "(ListAndWatch: streams opened, OK, or refused)",
                   [((("resource", c.resource), ("method", c.method), ("code", c.code), *host), c.count)
                    for c in state.calls])

    def _registrar(self, out: Exposition) -> None:
        state = self.registrar
        if state is None:
            return
        host = ((HOSTNAME, self._hostname),)
        out.family("gpu_plugin_kubelet_state", "gauge",
                   "The kubelet as the registrar sees it: 1 for the current state (absent, present, refusing)",
                   [((("state", s), *host), 1 if state.kubelet == s else 0) for s in KUBELET_STATES])
        # One sample per resource. The registrar lists a registration with the kubelet it was made with,
        # and keeps it while that kubelet is away or replaced, with the resource pending for the next:
        # a sample per list would be the same series twice (a scrape Prometheus refuses whole).
        pending = set(state.pending)
        current = {r.resource for r in state.registrations if state.kubelet_id and r.kubelet_id == state.kubelet_id}
        resources = sorted({r.resource for r in state.registrations} | pending)
        out.family("gpu_plugin_resource_registered", "gauge",
                   "1 while the resource is registered with the kubelet now there, 0 while pending (or registered "
                   "only with a kubelet that went away)",
                   [((("resource", r), *host), 1 if r in current and r not in pending else 0) for r in resources])
        out.family("gpu_plugin_registrations_total", "counter",
                   "Registers the kubelet accepted since the registrar started", [(host, state.registers)])
        out.family("gpu_plugin_registration_failures_total", "counter",
                   "Registers that failed since the registrar started", [(host, state.register_failures)])
        out.family("gpu_plugin_kubelet_restarts_total", "counter",
                   "Kubelet restarts the registrar saw (kubelet.sock re-created) since it started",
                   [(host, state.kubelet_restarts)])

    def _config(self, out: Exposition) -> None:
        host = ((HOSTNAME, self._hostname),)
        configs: list[tuple[str, ConfigInfo]] = []
        if self.health is not None:
            configs.append(("health-monitor", self.health.config))
        if self.plugin is not None:
            configs.append(("plugin-server", self.plugin.config))
        out.family("gpu_plugin_config_info", "gauge",
                   "The config each service runs on: digest is the sha256 (12 hex) of its content, \"\" without one",
                   [((("service", s), ("digest", c.digest), *host), 1) for s, c in configs])
        out.family("gpu_plugin_config_reloads_total", "counter", "Config reloads applied since the service started",
                   [((("service", s), *host), c.reloads) for s, c in configs])
        out.family("gpu_plugin_config_reload_failures_total", "counter",
                   "New config contents refused since the service started (the previous config kept running)",
                   [((("service", s), *host), c.refusals) for s, c in configs])
        out.family("gpu_plugin_config_refused", "gauge",
                   "1 while the service runs on its previous config because the newest content was refused",
                   [((("service", s), *host), 1 if c.refused else 0) for s, c in configs])
        # The per-node configuration's, only where it runs: without it the kube bus's api_reachable is
        # False and its config "", which would read as an API away and the empty config selected.
        if self.kube is not None and CONFIG_PART in self.kube.parts:
            kube = self.kube
            out.family("gpu_plugin_kube_api_reachable", "gauge", "1 while the kube-agent reads its Node from the API",
                       [(host, 1 if kube.api_reachable else 0)])
            out.family("gpu_plugin_config_selected_info", "gauge",
                       "The config the node label selects (config \"\": the empty config) and its content's digest",
                       [((("config", kube.config), ("digest", kube.digest), *host), 1)])

    def _node_health(self, out: Exposition) -> None:
        """Node health's own fields of the kube bus (HEALTH_NODE_CONDITION, HEALTH_NODE_EVENTS), where it runs."""
        kube = self.kube
        if kube is None or HEALTH_PART not in kube.parts:
            return
        host = ((HOSTNAME, self._hostname),)
        out.family("gpu_plugin_node_condition", "gauge",
                   "The Node's GPUUnhealthy condition as the kube-agent last wrote it: 1 for its status (True, False, "
                   "Unknown), all 0 before the first write (or with the condition off)",
                   [((("status", s), *host), 1 if kube.node_condition == s else 0) for s in CONDITION_STATUSES])
        if kube.node_condition:
            out.family("gpu_plugin_node_condition_reason_info", "gauge",
                       "The reason of the GPUUnhealthy condition last written (XidError, GpuLost, AllGPUsHealthy, ...)",
                       [((("status", kube.node_condition), ("reason", kube.node_condition_reason), *host), 1)])
        out.family("gpu_plugin_node_events_written_total", "counter",
                   "Event creates and count updates the API took since the kube-agent started",
                   [(host, kube.node_events_written)])
        out.family("gpu_plugin_node_events_pending", "gauge",
                   "Events waiting for the API or for their device's rate limit", [(host, kube.node_events_pending)])
        out.family("gpu_plugin_node_events_dropped_total", "counter",
                   "Events given up since the kube-agent started: refused by the API, or pushed out of the full queue",
                   [(host, kube.node_events_dropped)])
        out.family("gpu_plugin_node_health_write_failing", "gauge",
                   "1 while the last write of the condition or of an Event failed (the reason: gpu-plugin status, the "
                   "kube-agent's log); retried meanwhile", [(host, 1 if kube.node_health_error else 0)])

    def _mps(self, out: Exposition) -> None:
        if self.mps is None:
            return
        host = ((HOSTNAME, self._hostname),)
        daemons = sorted(self.mps.daemons, key=lambda d: d.resource)
        out.family("gpu_plugin_mps_daemon_ready", "gauge",
                   "1 while the resource's MPS daemon is up with its limits set",
                   [((("resource", d.resource), *host), 1 if d.ready else 0) for d in daemons])
        out.family("gpu_plugin_mps_daemon_restarts_total", "counter",
                   "Restarts of the resource's MPS daemon since mps-control started",
                   [((("resource", d.resource), *host), d.restarts) for d in daemons])


class Metrics:
    """The kube-agent's metrics part: every bus in, Prometheus' text format out on METRICS_PORT.

    The port is served on every address of both families (address None; a pod in an IPv6 or
    dual-stack cluster is scraped on its IPv6 address): IPv4's 0.0.0.0 and, on a socket of its own,
    IPv6's [::]. A port that cannot be bound on IPv4 (another process holds it) is said once and
    tried again every BIND_RETRY_S; the buses are followed meanwhile and the rest of the kube-agent
    runs on. IPv6 that cannot be had (off in the kernel or the pod, or its port taken) is said once
    and left out: the IPv4 listener serves on.
    """

    def __init__(self, settings: Settings, *, address: str | None = None, hostname: str | None = None,
                 bind_retry_s: float = BIND_RETRY_S) -> None:
        self.port = settings.metrics_port
        self._address = address
        self._bind_retry_s = bind_retry_s
        self.collector = Collector(hostname or hostname_of(os.environ))
        self._paths = [settings.bus_path(name) for name in BUSES.values()]
        self._sub: BusSubscriber | None = None
        self._servers: list[asyncio.Server] = []
        self._conns: dict[asyncio.StreamWriter, bool] = {}  # the connections held -> waiting for their request
        self.listening = asyncio.Event()  # set once the port is bound

    async def run(self) -> None:
        """Follows the buses and serves the port until cancelled."""
        sub = self._sub = BusSubscriber(self._paths, TOPICS)
        listener = asyncio.create_task(self._listen(), name="metrics-listen")
        try:
            while True:
                # recv lets the loop run during a flood (the scrapes, the other parts)
                msg = await sub.recv()
                self.collector.observe(msg)
                self.collector.dropped = sub.dropped
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            self.close()

    async def _listen(self) -> None:
        failed = False
        while True:
            try:
                server = await asyncio.start_server(self._answer, self._address or "0.0.0.0", self.port,
                                                    limit=MAX_REQUEST_BYTES, reuse_address=True)
            except OSError as e:
                if not failed:
                    log.error("metrics: cannot listen on port %d: %s; trying again every %.0f s", self.port,
                              e.strerror or e, self._bind_retry_s)
                failed = True
                await asyncio.sleep(self._bind_retry_s)
                continue
            self._servers = [server]
            where = [f"http://{self._address or '0.0.0.0'}:{self.port}/metrics"]
            if self._address is None:
                try:
                    self._servers.append(await asyncio.start_server(self._answer, sock=self._ipv6_socket(),
                                                                    limit=MAX_REQUEST_BYTES))
                    where.append(f"http://[::]:{self.port}/metrics")
                except OSError as e:
                    log.warning("metrics: not on IPv6 (port %d: %s); serving IPv4 only", self.port, e.strerror or e)
            log.info("metrics: serving %s", " and ".join(where))
            self.listening.set()
            return

    def _ipv6_socket(self) -> socket.socket:
        """[::]:port for IPv6 alone (IPV6_V6ONLY: IPv4 has its own listener, which a dual-stack socket
        would conflict with), bound; OSError where IPv6 is off (EAFNOSUPPORT, EADDRNOTAVAIL) or the
        port is taken on it."""
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", self.port))
        except OSError:
            sock.close()
            raise
        return sock

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_CLIENTS and not self._evict_idle():
            writer.close()
            return
        self._conns[writer] = True
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if writer not in self._conns:
                return  # closed for a newer connection as its request came
            self._conns[writer] = False
            async with asyncio.timeout(IO_TIMEOUT_S):
                writer.write(self._response(head.split(b"\r\n", 1)[0]))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sends too much, too slowly or not at all gets nothing more
        finally:
            self._conns.pop(writer, None)
            writer.close()

    def _evict_idle(self) -> bool:
        """Closes the oldest connection still waiting for its request, making room for a new one
        (its read ends at once); False when every connection held is being answered."""
        for writer, waiting in self._conns.items():
            if waiting:
                del self._conns[writer]
                writer.close()
                return True
        return False

    def _response(self, request_line: bytes) -> bytes:
        parts = request_line.decode("latin-1").split(" ")
        head_only = parts[0] == "HEAD"
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            status, body, extra = "400 Bad Request", "bad request\n", ""
        elif parts[0] not in ("GET", "HEAD"):
            status, body, extra = "405 Method Not Allowed", "GET /metrics\n", "Allow: GET, HEAD\r\n"
        elif parts[1].split("?", 1)[0] != "/metrics":
            status, body, extra = "404 Not Found", "the metrics are at /metrics\n", ""
        else:
            status, body, extra = "200 OK", self.collector.render(), ""
        data = body.encode()
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(data)}\r\n{extra}"
                "Connection: close\r\n\r\n").encode()
        return head if head_only else head + data

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        if self._sub is not None:
            self._sub.close()
            self._sub = None
