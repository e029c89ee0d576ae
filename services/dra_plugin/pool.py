"""This node's DRA pool as pure functions of the health bus: which devices DRA serves, each device as
NVIDIA's DRA driver describes it (attribute and capacity names and types), health as device taints,
and the ResourceSlices that carry them. No sockets, no API, no clock of its own
(services.dra_plugin.slices writes what this decides; tests call it with states they build).

Devices (NVIDIA's kubelet plugin, kubernetes-sigs/dra-driver-nvidia-gpu cmd/gpu-kubelet-plugin
deviceinfo.go and mig.go, is the model, so that a claim written for it selects the same devices here):

- a GPU without MIG is one device (`type: gpu`); a GPU with MIG enabled offers its MIG devices
  (`type: mig`) and not itself, as NVIDIA's static MIG does; only the GPUs DRA_DEVICES names;
- attributes under the driver's domain (`device.attributes['gpu.nvidia.com'].productName`): `type`,
  `uuid`, `productName`, `architecture`, `cudaComputeCapability`, `driverVersion` and
  `cudaDriverVersion` (versions, as NVIDIA's semver), MIG `parentUUID` and `profile`; Kubernetes'
  standard `resource.kubernetes.io/pciBusID` (and `numaNode` where known); and the names NVIDIA's
  earlier releases published, so that older claims keep working: `index`, `minor`, `pcieBusID`,
  MIG `parentIndex`. NVIDIA's `brand` is not on the health bus and is not published;
- capacity `memory` in bytes (a GPU's total, a MIG device's profile memory) and, for MIG devices, the
  instance's `multiprocessors`, `copyEngines`, `decoders`, `encoders`, `jpegEngines`, `ofaEngines`.
  NVIDIA's `memorySlice<N>` capacities need the GPU instance's placement, which the bus does not carry.

Health as taints (KEP-5055; NVIDIA's key schema: one key per kind of fault under gpu.nvidia.com, as its
`gpu.nvidia.com/xid=79` and `gpu.nvidia.com/gpu-lost`): a device the health-monitor holds Unhealthy gets
one NoSchedule taint per cause its reason names (TAINT_KEYS), an operator's cordon
`gpu.nvidia.com/cordon`; when the monitor recovers the device (recovery advice, quiet period, uncordon)
its next state has no fault and the taints go with it. A monitor-only XID (the device stays Healthy)
is an informational `gpu.nvidia.com/xid=<n>` with effect None for MONITOR_ONLY_S after the last one.
A server that drops device taints (resource.k8s.io/v1beta1 before 1.33, or DRADeviceTaints off) cannot
keep a scheduler off a tainted device: there the Unhealthy device is left out of the pool instead, and
comes back when it recovers (Capabilities).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from common.bus.messages import HEALTHY, DeviceState, HealthEvent, HealthState
from common.kubeapi import rfc3339
from common.settings import DraDevices
from services.dra_plugin.names import DRIVER_NAME, offered, pool_name
from services.kube_agent.node_health import cause_of, faults_of

# The API's bounds (resource.k8s.io v1, as validation enforces them): a slice with a tainted device
# holds at most 64 devices, else 128; a device at most 32 attributes and capacities together, at most 4
# taints (16 since 1.35; 4 is what every served version takes); an attribute string at most 64 characters.
MAX_DEVICES: Final = 128
MAX_DEVICES_TAINTED: Final = 64
MAX_TAINTS: Final = 4
MAX_STRING: Final = 64
# Kubernetes' standard device attributes (k8s.io/dynamic-resource-allocation/deviceattribute).
STANDARD: Final = "resource.kubernetes.io/"
MIB: Final = 1 << 20

# A monitor-only XID says "seen, not taken out": it stays visible this long after the last one, then
# goes (the bus has no event that ends it; NVIDIA's taints stay until its plugin restarts).
MONITOR_ONLY_S: Final = 600.0

Effect = Literal["NoSchedule", "NoExecute", "None"]
TAINT_PREFIX: Final = f"{DRIVER_NAME}/"
XID_KEY: Final = TAINT_PREFIX + "xid"
CORDON_KEY: Final = TAINT_PREFIX + "cordon"
UNHEALTHY_KEY: Final = TAINT_PREFIX + "unhealthy"  # a fault no pattern names: still never schedulable
# node_health's causes (the health-monitor's reason texts, read there) -> our taint keys.
TAINT_KEYS: Final[Mapping[str, str]] = {
    "XidError": XID_KEY,
    "GpuLost": TAINT_PREFIX + "gpu-lost",
    "EccError": TAINT_PREFIX + "ecc",
    "ProbeHung": TAINT_PREFIX + "nvml-hung",
    "ProbeFailed": TAINT_PREFIX + "probe-failed",
    "RowRemap": TAINT_PREFIX + "row-remap",
    "RetiredPages": TAINT_PREFIX + "retired-pages",
    "DeviceFault": UNHEALTHY_KEY,
}
_XID = re.compile(r"XID (\d+)\b")
_ECC = re.compile(r"ECC ([SD]BE)\b")
_HUNG = re.compile(r"(?:NVML )?(\S+) hung\b")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_PCI = re.compile(r"([0-9A-Fa-f]{1,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])")


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: Effect
    added: float  # unix time; 0: unknown (the server then stamps its own)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "effect": self.effect}
        if self.value:
            out["value"] = self.value
        if self.added > 0:
            out["timeAdded"] = rfc3339(self.added)
        return out


@dataclass(frozen=True)
class Capabilities:
    """What the API server keeps of a device's taints (found by a dry-run write: see slice_api)."""

    taints: bool = True
    none_effect: bool = True  # effect None (1.35+); an older server refuses it

    def describe(self) -> str:
        if not self.taints:
            return "not kept by this API server: Unhealthy devices are left out of the pool"
        return "kept" if self.none_effect else "kept, without effect None (monitor-only XIDs not shown)"


