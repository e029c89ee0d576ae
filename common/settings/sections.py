"""The structured parts of the settings: the health policy's view and the v1 file's
`sharing:` section (a list of resources, which has no flag or environment form)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.settings.values import MAX_DEVICES_PER_RESOURCE, MAX_REPLICAS, SettingsError, boolean, show, string

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthConfig:
    """The health policy of the `health:` settings, as the health monitor applies it
    (a view of Settings: see Settings.health)."""

    fatal_xids: frozenset[int] = frozenset()  # count even if ignored by default
    ignored_xids: frozenset[int] = frozenset()
    monitor_only_xids: frozenset[int] = frozenset()  # reported, device stays schedulable
    ecc_single_bit: str = "report"
    ecc_double_bit: str = "fatal"


@dataclass(frozen=True)
class SharedResource:
    """One entry of sharing.timeSlicing.resources (or sharing.mps.resources)."""

    name: str  # nvidia.com/gpu or nvidia.com/mig-<profile>
    rename: str  # "" = keep the name (or <name>.shared with renameByDefault)
    replicas: int
    devices: tuple[str, ...] | int | None  # None = all; N = the first N GPUs; or indices, "i:j", UUIDs


@dataclass(frozen=True)
class Replicated:
    """One of sharing.timeSlicing or sharing.mps, validated."""

    kind: str  # "timeSlicing" or "mps"
    rename_by_default: bool
    fail_requests_greater_than_one: bool
    resources: tuple[SharedResource, ...]

    def for_resource(self, name: str) -> SharedResource | None:
        return next((r for r in self.resources if r.name == name), None)

    def served_name(self, res: SharedResource) -> str:
        if res.rename:
            return res.rename
        return f"{res.name}.shared" if self.rename_by_default else res.name


NONE = Replicated("", rename_by_default=False, fail_requests_greater_than_one=False, resources=())


@dataclass(frozen=True)
class Sharing:
    """The `sharing:` section: time-slicing and MPS each on its own, since both may be set for
    different GPUs. `main` (time-slicing when it is configured, else MPS) answers what a single
    section used to: kind, renames, resources."""

    time_slicing: Replicated | None = None
    mps: Replicated | None = None

    @property
    def main(self) -> Replicated:
        return self.time_slicing or self.mps or NONE

    @property
    def kind(self) -> str:  # "" (none), "timeSlicing" or "mps"
        return self.main.kind

    @property
    def rename_by_default(self) -> bool:
        return self.main.rename_by_default

    @property
    def fail_requests_greater_than_one(self) -> bool:
        return self.main.fail_requests_greater_than_one

    @property
    def resources(self) -> tuple[SharedResource, ...]:
        return self.main.resources

    def for_resource(self, name: str) -> SharedResource | None:
        return self.main.for_resource(name)

    def served_name(self, res: SharedResource) -> str:
        return self.main.served_name(res)


# An MPS server serves at most 48 clients on Volta and newer (16 before): NVIDIA's
# mps-control-daemon refuses more replicas than that per GPU at start.
MAX_MPS_REPLICAS = 48


def _resource_name(value: Any, where: str) -> str:
    text = string(value, where)
    if not text.startswith("nvidia.com/") or len(text) <= len("nvidia.com/"):
        raise SettingsError(f"{where}: {show(text)} is not a resource name of the form nvidia.com/<name>")
    return text


def _replicated(kind: str, body: Any) -> Replicated:
    where = f"sharing.{kind}"
    if not isinstance(body, Mapping):
        raise SettingsError(f"{where}: expected a mapping")
    for key in body:
        if key not in ("renameByDefault", "failRequestsGreaterThanOne", "resources"):
            log.warning("config file: unknown key %s.%s", where, key)
    raw = body.get("resources")
    if not isinstance(raw, list) or not raw:
        raise SettingsError(f"{where}.resources: expected a non-empty list")
    resources: list[SharedResource] = []
    for i, item in enumerate(raw):
        w = f"{where}.resources[{i}]"
        if not isinstance(item, Mapping):
            raise SettingsError(f"{w}: expected a mapping with name, replicas, devices")
        for key in item:
            if key not in ("name", "rename", "replicas", "devices"):
                log.warning("config file: unknown key %s.%s", w, key)
        name = _resource_name(item.get("name"), f"{w}.name")
        replicas = item.get("replicas")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 2:
            raise SettingsError(f"{w}.replicas: {show(replicas)} must be an integer >= 2")
        if replicas > MAX_REPLICAS:
            raise SettingsError(
                f"{w}.replicas: {replicas} is more than a ListAndWatch response can carry: at most {MAX_REPLICAS} "
                f"(gRPC's 4 MiB message limit at the kubelet, for up to {MAX_DEVICES_PER_RESOURCE} devices)")
        rename = _resource_name(item["rename"], f"{w}.rename") if item.get("rename") else ""
        resources.append(SharedResource(name, rename, replicas, _devices(item.get("devices", "all"), f"{w}.devices")))
        if [r.name for r in resources].count(name) > 1:
            raise SettingsError(f"{w}.name: {name} is listed twice")
    # NVIDIA's default for MPS is true (its historical behaviour); for time-slicing false.
    fail_default = kind == "mps"
    out = Replicated(
        kind=kind,
        rename_by_default=boolean(body.get("renameByDefault", False), f"{where}.renameByDefault"),
        fail_requests_greater_than_one=boolean(body.get("failRequestsGreaterThanOne", fail_default),
                                             f"{where}.failRequestsGreaterThanOne"),
        resources=tuple(resources),
    )
    if kind == "mps":
        _check_mps(out)
    return out


def _check_mps(mps: Replicated) -> None:
    """What NVIDIA's plugin and mps-control-daemon refuse for MPS, refused here at start."""
    for i, res in enumerate(mps.resources):
        w = f"sharing.mps.resources[{i}]"
        if res.name != "nvidia.com/gpu":
            raise SettingsError(f"{w}.name: {res.name}: sharing using MPS is not supported for MIG devices "
                                "(only nvidia.com/gpu can be shared with MPS)")
        if res.replicas > MAX_MPS_REPLICAS:
            raise SettingsError(f"{w}.replicas: {res.replicas}: maximum allowed replicas exceeded: an MPS server "
                                f"serves at most {MAX_MPS_REPLICAS} clients per GPU")
        if isinstance(res.devices, tuple):
            migs = [d for d in res.devices if d.startswith("MIG-") or ":" in d]
            if migs:
                raise SettingsError(f"{w}.devices: {migs[0]}: sharing using MPS is not supported for MIG devices")
        if res.devices is not None and mps.served_name(res) == res.name:
            # The GPUs left out would stay nvidia.com/gpu beside the MPS replicas, and one resource
            # cannot answer Allocate both with and without MPS.
            raise SettingsError(f"{w}.devices: a device selection for MPS needs rename (or renameByDefault): the "
                                f"GPUs not selected stay {res.name}, which must not also be MPS replicas")


