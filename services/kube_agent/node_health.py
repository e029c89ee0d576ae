"""The node's GPU health as the cluster sees it: the Node condition and the Events, as pure functions
of what the health bus says. No sockets, no API, no clock of its own (services.kube_agent.reporter
writes what this decides; tests call it with states they build).

The condition follows node-problem-detector's conventions, which cluster tooling already watches
(alerting, draino, Medik8s NodeHealthCheck): its type names the problem, `True` means the problem is
present, `Unknown` that it cannot be told (the health-monitor silent, or NVML unusable), the reason is
one CamelCase word naming the cause and the message names the devices.
A device an operator cordoned is out of service on purpose, not a problem: only a fault makes the
condition True.

The health-monitor says why a device is Unhealthy in parts (DeviceState.faults: "XID 79", "ECC DBE",
"GPU lost", "NVML <call> hung for 12 s", "probe failed: ..."; DeviceState.cordon: "cordoned: <why>"),
and in one text joining them (DeviceState.reason), which is all a monitor from before the parts
sends: its reason is split here, the cordon told from the faults by its prefix. Each fault's cause is
read by the patterns of CAUSES; a unit test feeds the health model's own texts through them, so a new
text there fails a test here rather than reading as an unknown fault.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from common.bus.messages import UNHEALTHY, DeviceState, HealthEvent, HealthState
from common.kubeapi import rfc3339

CONDITION_TYPE: Final = "GPUUnhealthy"
HEALTHY_REASON: Final = "AllGPUsHealthy"
SEVERAL_REASON: Final = "MultipleProblems"
NVML_REASON: Final = "NvmlFailure"
SILENT_REASON: Final = "HealthMonitorSilent"
UNKNOWN_FAULT: Final = "DeviceFault"  # a part no pattern names: still a fault (never read as healthy)
UNREADABLE: Final = "GpuUnreadable"  # a GPU NVML counts but cannot name (HealthState.error with NVML up)

# lastHeartbeatTime is refreshed this often while nothing changes: every write of a Node's status
# goes to etcd and to every watcher of Nodes (the scheduler, controllers), on every GPU node, so no
# more often than the node's own writers: node-problem-detector's default heartbeat
# (--k8s-exporter-heartbeat-period=5m) and the kubelet's status report while nothing changes
# (nodeStatusReportFrequency, 5 min). A heartbeat much older than that says this agent stopped.
HEARTBEAT_S: Final = 300.0
# No state from the health-monitor for this long: the condition says Unknown. Longer than what a
# frozen monitor costs before supervisord kills and restarts it (41 s plus its start), so that a
# restart in progress does not flip the condition; longer still where the buses' heartbeat is slower
# (silent_after).
SILENT_S: Final = 60.0


def silent_after(stale_after: float) -> float:
    """How long the health bus may be silent before the condition says Unknown: SILENT_S, or twice
    GPU_PLUGIN_STALE_AFTER when that is longer. The monitor re-sends its state every stale_after / 3
    while nothing changes; a limit shorter than a few of those would flip the condition to Unknown
    between two heartbeats of a healthy monitor (stale_after is unbounded)."""
    return max(SILENT_S, 2 * stale_after)
# The condition's message, and each Event's: `kubectl describe node` prints it whole, and a Node is
# read by every controller watching Nodes. 1 KiB names a few devices with their causes; more is
# said as a count.
MAX_MESSAGE: Final = 1024

# The health-monitor's reason texts, by cause (the first pattern matching the start of a part).
# None: a part that explains a fault named by another part (the driver's recovery advice).
CAUSES: Final[tuple[tuple[re.Pattern[str], str | None], ...]] = (
    # XID 79 is "GPU has fallen off the bus" (NVIDIA's catalogue): the fault the next probe reports as
    # "GPU lost". Named alike, the commonest fatal fault reads GpuLost, not MultipleProblems.
    (re.compile(r"XID 79\b"), "GpuLost"),
    (re.compile(r"XID \d+\b"), "XidError"),
    (re.compile(r"ECC [SD]BE\b"), "EccError"),
    (re.compile(r"GPU lost\b"), "GpuLost"),
    (re.compile(r"(?:NVML )?\S+ hung\b"), "ProbeHung"),
    (re.compile(r"probe failed\b"), "ProbeFailed"),
    (re.compile(r"row.remap"), "RowRemap"),
    (re.compile(r"retired pages\b"), "RetiredPages"),
    (re.compile(r"driver advises\b"), None),
)
CORDON_PREFIX: Final = "cordoned"
# "NVML nvmlDeviceGetPciInfo hung for 12 s": the duration grows with every probe; without it the
# message (and so the condition and the event key) stays the same while the fault does.
_DURATION = re.compile(r" for \d+(?:\.\d+)? s\b")
# The health-monitor's XID verdicts (services.health_monitor.xid_policy; a unit test ties them):
# an ignored XID is an application's error, not the node's, and makes no Event.
XID_VERDICTS: Final = ("fatal", "monitor-only")

EventType = Literal["Normal", "Warning"]


def cause_of(part: str) -> str | None:
    """The CamelCase cause a reason part names; None for advice; UNKNOWN_FAULT when no pattern matches."""
    for pattern, cause in CAUSES:
        if pattern.match(part):
            return cause
    return UNKNOWN_FAULT


def faults_of(device: DeviceState) -> list[str]:
    """An Unhealthy device's faults, not an operator's cordon, without the durations that change at every
    probe. From a monitor that sends no `faults`, the parts of its reason: a cordon's own text may hold
    "; " (the operator wrote it), so a part no pattern knows that follows a cordon is read as more of it."""
    if device.health != UNHEALTHY:
        return []
    if device.faults is not None:
        return list(dict.fromkeys(_DURATION.sub("", f) for f in device.faults if f))
    out: list[str] = []
    in_cordon = False
    for part in device.reason.split("; "):
        if not part:
            continue
        if part.startswith(CORDON_PREFIX):
            in_cordon = True
            continue
        cause = cause_of(part)
        if cause == UNKNOWN_FAULT and in_cordon and device.cordoned:
            continue
        in_cordon = False
        text = _DURATION.sub("", part)
        if text not in out:
            out.append(text)
    return out


def cordon_of(device: DeviceState) -> str:
    """The operator's cordon as the reason says it ("cordoned: bad fan"), "" when not cordoned."""
    if not device.cordoned:
        return ""
    if device.faults is not None:  # a monitor that sends the parts
        return device.cordon or CORDON_PREFIX
    parts = [p for p in device.reason.split("; ") if p.startswith(CORDON_PREFIX)]
    return "; ".join(parts) or CORDON_PREFIX


