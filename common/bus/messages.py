"""Every message on the buses, in one place, with its topic and schema version.

Why one module: three processes and the debugging tools speak the same protocol; if a
field changes it changes here and nowhere else. The codec (`common.bus.codec`) is the only
code that turns these objects into bytes and back, and it validates every field against
the type hints below, so a malformed payload is rejected before any service sees it.

Rules of the protocol:
- `*.state` topics carry the complete state of their publisher, with an `incarnation`
  (random per process start) and a `seq` that grows with every change. They are sent on
  change, again as a heartbeat (same seq, new `sent_at`; every GPU_PLUGIN_STALE_AFTER / 3), and at
  once to every new subscriber. Subscribers never need deltas.
- `*.event` topics are for humans, metrics and tests; nothing depends on receiving them.
- `v` is SCHEMA_VERSION. A message of another version is rejected and counted. Unknown
  extra keys are ignored so that a newer publisher can add optional fields: a field added with a
  default that means "unknown" keeps the version (an older subscriber ignores it, an older
  publisher's message decodes with the default); only a change an older peer would misread bumps it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Final, Literal

SCHEMA_VERSION = 1

# The fixed vocabulary: the codec accepts these fields only with one of these values.
Health = Literal["Healthy", "Unhealthy"]
DeviceKind = Literal["gpu", "mig"]
HealthEventKind = Literal["transition", "xid", "ecc", "nvml", "probe"]
PluginEventKind = Literal["allocate", "endpoint", "stream"]
KubeletPresence = Literal["absent", "present", "refusing"]
RegistrarEventKind = Literal["registered", "failed", "kubelet"]
DraEventKind = Literal["registration", "prepare", "unprepare"]
# A prepared claim's phase, as in NVIDIA's checkpoint: started (devices chosen, CDI spec being written) or done.
ClaimPhase = Literal["PrepareStarted", "PrepareCompleted"]

HEALTHY: Final = "Healthy"
UNHEALTHY: Final = "Unhealthy"

# A device ID as it reaches the kubelet, NVIDIA_VISIBLE_DEVICES (comma-separated), volume-mount
# paths and CDI device names: GPU-<uuid>, MIG-<uuid>, an index "3" or "3:1", a replica
# "<uuid>::<n>". CDI's name rule (alphanumerics first and last, then _ . : -) admits all of
# them and excludes separators, paths and control characters.
MAX_DEVICE_ID = 128
DEVICE_ID_PATTERN = rf"[A-Za-z0-9](?:[A-Za-z0-9_.:-]{{0,{MAX_DEVICE_ID - 2}}}[A-Za-z0-9])?"

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


def is_device_id(text: str) -> bool:
    return _DEVICE_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class IdForm:
    """Marks a str field that the codec checks against DEVICE_ID_PATTERN."""

    empty_ok: bool = False  # "" means "none" (a GPU's parent)


DeviceId = Annotated[str, IdForm()]
DeviceIdOrNone = Annotated[str, IdForm(empty_ok=True)]

# Bus endpoints, relative to the run directory.
HEALTH_SOCKET = "health.sock"
PLUGIN_SOCKET = "plugin.sock"
REGISTRAR_SOCKET = "registrar.sock"
MPS_SOCKET = "mps.sock"
KUBE_SOCKET = "kube.sock"
DRA_SOCKET = "dra.sock"


@dataclass(frozen=True)
class Message:
    TOPIC: ClassVar[str] = ""


# The codec requires a field with this metadata even though it has a default: the default
# exists only so that a service can build its state before the publisher stamps it.
ON_WIRE_REQUIRED = {"required": True}


@dataclass(frozen=True)
class ConfigInfo:
    """The config file a service runs on, and the last one it refused (live reload)."""

    file: str = ""  # "" = no config file
    digest: str = ""  # sha256 (12 hex) of the content in effect
    refused: str = ""  # why the last new content was refused; "" = none was
    refused_digest: str = ""
    reloads: int = 0  # reloads applied since the service started
    applied_at: float = 0.0
    refusals: int = 0  # new contents refused since the service started (0 from an older service)

    @classmethod
    def of(cls, status: Any) -> ConfigInfo:
        """From common.reload's ConfigStatus (same fields; the bus does not import the reloader)."""
        return cls(**dataclasses.asdict(status))