FULL = Capabilities()


# -- which devices ------------------------------------------------------------------------------

def served(devices: Iterable[DeviceState], selection: DraDevices) -> dict[str, DeviceState]:
    """DRA name -> device for what this node offers through DRA, in the bus's order: what names.offered
    gives (GPUs whole, or the MIG devices of a GPU in MIG mode) of the GPUs `selection` (DRA_DEVICES)
    gives to DRA. The node side prepares exactly these: the plugin-server offers the other GPUs."""
    listed = list(devices)
    gpus = {d.id: d for d in listed if d.kind == "gpu"}
    out: dict[str, DeviceState] = {}
    for name, d in offered(listed).items():
        gpu = d if d.kind == "gpu" else gpus.get(d.parent)
        if gpu is not None and selection.serves(gpu.index, gpu.id):
            out[name] = d
    return out


# -- attributes and capacity ----------------------------------------------------------------------

def _string(value: str) -> dict[str, Any]:
    return {"string": value[:MAX_STRING]}


def _int(value: int) -> dict[str, Any]:
    return {"int": value}


def _version(value: str) -> dict[str, Any]:
    return {"version": value}


def architecture(major: int, minor: int) -> str:
    """NVML's architecture as NVIDIA's go-nvlib names it (GetArchitectureAsString), from the compute
    capability the bus carries (NVML's nvmlDeviceGetArchitecture is not on it); "" when unknown."""
    if major in (10, 11, 12):
        return "Blackwell"
    if major == 8:
        return "Ada Lovelace" if minor >= 9 else "Ampere"
    if major == 7:
        return "Turing" if minor >= 5 else "Volta"
    return {3: "Kepler", 5: "Maxwell", 6: "Pascal", 9: "Hopper"}.get(major, "")


def semver(text: str) -> str:
    """A driver version as NVIDIA's driver publishes it (Masterminds semver: "580.159.04" -> "580.159.4",
    "580.95" -> "580.95.0"); "" when it is not numbers."""
    parts = text.strip().split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() and len(p) <= 9 for p in parts):
        return ""
    return ".".join(str(int(p)) for p in (*parts, "0", "0")[:3])


def pci_bus_id(nvml: str) -> str:
    """Kubernetes' standard form, extended BDF in lower case ("0000:3b:00.0"), from NVML's
    ("00000000:3B:00.0"); "" when it is not one."""
    m = _PCI.fullmatch(nvml.strip())
    if m is None:
        return ""
    domain = int(m.group(1), 16)
    return f"{domain:04x}:{m.group(2).lower()}:{m.group(3).lower()}.{m.group(4)}"


def quantity(n: int) -> str:
    """A whole number as Kubernetes writes it back (resource.Quantity's canonical form, binary
    suffixes as NVIDIA's BinarySI quantities): 85520809984 -> "81559Mi", 16 -> "16". Written so, the
    answer reads the same as what was sent."""
    if -1024 < n < 1024:  # the API shows these in decimal: 1000 is "1k"
        return f"{n // 1000}k" if n and n % 1000 == 0 else str(n)
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = 1024 ** (("Ki", "Mi", "Gi", "Ti", "Pi", "Ei").index(suffix) + 1)
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


