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
class Sharing:
    kind: str = ""  # "" (none), "timeSlicing" or "mps"
    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False
    resources: tuple[SharedResource, ...] = ()

    def for_resource(self, name: str) -> SharedResource | None:
        return next((r for r in self.resources if r.name == name), None)

    def served_name(self, res: SharedResource) -> str:
        if res.rename:
            return res.rename
        return f"{res.name}.shared" if self.rename_by_default else res.name


def _resource_name(value: Any, where: str) -> str:
    text = string(value, where)
    if not text.startswith("nvidia.com/") or len(text) <= len("nvidia.com/"):
        raise SettingsError(f"{where}: {show(text)} is not a resource name of the form nvidia.com/<name>")
    return text


def parse_sharing(section: Any) -> Sharing:
    """The v1 `sharing:` section, validated; NVIDIA's rules and wording where it has them."""
    if section is None:
        return Sharing()
    if not isinstance(section, Mapping):
        raise SettingsError("sharing: expected a mapping with timeSlicing or mps")
    kinds = [k for k in ("timeSlicing", "mps") if section.get(k) is not None]
    for key in section:
        if key not in ("timeSlicing", "mps"):
            log.warning("config file: unknown key sharing.%s (known: mps, timeSlicing)", key)
    if len(kinds) > 1:
        raise SettingsError("sharing: timeSlicing and mps are mutually exclusive; set one")
    if not kinds:
        return Sharing()
    kind = kinds[0]
    body = section[kind]
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
    return Sharing(
        kind=kind,
        rename_by_default=boolean(body.get("renameByDefault", False), f"{where}.renameByDefault"),
        fail_requests_greater_than_one=boolean(body.get("failRequestsGreaterThanOne", False),
                                             f"{where}.failRequestsGreaterThanOne"),
        resources=tuple(resources),
    )


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