@dataclass(frozen=True, kw_only=True)
class StateMessage(Message):
    """A publisher's complete state. Services build it with the content only; the publisher
    stamps these three fields (`BusPublisher.publish_state`), so that they mean the same on
    every bus: `incarnation` is random per publishing process, `seq` grows with every state
    it publishes, `sent_at` is the unix time of the send (heartbeats and replays included)."""

    incarnation: str = field(default="", metadata=ON_WIRE_REQUIRED)
    seq: int = field(default=0, metadata=ON_WIRE_REQUIRED)
    sent_at: float = field(default=0.0, metadata=ON_WIRE_REQUIRED)

    def is_new(self, held: StateMessage | None) -> bool:
        """Whether this is another state than `held` (None: none held yet); a heartbeat or a replay
        of the same state (same incarnation and seq, a later sent_at) is not."""
        return held is None or (self.incarnation, self.seq) != (held.incarnation, held.seq)


@dataclass(frozen=True)
class MigAttributesState:
    """A MIG device's instance attributes (nvmlDeviceGetAttributes), as gpu-feature-discovery labels them."""

    multiprocessors: int
    copy_engines: int
    decoders: int
    encoders: int
    jpegs: int
    ofas: int
    gpu_instance_slices: int
    compute_instance_slices: int
    memory_mb: int


@dataclass(frozen=True)
class FabricState:
    """A GPU's place in a multi-node NVLink fabric (nvmlDeviceGetGpuFabricInfo): its clique label."""

    cluster_uuid: str  # canonical UUID; all zeros: in no cluster
    clique_id: int
    state: int  # NVML's GPU_FABRIC_STATE_*
    status: int  # an NVML return code: the registration's own outcome


@dataclass(frozen=True)
class VgpuState:
    """The vGPU manager of the hypervisor a vGPU guest's GPU is served by, from its PCI config space."""

    host_driver_version: str  # e.g. "595.71.03"
    host_driver_branch: str  # e.g. "r596_25"


@dataclass(frozen=True)
class DeviceState:
    """One schedulable device as the health-monitor sees it: a whole GPU or a MIG device."""

    id: DeviceId  # GPU-… or MIG-… UUID
    kind: DeviceKind
    index: DeviceId  # "3" for a GPU, "3:1" for MIG device 1 of GPU 3
    name: str
    health: Health
    reason: str  # why it is in that state ("" when healthy from the start)
    since: float  # unix time of the last health change
    minor: int = -1  # /dev/nvidia<minor>; -1 for MIG devices
    pci_bus_id: str = ""
    numa_node: int | None = None  # None: unknown, no topology hint
    memory_mb: int = 0
    parent: DeviceIdOrNone = ""  # MIG devices: the UUID of the GPU they live on
    gpu_instance_id: int = -1
    compute_instance_id: int = -1
    profile: str = ""  # MIG profile, e.g. "1g.10gb"
    mig_enabled: bool = False  # GPUs: MIG mode is on (its MIG devices are listed after it)
    caps: list[int] = field(default_factory=list)  # MIG devices: /dev/nvidia-caps/nvidia-cap<N> (GI, CI)
    cordoned: bool = False  # taken out of service by an operator (gpu-plugin cordon)
    # `reason` in parts, for readers that act on the cause (node health, DRA taints): the faults, the
    # device's own and its GPU's ("XID 79", "NVML nvmlDeviceGetPciInfo hung for 12 s"), without the
    # operator's cordon, which is `cordon` ("cordoned: <why>", or the cordon file's error). None: a
    # monitor from before these fields, whose reason is then read by its texts.
    faults: list[str] | None = None
    cordon: str = ""
    xid_count: int = 0  # XIDs seen on this device since the monitor started, any class
    sbe_count: int = 0  # single-bit (corrected) ECC events
    dbe_count: int = 0  # double-bit (uncorrected) ECC events
    # What NVIDIA's gpu-feature-discovery asks beyond the above, read once at discovery (fixed while
    # the driver runs) so that feature-labels labels the node from the bus without NVML of its own.
    # The defaults are "unknown", which is also what a monitor from before these fields sends.
    compute_major: int = -1  # GPUs: CUDA compute capability; -1: unknown (the driver refused it)
    compute_minor: int = -1
    mig_capable: bool = False  # GPUs: the driver answers for MIG mode at all
    pci_class: int = -1  # GPUs: the sysfs PCI class (0x030200 3D controller); -1: unknown
    fabric: FabricState | None = None  # GPUs: None when not in a multi-node NVLink fabric (or unknown)
    mig_attributes: MigAttributesState | None = None  # MIG devices; None: unknown
    vgpu: VgpuState | None = None  # GPUs: set on a vGPU; None: not one, or its config space cannot say


