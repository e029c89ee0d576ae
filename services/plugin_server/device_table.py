"""Device table: turns the health-monitor's state into the resources the kubelet sees,
and wakes ListAndWatch streams when, and only when, a resource's list changes.

MIG strategies, as NVIDIA's plugin names them:
- none: every GPU is offered whole as nvidia.com/gpu, MIG-enabled or not. A GPU is
  Unhealthy when it or any of its MIG devices is.
- single: every GPU has MIG on with one profile; the MIG devices are nvidia.com/gpu. A
  node with no MIG-enabled GPU serves its GPUs whole, as NVIDIA's plugin does.
- mixed: GPUs without MIG are nvidia.com/gpu; each MIG profile is nvidia.com/mig-<profile>.

Time-slicing (sharing.timeSlicing) then replaces each selected device of a resource by
`replicas` IDs "<UUID>::<n>", served under the resource's name, its rename, or
"<name>.shared" with renameByDefault. A replica's health is always its device's: they are
built from the same DeviceState on every update. Unlike NVIDIA's plugin, which ignores
`devices` and replicates every GPU, the selection is honoured (said at start).

GPUs that DRA_DEVICES gives to Kubernetes DRA (the dra-plugin's ResourceSlices) are in no resource:
the MIG strategy and sharing apply to the others, as on a node without those GPUs.

MPS (sharing.mps) makes replicas the same way, "<UUID>::<n>" of whole GPUs, under the name,
its rename or "<name>.shared". They are offered only once mps-control has reported the
resource's MPS daemon ready (NVIDIA's plugin waits for its daemon before serving too), and are
Unhealthy while that daemon is down or not configured (NVIDIA's keeps them schedulable) as well
as when their GPU is. Time-slicing and MPS may both be set, for different GPUs; a GPU that both
select stops the plugin-server with the GPU named.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, HealthState
from common.lifecycle import PermanentError
from common.mps import selected
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import DEVICE_ENTRY_BYTES, GRPC_MAX_MESSAGE_BYTES, Replicated, Settings
from services.plugin_server.dra_claims import claimed_gpus
from services.plugin_server.preferred import Topology

GPU_RESOURCE = "nvidia.com/gpu"


class MigConfigError(PermanentError):
    """The node's MIG layout does not fit the MIG strategy."""


class SharingError(PermanentError):
    """The sharing config cannot be served on this node's devices."""


class ResourceTooLargeError(PermanentError):
    """A resource has more device IDs than one ListAndWatch response can carry to the kubelet."""


@dataclass(slots=True)
class PluginDevice:
    """One device ID offered to the kubelet, with what Allocate needs to answer for it.

    Never changed once built (a health change builds the list anew), but not frozen: a frozen
    dataclass sets each field through object.__setattr__, and 1 024 replicas are built on every
    health change (~1.3 ms frozen, ~0.4 ms with slots).
    """

    id: str
    health: str
    numa_node: int | None
    device: DeviceState  # the physical (GPU or MIG) device behind the ID
    parent: DeviceState | None = None  # MIG devices: their GPU
    replica: int | None = None  # replicas: n of "<UUID>::<n>"
    sharing: str = ""  # replicas: "timeSlicing" or "mps"

    @property
    def gpu_id(self) -> str:
        """The physical GPU this ID lives on: what distributes and packs replicas and MIG devices."""
        return self.parent.id if self.parent is not None else self.device.id


def socket_name(resource: str) -> str:
    """nvidia.com/gpu -> nvidia-gpu.sock, nvidia.com/mig-1g.10gb -> nvidia-mig-1g.10gb.sock."""
    return "nvidia-" + resource.split("/", 1)[1] + ".sock"


def _whole(gpu: DeviceState, migs: Iterable[DeviceState]) -> PluginDevice:
    broken = [m for m in migs if m.health != HEALTHY]
    health = UNHEALTHY if gpu.health != HEALTHY or broken else HEALTHY
    return PluginDevice(gpu.id, health, gpu.numa_node, gpu)


def _mig(mig: DeviceState, gpu: DeviceState) -> PluginDevice:
    return PluginDevice(mig.id, mig.health, mig.numa_node, mig, parent=gpu)


@dataclass
class MpsReadiness:
    """What the plugin-server knows of the MPS daemons (from mps.state): ready now, ever ready."""

    ready: dict[str, bool]
    seen_ready: set[str]

    def update(self, daemons: Iterable[tuple[str, bool]]) -> bool:
        """Takes a new report; True when anything served changes."""
        ready = dict(daemons)
        seen = self.seen_ready | {r for r, ok in ready.items() if ok}
        changed = ready != self.ready or seen != self.seen_ready
        self.ready, self.seen_ready = ready, seen
        return changed