_QUANTITY = re.compile(r"([+-]?\d+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|)")
_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
             **{s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}


def parse_quantity(text: Any) -> int | str:
    """A whole quantity's value, for comparing what the API holds with what we would write; anything
    else is kept as written (then it differs, and is written again)."""
    if isinstance(text, str):
        m = _QUANTITY.fullmatch(text.strip())
        if m is not None:
            return int(m.group(1)) * int(_SUFFIXES[m.group(2)])
    return str(text)


def _common(d: DeviceState, gpu: DeviceState, state: HealthState) -> dict[str, dict[str, Any]]:
    """The attributes a MIG device shares with its GPU (NVIDIA's CommonAttributesMig), and a GPU's own."""
    attrs: dict[str, dict[str, Any]] = {"productName": _string(gpu.name)}
    arch = architecture(gpu.compute_major, gpu.compute_minor)
    if arch:
        attrs["architecture"] = _string(arch)
    if gpu.compute_major >= 0 and gpu.compute_minor >= 0:
        attrs["cudaComputeCapability"] = _version(f"{gpu.compute_major}.{gpu.compute_minor}.0")
    driver = semver(state.driver_version)
    if driver:
        attrs["driverVersion"] = _version(driver)
    cuda = state.cuda_driver_version
    if cuda > 0:
        attrs["cudaDriverVersion"] = _version(f"{cuda // 1000}.{cuda % 1000 // 10}.0")
    bus = pci_bus_id(gpu.pci_bus_id)
    if bus:
        attrs[STANDARD + "pciBusID"] = _string(bus)
        attrs["pcieBusID"] = _string(bus)
    numa = d.numa_node if d.numa_node is not None else gpu.numa_node
    if numa is not None and numa >= 0:
        attrs[STANDARD + "numaNode"] = _int(numa)
    return attrs


def _index_of(text: str, part: int) -> int | None:
    pieces = text.split(":")
    return int(pieces[part]) if len(pieces) > part and pieces[part].isdigit() else None


def attributes(d: DeviceState, gpu: DeviceState, state: HealthState) -> dict[str, dict[str, Any]]:
    """`d`'s attributes; `gpu` is `d` itself or, for a MIG device, its GPU."""
    attrs = {"type": _string(d.kind), "uuid": _string(d.id), **_common(d, gpu, state)}
    gpu_index = _index_of(gpu.index, 0)
    if d.kind == "gpu":
        if gpu_index is not None:
            attrs["index"] = _int(gpu_index)
        if d.minor >= 0:
            attrs["minor"] = _int(d.minor)
        return attrs
    attrs["parentUUID"] = _string(gpu.id)
    attrs["profile"] = _string(d.profile)
    mig_index = _index_of(d.index, 1)
    if mig_index is not None:
        attrs["index"] = _int(mig_index)
    if gpu_index is not None:
        attrs["parentIndex"] = _int(gpu_index)
    return attrs


def capacity(d: DeviceState) -> dict[str, dict[str, str]]:
    memory_mb = d.mig_attributes.memory_mb if d.mig_attributes is not None and d.mig_attributes.memory_mb else \
        d.memory_mb
    out: dict[str, dict[str, str]] = {}
    if memory_mb > 0:
        out["memory"] = {"value": quantity(memory_mb * MIB)}
    a = d.mig_attributes
    if d.kind == "mig" and a is not None:
        for name, n in (("multiprocessors", a.multiprocessors), ("copyEngines", a.copy_engines),
                        ("decoders", a.decoders), ("encoders", a.encoders), ("jpegEngines", a.jpegs),
                        ("ofaEngines", a.ofas)):
            out[name] = {"value": quantity(n)}
    return out


# -- health as taints --------------------------------------------------------------------------------

def _label_value(text: str) -> str:
    return text if _LABEL_VALUE.fullmatch(text) else ""


def fault_taint(part: str, since: float) -> Taint | None:
    """The taint for one fault of a device's reason; None for a part that is advice, not a fault."""
    cause = cause_of(part)
    if cause is None:
        return None
    key = TAINT_KEYS.get(cause, UNHEALTHY_KEY)
    value = ""
    if (m := _XID.match(part)) is not None:
        key, value = XID_KEY, m.group(1)  # XID 79 reads GpuLost for the condition; the taint names the XID
    elif (m := _ECC.match(part)) is not None:
        value = m.group(1).lower()
    elif (m := _HUNG.match(part)) is not None:
        value = _label_value(m.group(1))
    elif cause == "RowRemap":
        value = "failed" if "failure" in part else "pending"
    return Taint(key, value, "NoSchedule", since)