@dataclass(frozen=True)
class PairLink:
    """How two GPUs are connected, discovered once: what preferred allocation scores."""

    a: DeviceId  # GPU UUID
    b: DeviceId  # GPU UUID
    nvlinks: int  # active NVLinks between them (directly or through NVSwitches)
    level: int  # NVML topology level of their PCIe common ancestor (0 board .. 50 system); -1 unknown


@dataclass(frozen=True)
class HealthState(StateMessage):
    TOPIC: ClassVar[str] = "health.state"
    nvml_ok: bool  # False: NVML could not be used; `error` says why
    error: str
    driver_version: str
    devices: list[DeviceState] = field(default_factory=list)
    links: list[PairLink] = field(default_factory=list)
    # Optional features that are off, each with why (the state dir unusable: no cordons):
    # the monitor runs on without them rather than ending the pod.
    degraded: list[str] = field(default_factory=list)
    nvml_library: str = ""  # the libnvidia-ml file loaded ("simulated:<file>"); "" from older monitors
    plugin_version: str = ""  # the monitor's gpu-device-plugin version; "" from older monitors
    config: ConfigInfo = field(default_factory=lambda: ConfigInfo())  # an older monitor's: empty
    # NVML's encoding (1000 * major + 10 * minor), read once with the driver version; 0: unknown (an older
    # monitor, or NVML refused it).
    cuda_driver_version: int = 0


@dataclass(frozen=True)
class HealthEvent(Message):
    """A device changed health, or a driver event was seen (XID, ECC, lost)."""

    TOPIC: ClassVar[str] = "health.event"
    time: float
    device: str
    event: HealthEventKind
    old: Literal["Healthy", "Unhealthy", ""] = ""  # transitions only
    new: Literal["Healthy", "Unhealthy", ""] = ""
    reason: str = ""
    xid: int = 0


@dataclass(frozen=True)
class EndpointState:
    """A DevicePlugin gRPC server the plugin-server runs for one resource."""

    resource: str  # e.g. nvidia.com/gpu
    endpoint: str  # socket file name relative to the device-plugin dir
    socket_id: str  # identity of the socket file (inode:ctime); changes when re-created
    pre_start_required: bool
    get_preferred_allocation_available: bool
    streams: int  # open ListAndWatch streams (the kubelet's and any other client's)
    healthy: int
    total: int
    # When each open stream began, CLOCK_MONOTONIC (one clock for the whole node): the kubelet's
    # is the first to begin after a Register. [] from a publisher that predates the field.
    stream_opened: list[float] = field(default_factory=list)
    # When the last streams that ended had begun (at most ENDED_STREAMS_KEPT, oldest first): a stream
    # that began and ended between two states (the kubelet's, dropped at once) is still seen, and is
    # not mistaken for another client's that began after it.
    stream_ended: list[float] = field(default_factory=list)


ENDED_STREAMS_KEPT = 16


