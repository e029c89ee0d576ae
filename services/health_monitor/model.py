"""The health rules as plain code: no threads, no NVML calls, no sockets, no clock of its own.

Given the inventory, driver events, probe results, cordons, the policy and the time, the
model answers each device's state and the events to publish. The health-monitor process
(`monitor.py`) is the driver around it: it owns NVML, the event thread, probes, backoff and
the bus; everything it learns goes through here. Tests build a model in-process with a fake
clock, so every rule, recovery after a quiet period included, is checked without waiting.

Health model: each device carries a set of active faults (an XID, a double-bit ECC error,
"GPU lost", a failed probe, a pending row remap, ...) and possibly an operator's cordon.
A device is Unhealthy while it has any fault or cordon of its own, or its GPU has one (a
MIG device shares the fate of its GPU; an instance event stays on its instance). Faults
that a probe can see (lost, probe failure, row remap, retired pages) clear when the probe
no longer sees them. Faults reported only as events (XID, ECC) clear by recovery: when the
driver's recovery advice says nothing is needed and a probe interval has passed, or, on
drivers without that advice, after a quiet period of clean probes. Policy `never` keeps
every fault until a restart, as NVIDIA's plugin does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, Health, HealthEvent
from common.cordons import Cordon
from common.nvml.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    GPU_RECOVERY_ACTION_NONE,
    RECOVERY_ACTION_NAMES,
    WHOLE_GPU_INSTANCE,
    EventData,
)
from common.settings import HealthConfig
from services.health_monitor.discovery import Inventory
from services.health_monitor.xid_policy import FATAL, XidPolicy

log = logging.getLogger(__name__)

# Fault kinds. Sticky ones are seen only as events and clear by recovery; the others are
# what a probe sees, and clear when it stops seeing them.
STICKY = frozenset({"xid", "ecc"})
PROBED = frozenset({"lost", "probe", "remap", "retired", "hung"})
MAX_OUTBOX = 10000  # events for humans not yet published; the oldest go first in a storm


class Clock(Protocol):
    """Wall time stamps what is published; monotonic time measures quiet periods."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class RecoveryPolicy:
    policy: str = "auto"  # "auto" | "never"
    probe_interval: float = 10.0
    quiet_period: float = 60.0


@dataclass
class Probe:
    """What one probe of one GPU found (computed by the driver, in its probe thread)."""

    gpu: str
    faults: dict[str, str] = field(default_factory=dict)  # PROBED kind -> reason
    recovery_action: int | None = None  # None: the driver gives no advice
    dbe_total: int | None = None
    call: str = ""  # the NVML call in progress, for naming a hung one


@dataclass
class Tracker:
    faults: dict[str, str] = field(default_factory=dict)
    last_fault: float = 0.0  # monotonic time of the last fault seen
    recovery_action: int | None = None
    dbe_total: int | None = None