def taints_of(d: DeviceState, monitor_only: Mapping[str, tuple[int, float]]) -> list[Taint]:
    """A device's taints: NoSchedule for each fault and a cordon, None for a recent monitor-only XID;
    one per key (the first a reason names), NoSchedule first, at most MAX_TAINTS."""
    out: dict[str, Taint] = {}
    if d.health != HEALTHY:
        for part in faults_of(d):
            taint = fault_taint(part, d.since)
            if taint is not None:
                out.setdefault(taint.key, taint)
        if d.cordoned:
            out.setdefault(CORDON_KEY, Taint(CORDON_KEY, "", "NoSchedule", d.since))
        if not out:  # Unhealthy for a reason nothing above names: it must still not be scheduled
            out[UNHEALTHY_KEY] = Taint(UNHEALTHY_KEY, "", "NoSchedule", d.since)
    seen = monitor_only.get(d.id)
    if seen is not None:
        out.setdefault(XID_KEY, Taint(XID_KEY, str(seen[0]), "None", seen[1]))
    ordered = sorted(out.values(), key=lambda t: t.effect == "None")
    return ordered[:MAX_TAINTS]


@dataclass
class MonitorOnlyXids:
    """Monitor-only XIDs from the health events, per device UUID: the XID, when it was first seen and
    when last; shown until `keep_s` after the last. A repeat of the same XID moves only the end (the
    taint, and so the API, stays as it is: a storm of them costs no write)."""

    keep_s: float = MONITOR_ONLY_S
    seen: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    def on_event(self, event: HealthEvent) -> bool:
        """True when the event changes what is shown."""
        if event.event != "xid" or event.reason != "monitor-only" or not event.device:
            return False
        before = self.seen.get(event.device)
        if before is not None and before[0] == event.xid:
            self.seen[event.device] = (before[0], before[1], max(before[2], event.time))
            return False
        self.seen[event.device] = (event.xid, event.time, event.time)
        return True

    def current(self, now: float) -> dict[str, tuple[int, float]]:
        """Device UUID -> (XID, first seen) for those still shown at `now`."""
        for device, (_, _, last) in list(self.seen.items()):
            if now - last >= self.keep_s:
                del self.seen[device]
        return {device: (xid, first) for device, (xid, first, _) in self.seen.items()}

    def next_expiry(self) -> float | None:
        """Unix time at which the first shown XID goes; None: none shown."""
        return min((last + self.keep_s for _, _, last in self.seen.values()), default=None)


# -- the pool ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pool:
    """This node's devices as they should be in the API, in order (v1 layout, see slice_api), split
    into the slices that carry them."""

    node: str
    devices: list[dict[str, Any]]
    left_out: list[str]  # Unhealthy devices not published: the server keeps no taints
    tainted: int  # devices published with a taint
    wants_taints: bool  # some device would have a taint (before the server's capabilities were applied)
    withheld: tuple[str, ...] = ()  # devices not published: their GPU is held by a device-plugin pod

    @property
    def chunks(self) -> list[list[dict[str, Any]]]:
        """The devices of each slice: none when there is no device (no slice at all), else as few
        slices as the API's bounds allow."""
        limit = MAX_DEVICES_TAINTED if self.tainted else MAX_DEVICES
        return [self.devices[i:i + limit] for i in range(0, len(self.devices), limit)]

    def spec(self, chunk: list[dict[str, Any]], generation: int, count: int) -> dict[str, Any]:
        """One slice's spec (v1 layout)."""
        return {"driver": DRIVER_NAME, "nodeName": self.node,
                "pool": {"name": pool_name(self.node), "generation": generation, "resourceSliceCount": count},
                "devices": chunk}


def build_pool(state: HealthState, node: str, selection: DraDevices, caps: Capabilities = FULL,
               monitor_only: Mapping[str, tuple[int, float]] | None = None,
               kubelet_held: frozenset[str] = frozenset()) -> Pool:
    """The pool; `kubelet_held`: GPU UUIDs the kubelet's device manager gave to pods, not published (a
    claim would get a GPU a pod already uses)."""
    gpus = {d.id: d for d in state.devices if d.kind == "gpu"}
    devices: list[dict[str, Any]] = []
    left_out: list[str] = []
    withheld: list[str] = []
    tainted = 0
    wants = False
    for name, d in served(state.devices, selection).items():
        gpu = d if d.kind == "gpu" else gpus[d.parent]
        if gpu.id in kubelet_held:
            withheld.append(name)
            continue
        taints = taints_of(d, monitor_only or {})
        wants = wants or bool(taints)
        if not caps.none_effect or not caps.taints:
            taints = [t for t in taints if t.effect != "None"]
        if taints and not caps.taints:
            left_out.append(name)
            continue
        entry: dict[str, Any] = {"name": name, "attributes": attributes(d, gpu, state), "capacity": capacity(d)}
        if taints:
            entry["taints"] = [t.to_api() for t in taints]
            tainted += 1
        devices.append(entry)
    return Pool(node, devices, left_out, tainted, wants, tuple(withheld))