def _overlap(a: SharedResource, b: SharedResource) -> str:
    """A GPU both selections surely hold ("" if none is sure; UUIDs are checked against the node)."""
    if a.name != b.name:
        return ""
    if a.devices is None or b.devices is None:
        return "all GPUs"
    if isinstance(a.devices, int) and isinstance(b.devices, int):
        return "GPU 0"
    if isinstance(a.devices, int) or isinstance(b.devices, int):
        count, listed = (a.devices, b.devices) if isinstance(a.devices, int) else (b.devices, a.devices)
        assert isinstance(count, int) and isinstance(listed, tuple)
        hit = [d for d in listed if d.isdigit() and int(d) < count]
        return f"GPU {hit[0]}" if hit else ""
    assert isinstance(a.devices, tuple) and isinstance(b.devices, tuple)
    both = [d for d in a.devices if d in b.devices]
    return f"GPU {both[0]}" if both else ""


def parse_sharing(section: Any) -> Sharing:
    """The v1 `sharing:` section, validated; NVIDIA's rules and wording where it has them."""
    if section is None:
        return Sharing()
    if not isinstance(section, Mapping):
        raise SettingsError("sharing: expected a mapping with timeSlicing or mps")
    for key in section:
        if key not in ("timeSlicing", "mps"):
            log.warning("config file: unknown key sharing.%s (known: mps, timeSlicing)", key)
    ts = _replicated("timeSlicing", section["timeSlicing"]) if section.get("timeSlicing") is not None else None
    mps = _replicated("mps", section["mps"]) if section.get("mps") is not None else None
    if ts is not None and mps is not None:
        # NVIDIA's plugin silently uses MPS alone when both are set; here both are served, on different GPUs.
        for t in ts.resources:
            for m in mps.resources:
                where = _overlap(t, m)
                if where:
                    raise SettingsError(f"sharing: timeSlicing and mps are mutually exclusive on a GPU: both select "
                                        f"{where} of {t.name}; give each its own devices")
                if ts.served_name(t) == mps.served_name(m):
                    raise SettingsError(f"sharing: timeSlicing and mps replicas cannot be served under one name "
                                        f"({mps.served_name(m)}): rename one of them")
    return Sharing(time_slicing=ts, mps=mps)


def _devices(value: Any, where: str) -> tuple[str, ...] | int | None:
    if value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise SettingsError(f"{where}: {value} must be at least 1")
        return value
    if isinstance(value, list) and value:
        out: list[str] = []
        for i, item in enumerate(value):
            text = str(item)
            if not (text.isdigit() or (text.count(":") == 1 and all(p.isdigit() for p in text.split(":")))
                    or text.startswith(("GPU-", "MIG-"))):
                raise SettingsError(f"{where}[{i}]: {show(item)} is not a GPU index, \"i:j\" or a GPU/MIG UUID")
            out.append(text)
        return tuple(out)
    raise SettingsError(
        f"{where}: {show(value)} must be all, a number of GPUs, or a list of indices / \"i:j\" / UUIDs")