class HealthModel:
    def __init__(
        self,
        policy: XidPolicy,
        recovery: RecoveryPolicy | None = None,
        health: HealthConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._policy = policy
        self._recovery = recovery or RecoveryPolicy()
        self._health = health or HealthConfig()
        self._clock: Clock = clock or SystemClock()
        self.devices: dict[str, DeviceState] = {}
        self.cordons: dict[str, Cordon] = {}
        # Set while the cordon file cannot be read: nobody can tell which devices it names, so
        # every device counts as cordoned, with this reason (fail safe; never un-cordon).
        self.cordon_error = ""
        self._trackers: dict[str, Tracker] = {}
        self._gpus: list[str] = []
        self._children: dict[str, list[str]] = {}
        self._dbe_events: dict[str, int] = {}  # DBEs seen as events since the last probe
        self._outbox: deque[HealthEvent] = deque(maxlen=MAX_OUTBOX)

    def set_policy(self, policy: XidPolicy, recovery: RecoveryPolicy, health: HealthConfig) -> None:
        """A config reload: the new rules judge what happens from now on; faults already
        recorded stay until they clear (a device is never put back in service by a reload)."""
        self._policy, self._recovery, self._health = policy, recovery, health

    # -- inputs -----------------------------------------------------------------------
    def load_inventory(self, inventory: Inventory) -> None:
        # Discovery builds devices without `faults` (None: "not said"); here they say it, none yet.
        self.devices = {d.id: d if d.faults is not None else dataclasses.replace(d, faults=[])
                        for d in inventory.devices}
        self._gpus = list(inventory.handles)
        self._children = {gpu: list(kids) for gpu, kids in inventory.children.items()}
        for d in inventory.devices:
            if d.health == UNHEALTHY:
                # Lost, unreadable or hung during discovery: listed (so that the kubelet keeps it) but
                # without its minor number, PCI address or MIG layout, which Allocate needs. A clean
                # probe later does not fill those in: it stays out until the monitor rediscovers it.
                self.add_fault([d.id], "discovery", f"{d.reason} (at discovery; restart the plugin to rediscover)")

    def set_cordons(self, cordons: dict[str, Cordon]) -> list[str]:
        """Takes the operator's cordons; returns the IDs they name that this node lacks."""
        self.cordons = cordons
        return sorted(set(cordons) - set(self.devices))

    def add_fault(self, targets: list[str], kind: str, reason: str) -> None:
        now = self._clock.monotonic()
        for dev_id in targets:
            tracker = self._trackers.setdefault(dev_id, Tracker())
            tracker.faults[kind] = reason
            tracker.last_fault = now

    def apply_event(self, event: EventData) -> None:
        now = self._clock.time()
        targets = self.targets(event)
        device = event.uuid or ""
        if event.event_type & EVENT_XID_CRITICAL:
            xid = event.event_data
            verdict = self._policy.classify(xid)
            log.warning("XID %d on %s (gi %d, ci %d): %s", xid, device or "no device",
                        event.gpu_instance_id, event.compute_instance_id, verdict)
            for t in targets:
                self._count(t, xid_count=1)
            self._outbox.append(HealthEvent(time=now, device=device, event="xid", xid=xid, reason=verdict))
            if verdict == FATAL:
                self.add_fault(targets, "xid", f"XID {xid}")
        elif event.event_type & (EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC):
            double = bool(event.event_type & EVENT_DOUBLE_BIT_ECC)
            kind, policy = ("dbe", self._health.ecc_double_bit) if double else ("sbe", self._health.ecc_single_bit)
            gpu_of_event = self.gpu_of(event.uuid)
            if double and gpu_of_event:  # the probe compares the GPU's counter: remember this one was seen
                self._dbe_events[gpu_of_event] = self._dbe_events.get(gpu_of_event, 0) + 1
            for t in targets:
                self._count(t, **{f"{kind}_count": 1})
            reason = f"ECC {kind.upper()}"
            self._outbox.append(HealthEvent(time=now, device=device, event="ecc", reason=reason))
            if self._policy.checks_enabled and policy == "fatal":
                self.add_fault(targets, "ecc", reason)

    def apply_probes(self, results: list[Probe]) -> None:
        if not self._policy.checks_enabled:
            return
        now = self._clock.monotonic()
        for r in results:
            tracker = self._trackers.setdefault(r.gpu, Tracker())
            for kind in PROBED - r.faults.keys():
                tracker.faults.pop(kind, None)
            if r.faults:
                tracker.faults.update(r.faults)
                tracker.last_fault = now
            # A DBE the event channel missed (events unsupported) still counts.
            if r.dbe_total is not None and tracker.dbe_total is not None and r.dbe_total > tracker.dbe_total:
                missed = r.dbe_total - tracker.dbe_total - self._dbe_events.pop(r.gpu, 0)
                if missed > 0:
                    self._count(r.gpu, dbe_count=missed)
                    if self._health.ecc_double_bit == "fatal":
                        self.add_fault([r.gpu], "ecc", "ECC DBE")
            if r.dbe_total is not None:
                tracker.dbe_total = r.dbe_total
            tracker.recovery_action = r.recovery_action
            if not r.faults:
                self._maybe_recover(r.gpu, now)

    # -- answers ----------------------------------------------------------------------
    def refresh(self) -> bool:
        """Recomputes every device's health; True when any device changed. Transitions are
        queued as events (see `take_events`)."""
        now = self._clock.time()
        changed = False
        for dev_id, old in list(self.devices.items()):
            health, faults, cordon = self._evaluate(old)
            cordoned = bool(cordon)
            reason = "; ".join([cordon, *faults] if cordon else faults)
            if health == HEALTHY and old.health == UNHEALTHY:
                reason = "uncordoned" if old.cordoned and not cordoned else "recovered"
            elif health == HEALTHY:
                reason = old.reason if old.health == HEALTHY else ""
            if (health == old.health and reason == old.reason and cordoned == old.cordoned
                    and faults == old.faults and cordon == old.cordon):
                continue  # unchanged: checked before building a new DeviceState (~6 us each, on every fault)
            new = dataclasses.replace(old, health=health, reason=reason, cordoned=cordoned, faults=faults,
                                      cordon=cordon, since=now if health != old.health else old.since)
            self.devices[dev_id] = new
            changed = True
            if health != old.health:
                log.warning("device %s: %s -> %s (%s)", dev_id, old.health, health, reason)
                self._outbox.append(HealthEvent(time=now, device=dev_id, event="transition",
                                                old=old.health, new=health, reason=reason))
        return changed

    def take_events(self) -> list[HealthEvent]:
        events = list(self._outbox)
        self._outbox.clear()
        return events

    def gpu_of(self, device: str | None) -> str:
        dev = self.devices.get(device or "")
        if dev is None:
            return ""
        return dev.parent if dev.kind == "mig" else dev.id

    def targets(self, event: EventData) -> list[str]:
        """The devices an event names: a whole GPU, or the MIG devices of one instance."""
        if event.uuid is None:
            return list(self._gpus)  # NVIDIA's rule: an event naming no device hits all GPUs
        gpu_uuid = event.uuid
        dev = self.devices.get(gpu_uuid)
        if dev is not None and dev.kind == "mig":
            gpu_uuid = dev.parent
        if event.gpu_instance_id == WHOLE_GPU_INSTANCE:
            return [gpu_uuid]
        hit = [
            c
            for c in self._children.get(gpu_uuid, [])
            if self.devices[c].gpu_instance_id == event.gpu_instance_id
            and event.compute_instance_id in (WHOLE_GPU_INSTANCE, self.devices[c].compute_instance_id)
        ]
        return hit or [gpu_uuid]

    # -- rules ------------------------------------------------------------------------
    def _evaluate(self, dev: DeviceState) -> tuple[Health, list[str], str]:
        """(health, faults, cordon) from the device's own and its GPU's faults and cordons: the fault
        texts (each once), and the cordons' ("" when not cordoned); the reason is the cordon, then the faults."""
        cordons: list[str] = [self.cordon_error] if self.cordon_error else []
        faults: list[str] = []
        for source in (dev.id, dev.parent) if dev.parent else (dev.id,):
            cordon = self.cordons.get(source)
            if cordon is not None:
                cordons.append(f"cordoned: {cordon.reason}" if cordon.reason else "cordoned")
            faults.extend(self._trackers[source].faults.values() if source in self._trackers else ())
        faults = list(dict.fromkeys(faults))
        cordon_text = "; ".join(dict.fromkeys(cordons))
        return (UNHEALTHY if faults or cordon_text else HEALTHY), faults, cordon_text

    def _count(self, dev_id: str, **increments: int) -> None:
        dev = self.devices.get(dev_id)
        if dev is not None:
            self.devices[dev_id] = dataclasses.replace(
                dev, **{k: getattr(dev, k) + v for k, v in increments.items()}
            )

    def _maybe_recover(self, gpu: str, now: float) -> None:
        """Clears sticky faults of a GPU (and its MIG devices) whose condition has cleared."""
        if self._recovery.policy != "auto":
            return
        tracker = self._trackers[gpu]
        members = [gpu, *self._children.get(gpu, [])]
        sticky = [m for m in members if self._trackers.get(m) and self._trackers[m].faults.keys() & STICKY]
        if not sticky:
            return
        last = max(self._trackers[m].last_fault for m in sticky)
        if tracker.recovery_action is not None:
            ready = tracker.recovery_action == GPU_RECOVERY_ACTION_NONE and now - last >= self._recovery.probe_interval
            if not ready and tracker.recovery_action != GPU_RECOVERY_ACTION_NONE:
                advice = RECOVERY_ACTION_NAMES.get(tracker.recovery_action, str(tracker.recovery_action))
                for m in sticky:
                    self._trackers[m].faults["advice"] = f"driver advises: {advice}"
        else:
            ready = now - last >= self._recovery.quiet_period
        if ready:
            for m in sticky:
                t = self._trackers[m]
                for kind in (*STICKY, "advice"):
                    t.faults.pop(kind, None)
            log.info("GPU %s: fault cleared, recovering %s", gpu, ", ".join(sticky))