# -- comparing with what the API holds ---------------------------------------------------------------

def canonical(devices: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Devices (v1 layout) in a form that compares equal when the API holds what we would write: the
    fields we write only (a newer server's defaults ignored), capacities by value, taints as a set."""
    out = []
    for d in devices:
        attrs = d.get("attributes") or {}
        caps = d.get("capacity") or {}
        taints = d.get("taints") or []
        out.append((
            d.get("name"),
            tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else repr(v)) for k, v in attrs.items())),
            tuple(sorted((k, parse_quantity(v.get("value")) if isinstance(v, dict) else repr(v))
                         for k, v in caps.items())),
            tuple(sorted((str(t.get("key")), str(t.get("value", "")), str(t.get("effect")), str(t.get("timeAdded", "")))
                         for t in taints if isinstance(t, dict))),
        ))
    return out


def same_devices(held: Iterable[Mapping[str, Any]], wanted: Iterable[Mapping[str, Any]]) -> bool:
    """Whether the API's devices are the ones we would write, in order. A taint we write without a time
    is stamped by the server: its time is not compared."""
    wanted = list(wanted)
    untimed = {(d.get("name"), t.get("key")) for d in wanted for t in d.get("taints") or [] if "timeAdded" not in t}

    def comparable(devices: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        return canonical([{**d, "taints": [
            {k: v for k, v in t.items() if k != "timeAdded" or (d.get("name"), t.get("key")) not in untimed}
            for t in d.get("taints") or [] if isinstance(t, dict)]} for d in devices])

    return comparable(held) == comparable(wanted)


# -- from what the API holds to the pool ------------------------------------------------------------

@dataclass(frozen=True)
class Held:
    """One of this node's ResourceSlices of our driver as the API holds it (devices in v1 layout)."""

    name: str
    version: str  # metadata.resourceVersion
    pool: str
    generation: int
    count: int  # pool.resourceSliceCount
    devices: list[dict[str, Any]]
    ours: bool = True  # written by this plugin (its label), or an unlabelled one of an earlier version of it


@dataclass(frozen=True)
class Write:
    verb: Literal["create", "update", "delete"]
    name: str = ""  # the slice's ("" for a create: the server names it)
    version: str = ""  # the resourceVersion an update or delete is for (a newer one makes it a 409)
    spec: dict[str, Any] | None = None


def up_to_date(held: list[Held], pool: Pool) -> bool:
    """The API holds exactly the pool: one slice per chunk, all of one generation and count, each
    holding one chunk's devices."""
    chunks = pool.chunks
    if len(held) != len(chunks):
        return False
    if any(h.pool != pool_name(pool.node) or h.count != len(chunks) or h.generation != held[0].generation
           for h in held):
        return False
    unmatched = list(chunks)
    for h in held:
        match = next((c for c in unmatched if same_devices(h.devices, c)), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


def plan(held: list[Held], pool: Pool, floor: int = 0) -> tuple[list[Write], int]:
    """The writes that turn what the API holds into the pool, and the pool's generation after them.
    Any change bumps the generation past every one seen (and past `floor`, the last one this process
    wrote): consumers use only a pool's highest generation, and wait while fewer slices than its count
    carry it. So every slice is written again with the new generation: updates of the slices there
    (fewest creates), creates for the rest, then deletes of the slices left over, which the new
    generation already hides."""
    if up_to_date(held, pool):
        return [], held[0].generation if held else floor
    generation = max([floor, *(h.generation for h in held)]) + 1
    chunks = pool.chunks
    ordered = sorted(held, key=lambda h: h.name)
    writes: list[Write] = []
    for i, chunk in enumerate(chunks):
        spec = pool.spec(chunk, generation, len(chunks))
        if i < len(ordered):
            writes.append(Write("update", ordered[i].name, ordered[i].version, spec))
        else:
            writes.append(Write("create", spec=spec))
    writes.extend(Write("delete", h.name, h.version) for h in ordered[len(chunks):])
    return writes, generation if chunks else floor