def label_of(device: DeviceState) -> str:
    """A device as the message names it: its index and UUID."""
    return f"{'MIG' if device.kind == 'mig' else 'GPU'} {device.index} ({device.id})"


def problems(state: HealthState) -> list[tuple[DeviceState, list[str]]]:
    """Each device with a fault, and its faults. A MIG device shares its GPU's faults: it is listed
    only for faults of its own, so a GPU with seven MIG devices is named once."""
    by_id = {d.id: d for d in state.devices}
    out = []
    for d in state.devices:
        faults = faults_of(d)
        parent = by_id.get(d.parent) if d.parent else None
        if parent is not None:
            inherited = set(faults_of(parent))
            faults = [f for f in faults if f not in inherited]
        if faults:
            out.append((d, faults))
    return out


def bounded(entries: Iterable[str], what: str = "devices", limit: int = MAX_MESSAGE) -> str:
    """Entries joined with "; " within `limit` characters: cut at an entry, the rest counted ("; and 3
    more devices"); an entry longer than the whole is cut itself."""
    items = list(entries)
    reserve = len(f"; and {len(items)} more {what}")
    text = ""
    for i, entry in enumerate(items):
        room = limit if i == len(items) - 1 else limit - reserve
        candidate = f"{text}; {entry}" if text else entry
        if len(candidate) <= room:
            text = candidate
        elif not text:
            text = entry[:max(0, room - 3)] + "..."
        else:
            return f"{text}; and {len(items) - i} more {what}"
    return text