@dataclass(frozen=True)
class View:
    """What the plugin-server serves from one health state (see `serve`)."""

    state: HealthState  # the devices to serve: the state itself, or the last good one, Unhealthy
    last_good: HealthState | None  # the last state with NVML working
    resources: dict[str, list[PluginDevice]]
    topology_changed: bool  # links or the device list differ: rebuild the preferred-allocation tables
    error: str = ""  # why NVML is unavailable, when it is


def serve(
    old: HealthState | None, state: HealthState, last_good: HealthState | None, settings: Settings,
    mps: MpsReadiness | None = None, force: bool = False, dra_claimed: frozenset[str] = frozenset(),
) -> View | None:
    """The state -> resources step, plain: None for a heartbeat (same incarnation and seq)
    unless `force` (the MPS daemons' readiness changed).

    NVML gone after devices were known: the GPUs are not usable now, but they are still there.
    They stay listed, Unhealthy, rather than have the kubelet forget them."""
    if not force and not state.is_new(old):
        return None
    served, error = state, ""
    if state.nvml_ok:
        last_good = state
    elif last_good is not None:
        error = state.error
        served = dataclasses.replace(last_good, devices=[
            dataclasses.replace(d, health=UNHEALTHY, reason=f"NVML unavailable: {state.error}")
            for d in last_good.devices])
    changed = old is None or old.links != served.links or [d.id for d in old.devices] != [d.id for d in served.devices]
    return View(served, last_good, build_resources(served, settings, mps, dra_claimed), changed, error)


def build_resources(state: HealthState, settings: Settings, mps: MpsReadiness | None = None,
                    dra_claimed: frozenset[str] = frozenset()) -> dict[str, list[PluginDevice]]:
    """Resource name -> its devices, per the MIG strategy and sharing. The GPUs served through DRA
    (settings.dra_devices) are left out whole, with their MIG devices: no GPU is offered by both APIs;
    so are the GPUs of devices DRA claims hold (`dra_claimed`, UUIDs from the dra-plugin's record), whatever
    the split says now: a claim prepared before the split changed still has them."""
    gpus = settings.dra_devices.device_plugin_gpus(state.devices, claimed_gpus(dra_claimed, state.devices))
    migs_of: dict[str, list[DeviceState]] = {g.id: [] for g in gpus}
    for d in state.devices:
        if d.kind == "mig" and d.parent in migs_of:
            migs_of[d.parent].append(d)
    by_id = {g.id: g for g in gpus}
    out: dict[str, list[PluginDevice]] = {}
    strategy = settings.mig_strategy
    if strategy == "single" and any(g.mig_enabled for g in gpus):
        # A GPU lost at discovery has no MIG facts at all: it breaks no rule, it just offers nothing.
        plain = ", ".join(g.index for g in gpus if not g.mig_enabled and g.name)
        if plain:
            raise MigConfigError(f"MIG strategy single: all GPUs must have MIG enabled; GPU {plain} do not")
        profiles = sorted({m.profile for ms in migs_of.values() for m in ms})
        if len(profiles) > 1:
            raise MigConfigError(f"MIG strategy single: all MIG devices must have one profile; found "
                                 f"{', '.join(profiles)} (use the mixed strategy)")
        out[GPU_RESOURCE] = [_mig(m, by_id[g.id]) for g in gpus for m in migs_of[g.id]]
    else:
        for g in gpus:
            if strategy == "mixed" and g.mig_enabled:
                for m in migs_of[g.id]:
                    out.setdefault(f"nvidia.com/mig-{m.profile}", []).append(_mig(m, g))
            else:
                out.setdefault(GPU_RESOURCE, []).append(_whole(g, migs_of[g.id]))
    ts, mp = settings.sharing.time_slicing, settings.sharing.mps
    if ts is not None or mp is not None:
        out = _share(out, ts, mp, mps or MpsReadiness({}, set()))
    for name, devices in out.items():
        # The settings bound replicas for a node of up to 112 devices per resource; a bigger
        # node would make every ListAndWatch fail at the kubelet and the registrar re-register
        # forever, so it is refused here with the numbers instead.
        if len(devices) * DEVICE_ENTRY_BYTES > GRPC_MAX_MESSAGE_BYTES:
            raise ResourceTooLargeError(
                f"{name}: {len(devices)} device IDs do not fit in one ListAndWatch response (gRPC's 4 MiB "
                f"limit at the kubelet, {GRPC_MAX_MESSAGE_BYTES // DEVICE_ENTRY_BYTES} IDs); lower the replicas "
                f"or select fewer devices in sharing.timeSlicing")
    return out