@dataclass(frozen=True)
class CallCount:
    """DevicePlugin calls of one method on one resource that ended with one gRPC status code, counted
    since the plugin-server started (for metrics). ListAndWatch counts streams opened (OK) and refused."""

    resource: str
    method: str  # Allocate, GetPreferredAllocation, ListAndWatch
    code: str  # grpc.StatusCode's name: OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNKNOWN
    count: int


@dataclass(frozen=True)
class PluginState(StateMessage):
    TOPIC: ClassVar[str] = "plugin.state"
    health_incarnation: str  # the health-monitor state this is built from ("" = none yet)
    health_stale: bool
    endpoints: list[EndpointState] = field(default_factory=list)
    bus_dropped: int = 0  # health-bus payloads rejected (malformed, unknown, wrong version)
    config: ConfigInfo = field(default_factory=lambda: ConfigInfo())  # an older server's: empty
    calls: list[CallCount] = field(default_factory=list)  # [] from an older server


@dataclass(frozen=True)
class PluginEvent(Message):
    TOPIC: ClassVar[str] = "plugin.event"
    time: float
    event: PluginEventKind
    resource: str
    detail: str
    devices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Registration:
    resource: str
    endpoint: str
    socket_id: str
    kubelet_id: str  # identity of the kubelet.sock registered with
    time: float
    adopted: bool  # True: found already held by the kubelet at start, not re-sent


@dataclass(frozen=True)
class RegistrarState(StateMessage):
    TOPIC: ClassVar[str] = "registrar.state"
    kubelet: KubeletPresence
    kubelet_id: str
    registrations: list[Registration] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # resources not registered yet
    last_error: str = ""
    # Since the registrar started, for metrics (0 from an older registrar): Registers the kubelet
    # accepted, Registers that failed, and kubelet restarts seen (kubelet.sock re-created: a new identity).
    registers: int = 0
    register_failures: int = 0
    kubelet_restarts: int = 0


@dataclass(frozen=True)
class RegistrarEvent(Message):
    TOPIC: ClassVar[str] = "registrar.event"
    time: float
    event: RegistrarEventKind
    resource: str
    detail: str


@dataclass(frozen=True)
class MpsDaemon:
    """The MPS control daemon of one shared resource, as mps-control last saw it."""

    resource: str  # the served name, e.g. nvidia.com/gpu
    devices: list[DeviceId]  # the GPUs whose replicas it serves
    pipe_dir: str  # CUDA_MPS_PIPE_DIRECTORY, in the container
    up: bool  # the daemon runs and answers on its pipe
    ready: bool  # up, and its limits are applied: its replicas may be allocated
    pid: int = 0
    active_thread_percentage: int = 0  # the default set, 0 = not (yet) set
    pinned_mem_limits: list[str] = field(default_factory=list)  # "<index>=<limit>M" as set per GPU
    last_error: str = ""
    since: float = 0.0  # unix time of the last change of up/ready
    restarts: int = 0


@dataclass(frozen=True)
class MpsState(StateMessage):
    TOPIC: ClassVar[str] = "mps.state"
    root: str  # the MPS root in the container
    daemons: list[MpsDaemon] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class KubeState(StateMessage):
    """The kube-agent's view: the API server, this node's config label, the config selected and why."""

    TOPIC: ClassVar[str] = "kube.state"
    api_reachable: bool
    node: str
    label: str = ""  # the label's value; "" = the node has no such label
    config: str = ""  # the config selected; "" = the empty config (fallback strategy empty)
    why: str = ""  # "node label ...", "DEFAULT_CONFIG", "fallback strategy named", ...
    digest: str = ""  # sha256 (12 hex) of the config file written
    unknown: str = ""  # a label value that names no available config (reported, not applied)
    error: str = ""  # the last API or selection error ("" = none)
    # The parts running ("per-node configuration", "metrics", "node health"); [] from an older agent.
    parts: list[str] = field(default_factory=list)
    # Node health (HEALTH_NODE_CONDITION, HEALTH_NODE_EVENTS). The defaults say "not written", which is
    # also what the part off, or an older agent, sends.
    node_condition: str = ""  # GPUUnhealthy's status as last written: "True", "False", "Unknown"; "" = none
    node_condition_reason: str = ""
    node_events_written: int = 0  # Event creates and count updates the API took, since the agent started
    node_events_pending: int = 0  # waiting for the API or for their device's rate limit
    node_events_dropped: int = 0  # given up: refused by the API, or pushed out of the full queue
    node_health_error: str = ""  # why the last write of the condition or an Event failed; "" = they went through