@dataclass(frozen=True)
class Condition:
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


def condition_of(state: HealthState, silent_for: float = 0.0, heard_at: float = 0.0,
                 silent_s: float = SILENT_S) -> Condition:
    """GPUUnhealthy from the last health state, received `silent_for` seconds ago, at unix time
    `heard_at`; Unknown once that is `silent_s` ago (silent_after). The message names that time, not
    the silence's length: a message that grew with the silence would be a new condition, and a new
    write of the Node's status, at every look."""
    if silent_for >= silent_s:
        return Condition("Unknown", SILENT_REASON,
                         f"no health state from the health-monitor since {rfc3339(heard_at)}; GPU health unknown")
    if not state.nvml_ok:
        # Unknown, not True: without NVML the GPUs' health cannot be told, and NVML is away on purpose
        # while the GPU Operator installs or upgrades the driver (minutes), and at every monitor start
        # ("starting"). Remediation keyed on True (Medik8s NodeHealthCheck reboots the node) must not
        # act on that; one that should act on a driver that stays unusable lists Unknown with a
        # duration of its choosing (README, Health).
        return Condition("Unknown", NVML_REASON,
                         bounded([f"NVML unusable: {state.error or 'unknown error'}; GPU health unknown"]))
    found = problems(state)
    causes: dict[str, None] = {}
    entries = []
    for device, faults in found:
        for f in faults:
            cause = cause_of(f)
            if cause is not None:
                causes[cause] = None
        entries.append(f"{label_of(device)}: {', '.join(faults)}")
    if state.error:  # NVML up, some GPU it counts unreadable (the monitor serves the others)
        causes[UNREADABLE] = None
        entries.extend(p for p in state.error.split("; ") if p)
    if not entries:
        return Condition("False", HEALTHY_REASON, f"all {len(state.devices)} GPU and MIG devices are healthy"
                         if state.devices else "no GPU on this node")
    if not causes:  # only advice parts: still a fault
        causes[UNKNOWN_FAULT] = None
    reason = next(iter(causes)) if len(causes) == 1 else SEVERAL_REASON
    return Condition("True", reason, bounded(entries))


@dataclass(frozen=True)
class Occurrence:
    """One thing worth an Event on the Node."""

    type: EventType
    reason: str
    message: str
    time: float  # unix time it happened
    device: str = ""  # the UUID it is about; "" = the node (rate limits are per device)
    # Happenings that supersede each other (a device's health changes) share a slot: while one waits
    # to be written (the API is away, or rate-limited) a newer one replaces it. "" = its own.
    slot: str = ""