def _share(resources: dict[str, list[PluginDevice]], ts: Replicated | None, mp: Replicated | None,
           mps: MpsReadiness) -> dict[str, list[PluginDevice]]:
    out: dict[str, list[PluginDevice]] = {}
    for name, devices in resources.items():
        t = ts.for_resource(name) if ts is not None else None
        m = mp.for_resource(name) if mp is not None else None
        for position, dev in enumerate(devices):
            in_t = t is not None and selected(t, position, dev.device)
            in_m = m is not None and selected(m, position, dev.device)
            if in_t and in_m:
                raise SharingError(f"sharing: GPU {dev.device.index} ({dev.id}) is selected by both "
                                   "sharing.timeSlicing and sharing.mps: give each its own devices")
            if in_m and mp is not None and m is not None:
                if dev.parent is not None:
                    raise SharingError(f"sharing.mps: {dev.id} is a MIG device: sharing using MPS is not "
                                       "supported for MIG devices (MIG strategy single)")
                served = mp.served_name(m)
                if served not in mps.seen_ready:
                    continue  # not offered before its daemon has been ready once
                health = dev.health if mps.ready.get(served, False) else UNHEALTHY
                out.setdefault(served, []).extend(_replicas(dev, health, m.replicas, "mps"))
            elif in_t and ts is not None and t is not None:
                out.setdefault(ts.served_name(t), []).extend(_replicas(dev, dev.health, t.replicas, "timeSlicing"))
            else:
                out.setdefault(name, []).append(dev)
    return out


def _replicas(dev: PluginDevice, health: str, count: int, sharing: str) -> list[PluginDevice]:
    """`count` IDs "<UUID>::<n>" of one device. Built on every health change (1 024 on a big
    node): positional arguments and locals, half the cost of keyword arguments per replica."""
    device_id, numa, device, parent = dev.id, dev.numa_node, dev.device, dev.parent
    return [PluginDevice(f"{device_id}::{n}", health, numa, device, parent, n, sharing) for n in range(count)]


def _entry(device_id: str, health: str, numa_node: int | None) -> bytes:
    """One device of a ListAndWatch response, in wire form (field 1, framed)."""
    topology = None if numa_node is None else pb.TopologyInfo(nodes=[pb.NUMANode(ID=numa_node)])
    device = pb.Device(ID=device_id, health=health, topology=topology)
    return pb.ListAndWatchResponse(devices=[device]).SerializeToString()


class ResourceTable:
    """The current device list of one resource; streams await `wait_changed`."""

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.version = 0
        self.devices: dict[str, PluginDevice] = {}
        self.response = pb.ListAndWatchResponse()
        self._raw = b""  # the response's wire form
        self._entries: dict[tuple[str, str, int | None], bytes] = {}
        self.topology = Topology([], [])
        self.shared = False  # replicas or MIG devices: preferred allocation spreads or packs them
        self._changed = asyncio.Condition()

    @property
    def healthy(self) -> int:
        return sum(1 for d in self.devices.values() if d.health == HEALTHY)

    async def update(self, devices: list[PluginDevice]) -> bool:
        # The response is put together from each entry's wire bytes, kept per (ID, health, NUMA
        # node): a serialized one-device response is exactly one framed entry, and entries
        # concatenate into the list. At 1 024 replicas, building and comparing the messages
        # themselves took ~4 ms per health change; this takes a fraction of it.
        cache = self._entries
        if len(cache) > 3 * len(devices):
            cache.clear()  # devices went away: memory follows the device list
        parts = []
        for d in devices:
            key = (d.id, d.health, d.numa_node)
            entry = cache.get(key)
            if entry is None:
                entry = cache[key] = _entry(*key)  # kept: a device flaps between two healths
            parts.append(entry)
        raw = b"".join(parts)
        self.devices = {d.id: d for d in devices}
        self.shared = any(d.replica is not None or d.parent is not None for d in devices)
        if raw == self._raw:
            return False
        self._raw = raw
        self.response = pb.ListAndWatchResponse.FromString(raw)
        async with self._changed:
            self.version += 1
            self._changed.notify_all()
        return True

    async def wait_changed(self, seen: int, give_up: Callable[[], bool] = lambda: False) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen or give_up())

    async def wake(self) -> None:
        """Wakes every waiter without a change, so that they re-check `give_up`."""
        async with self._changed:
            self._changed.notify_all()