@dataclass(frozen=True)
class PreparedClaim:
    """A ResourceClaim the dra-plugin prepared (or is preparing) on this node, as its checkpoint holds it."""

    uid: str
    namespace: str
    name: str
    phase: ClaimPhase
    devices: list[str] = field(default_factory=list)  # DRA device names (gpu-0, gpu-1-mig-3-0)
    since: float = 0.0  # unix time of its last phase change


@dataclass(frozen=True)
class DraSlices:
    """The dra-plugin's ResourceSlices, as its API side last wrote them (services/dra_plugin/slices.py)."""

    api_version: str = ""  # resource.k8s.io's version spoken; "" = not found yet
    taints: str = ""  # what the server keeps of device taints; "" = not asked yet
    published: bool = False  # the API holds the pool of the latest health state
    generation: int = 0
    slices: int = 0
    devices: int = 0
    tainted: int = 0  # devices published with a taint
    left_out: list[str] = field(default_factory=list)  # Unhealthy devices not published (no taints kept)
    writes: int = 0  # creates, updates and deletes the API took since the start
    deleted_behind: int = 0  # slices deleted by someone else (the kubelet) and written again
    error: str = ""  # why the last pass failed; "" = it went through


@dataclass(frozen=True, kw_only=True)
class DraState(StateMessage):
    """The dra-plugin's view: its registration with the kubelet, the claims it prepared, its health stream.
    Every field has a default that means "none" or "not yet", which is also what an older plugin sends."""

    TOPIC: ClassVar[str] = "dra.state"
    driver: str = ""  # gpu.nvidia.com
    node: str = ""  # NODE_NAME: the pool of its devices
    registration_socket: str = ""  # in the kubelet's plugins_registry directory
    endpoint: str = ""  # the DRA service socket the kubelet dials
    services: list[str] = field(default_factory=list)  # advertised: v1.DRAPlugin, v1beta1.DRAPlugin, ...
    registered: bool = False  # the kubelet's last NotifyRegistrationStatus said registered
    registration_error: str = ""  # why the kubelet's last notice refused the plugin; "" = it did not
    registered_at: float = 0.0  # unix time of the last notice that said registered
    info_calls: int = 0  # GetInfo answered since the start: the kubelet asks at each (re)registration
    health_incarnation: str = ""  # the health-monitor state it serves from ("" = none yet)
    health_stale: bool = False
    devices: int = 0  # this node's devices with a DRA name
    unhealthy: int = 0
    claims: list[PreparedClaim] = field(default_factory=list)
    prepares: int = 0  # claims prepared since the start (a repeated prepare counts again)
    prepare_failures: int = 0  # claims whose prepare was answered with an error
    unprepares: int = 0
    health_streams: int = 0  # open NodeWatchResources streams (the kubelet holds one)
    last_error: str = ""  # the last claim refused or failed, and why
    checkpoint_error: str = ""  # the checkpoint cannot be read or written; "" = it is in order
    slices: DraSlices | None = None  # None: not published yet (or an older plugin)


@dataclass(frozen=True)
class DraEvent(Message):
    TOPIC: ClassVar[str] = "dra.event"
    time: float
    event: DraEventKind
    claim: str  # "<namespace>/<name> (<uid>)"; "" for a registration
    detail: str
    devices: list[str] = field(default_factory=list)


MESSAGE_TYPES: tuple[type[Message], ...] = (
    HealthState,
    HealthEvent,
    PluginState,
    PluginEvent,
    RegistrarState,
    RegistrarEvent,
    MpsState,
    KubeState,
    DraState,
    DraEvent,
)
BY_TOPIC: dict[str, type[Message]] = {t.TOPIC: t for t in MESSAGE_TYPES}