@dataclass
class Changes:
    """Turns the bus into Occurrences: a state is compared with the previous one (a lost or coalesced
    state costs nothing: the next shows the same change); driver events (XID, ECC) are taken as they come."""

    previous: HealthState | None = None
    labels: dict[str, str] = field(default_factory=dict)  # UUID -> "GPU 3 (GPU-...)" from the last state

    def on_state(self, state: HealthState, now: float) -> list[Occurrence]:
        prev, self.previous = self.previous, state
        self.labels = {d.id: label_of(d) for d in state.devices}
        out: list[Occurrence] = []
        if prev is None:
            # The agent just started: what is wrong now is said once (the condition says it too),
            # cordons and the config in place are not news.
            if not state.nvml_ok:
                out.append(self._nvml(state, now))
            out.extend(self._unhealthy(d, f, now) for d, f in problems(state))
            return out
        if prev.nvml_ok != state.nvml_ok:
            out.append(self._nvml(state, now) if not state.nvml_ok else Occurrence(
                "Normal", "NvmlRecovered", "NVML usable again", now, slot="nvml"))
        before = {d.id: f for d, f in problems(prev)}
        after = {d.id: (d, f) for d, f in problems(state)}
        for dev_id, (device, faults) in after.items():
            was = before.get(dev_id)
            if was is None or {cause_of(f) for f in was} != {cause_of(f) for f in faults}:
                out.append(self._unhealthy(device, faults, now))
        old_devices = {d.id: d for d in prev.devices}
        now_devices = {d.id: d for d in state.devices}
        for dev_id, was in before.items():
            now_dev = now_devices.get(dev_id)  # None: gone from the inventory (a monitor restarted without it)
            if dev_id not in after and now_dev is not None:
                still = f" (still {cordon_of(now_dev)})" if now_dev.cordoned else ""
                out.append(Occurrence("Normal", "GPURecovered",
                                      bounded([f"{label_of(now_dev)} recovered from {', '.join(was)}{still}"]),
                                      now, dev_id, f"health/{dev_id}"))
        out.extend(self._cordons(old_devices, state, now))
        out.extend(self._config(prev, state, now))
        return out

    def on_event(self, event: HealthEvent, now: float) -> list[Occurrence]:
        where = self.labels.get(event.device, event.device) if event.device else "every GPU"
        if event.event == "xid" and event.reason in XID_VERDICTS:
            return [Occurrence("Warning", "XidError", f"XID {event.xid} on {where}: {event.reason}", now,
                               event.device)]
        if event.event == "ecc" and event.reason == "ECC DBE":
            return [Occurrence("Warning", "EccError", f"double-bit ECC error on {where}", now, event.device)]
        return []

    @staticmethod
    def _nvml(state: HealthState, now: float) -> Occurrence:
        return Occurrence("Warning", NVML_REASON, bounded([f"NVML unusable: {state.error or 'unknown error'}"]),
                          now, slot="nvml")

    @staticmethod
    def _unhealthy(device: DeviceState, faults: list[str], now: float) -> Occurrence:
        return Occurrence("Warning", "GPUUnhealthy", bounded([f"{label_of(device)} Unhealthy: {', '.join(faults)}"]),
                          now, device.id, f"health/{device.id}")

    @staticmethod
    def _cordons(old: dict[str, DeviceState], state: HealthState, now: float) -> list[Occurrence]:
        """Cordons put on or taken off; a MIG device cordoned with its GPU is named by the GPU's."""
        out = []
        by_id = {d.id: d for d in state.devices}
        for d in state.devices:
            was = old.get(d.id)
            if was is None or was.cordoned == d.cordoned:
                continue
            parent, parent_was = by_id.get(d.parent), old.get(d.parent)
            if parent is not None and parent_was is not None and parent.cordoned != parent_was.cordoned:
                continue
            if d.cordoned:
                out.append(Occurrence("Normal", "GPUCordoned", bounded([f"{label_of(d)} {cordon_of(d)}"]), now,
                                      d.id, f"cordon/{d.id}"))
            else:
                out.append(Occurrence("Normal", "GPUUncordoned", f"{label_of(d)} uncordoned", now, d.id,
                                      f"cordon/{d.id}"))
        return out

    @staticmethod
    def _config(prev: HealthState, state: HealthState, now: float) -> list[Occurrence]:
        """The health-monitor's config: a new one applied, or one refused (the old one stays)."""
        old, new = prev.config, state.config
        same_run = prev.incarnation == state.incarnation
        out = []
        if new.digest and (new.digest != old.digest or (same_run and new.reloads > old.reloads)):
            out.append(Occurrence("Normal", "ConfigApplied",
                                  bounded([f"config {new.file or '(none)'} applied (sha256 {new.digest})"]), now,
                                  slot="config"))
        if new.refused and new.refused_digest != old.refused_digest:
            out.append(Occurrence("Warning", "ConfigRefused", bounded([
                f"config {new.file or '(none)'} (sha256 {new.refused_digest or '?'}) refused, "
                f"sha256 {new.digest or '(none)'} stays in effect: {new.refused}"]), now, slot="config"))
        return out
