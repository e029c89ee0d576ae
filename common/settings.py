"""Settings of every service, resolved and validated once, in one place.

Names follow NVIDIA's plugin so that an operator's DaemonSet environment and config file
carry over: each setting has a flag, an environment variable and (for NVIDIA's own
settings) a key of the v1 config file, with the precedence flag > environment > file >
default. Our own additions (paths, the NVML backend) use the same scheme.

Every service parses the same table, so a container environment configures all three
processes alike. A bad value raises `SettingsError` naming the setting, where it came
from and the allowed values.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEFAULT_KUBELET_SOCKET = "/var/lib/kubelet/device-plugins/kubelet.sock"
DEFAULT_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_RUN_DIR = "/run/gpu-device-plugin"
DEFAULT_STATE_DIR = "/var/lib/kubelet/device-plugins/gpu-device-plugin"

MIG_STRATEGIES = ("none", "single", "mixed")
DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
DEVICE_ID_STRATEGIES = ("uuid", "index")
NVML_BACKENDS = ("real", "simulated")
LOG_LEVELS = ("debug", "info", "warning", "error")
RECOVERY_POLICIES = ("auto", "never")
SHARED_ALLOCATION_POLICIES = ("distributed", "packed")
DEFAULT_CDI_SPEC_DIR = "/var/run/cdi"
ECC_POLICIES = ("fatal", "report")
# NVIDIA's defaults: where its Helm chart mounts the host's driver root inside the container, and the
# CLI its CDI hooks run (`nvidia-ctk hook <name>`; a `nvidia-cdi-hook` binary takes `<name>` alone).
DEFAULT_CONTAINER_DRIVER_ROOT = "/driver-root"
DEFAULT_CDI_HOOK_PATH = "/usr/bin/nvidia-ctk"
# MPS: the host directory NVIDIA's chart uses, and where NVIDIA mounts it in its containers and workloads.
DEFAULT_MPS_ROOT = "/run/nvidia/mps"
DEFAULT_MPS_CONTAINER_ROOT = "/mps"
DEVICE_DISCOVERY_STRATEGIES = ("auto", "nvml", "tegra")

# Config file input bounds: NVIDIA's v1 files are a few hundred bytes and five levels deep.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_ERROR_CHARS = 600  # an error echoes input: it stays one readable log line

# Below this the probe thread never rests (8 GPUs x 5 NVML calls take tens of ms on a real
# driver; 1e-9s used 93 % of a core). The default is 10s; tests and benches probe at 0.1-0.2s.
MIN_PROBE_INTERVAL_S = 0.1
MAX_DURATION_S = 86400.0

# Replicas: every replica is one entry of the resource's ListAndWatch response, which the
# kubelet receives under gRPC's default 4 MiB limit; beyond it the stream fails and the
# kubelet drops the resource, over and over. The largest entry is a MIG UUID with "::<n>",
# "Unhealthy" and a NUMA node (tests/unit/test_settings_input.py encodes it with protobuf
# and checks this figure); the largest resource is 16 GPUs split into 7 MIG devices each.
GRPC_MAX_MESSAGE_BYTES = 4 << 20
DEVICE_ENTRY_BYTES = 72
MAX_DEVICES_PER_RESOURCE = 16 * 7
MAX_REPLICAS = GRPC_MAX_MESSAGE_BYTES // (MAX_DEVICES_PER_RESOURCE * DEVICE_ENTRY_BYTES)


class SettingsError(ValueError):
    """A setting has a value we cannot accept; the message names it and the allowed values."""

    def __init__(self, message: str) -> None:
        # The last guard against echoing a huge value (an alias bomb printed 226 MB).
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        super().__init__(message)


def _show(value: Any) -> str:
    """repr() of input for an error message, clipped: the input may be anything."""
    text = repr(value) if isinstance(value, str | int | float | bool | type(None)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise SettingsError(f"{where}: {_show(value)} is not a boolean (true or false)")


def _choice(choices: Sequence[str]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise SettingsError(f"{where}: {_show(value)} is not one of {', '.join(choices)}")
        return value

    return parse


def _choice_list(choices: Sequence[str]) -> Callable[[Any, str], tuple[str, ...]]:
    def parse(value: Any, where: str) -> tuple[str, ...]:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        out: list[str] = []
        for item in items:
            item = str(item).strip()
            if item not in choices:
                raise SettingsError(f"{where}: {_show(item)} is not one of {', '.join(choices)}")
            if item not in out:
                out.append(item)
        if not out:
            raise SettingsError(f"{where}: empty list; allowed values: {', '.join(choices)}")
        return tuple(out)

    return parse


# Go's time.ParseDuration units (NVIDIA's users write Go durations: "1m30s", "500ms").
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_GO_DURATION = re.compile(rf"(?:{_GO_PART.pattern})+")
_PLAIN_SECONDS = re.compile(r"\d+\.?\d*|\.\d+")


def _duration_parser(minimum: float) -> Callable[[Any, str], float]:
    """Seconds from a Go duration ("1h30m", "1.5s", "500ms"), or a plain number of seconds."""

    def parse(value: Any, where: str) -> float:
        text = value if isinstance(value, str) else str(value) if isinstance(value, int | float) else ""
        text = text.strip()
        if isinstance(value, bool) or len(text) > 40:
            seconds = None
        elif _PLAIN_SECONDS.fullmatch(text):
            seconds = float(text)
        elif _GO_DURATION.fullmatch(text):
            # Rounded to Go's resolution (1ns), so that 100000us is exactly 0.1 s.
            seconds = round(sum(float(n) * _UNITS[u] for n, u in _GO_PART.findall(text)), 9)
        else:
            seconds = None
        if seconds is None:
            raise SettingsError(f"{where}: {_show(value)} is not a duration (e.g. 10s, 1m30s, 500ms, 1h)")
        if not minimum <= seconds <= MAX_DURATION_S:
            raise SettingsError(f"{where}: {_show(value)} must be at least {_go(minimum)} and at most 24h")
        return seconds

    return parse


def _go(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _port(value: Any, where: str) -> int:
    try:
        port = int(str(value))
    except ValueError:
        raise SettingsError(f"{where}: {_show(value)} is not a port number (0-65535)") from None
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise SettingsError(f"{where}: {_show(value)} is not a port number (0-65535)")
    return port


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise SettingsError(f"{where}: {_show(value)} is not a string")
    return str(value)


def _abs_path(value: Any, where: str) -> str:
    text = _str(value, where)
    if not text.startswith("/"):
        raise SettingsError(f"{where}: {text!r} is not an absolute path")
    return text


def _imex_channel_ids(value: Any, where: str) -> tuple[int, ...]:
    """NVIDIA's rule (AssertChannelIDsValid): [] or [0], the only channel a node-local plugin can hand out."""
    items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v.strip()]
    try:
        ids = tuple(int(str(v).strip()) for v in items if not isinstance(v, bool))
    except ValueError:
        raise SettingsError(f"{where}: {value!r} is not a list of IMEX channel IDs (integers)") from None
    if len(ids) != len(items) or ids not in ((), (0,)):
        raise SettingsError(f"{where}: invalid IMEX channel IDs {value!r}: channelIDs must be [] or [0]")
    return ids


def _discovery_strategy(value: Any, where: str) -> str:
    strategy = _choice(DEVICE_DISCOVERY_STRATEGIES)(value, where)
    if strategy == "tegra":
        # Tegra (CSV-described iGPUs) has no NVML device list: serving it is a different plugin.
        raise SettingsError(f"{where}: tegra is not served: this plugin discovers GPUs through NVML only "
                            "(allowed: auto, nvml)")
    return strategy


def _refused_list(what: str) -> Callable[[Any, str], tuple[str, ...]]:
    """A list setting of NVIDIA's we do not serve: empty is fine, anything else stops the start."""
    def parse(value: Any, where: str) -> tuple[str, ...]:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        out = tuple(str(v).strip() for v in items if str(v).strip())
        if out:
            raise SettingsError(f"{where}: {', '.join(out)}: {what}")
        return out

    return parse


def _refused_true(what: str) -> Callable[[Any, str], bool]:
    def parse(value: Any, where: str) -> bool:
        if _bool(value, where):
            raise SettingsError(f"{where}: true is not served: {what}")
        return False

    return parse


@dataclass(frozen=True)
class Spec:
    name: str
    flags: tuple[str, ...]
    env: str | None
    file_key: tuple[str, ...] | None  # path in the v1 config file
    default: Any
    parse: Callable[[Any, str], Any]
    help: str
    env_aliases: tuple[str, ...] = ()  # NVIDIA's older names for the same setting, read after `env`


SPECS: tuple[Spec, ...] = (
    Spec("config_file", ("--config-file",), "CONFIG_FILE", None, None, _str, "v1 config file (YAML)"),
    Spec("mig_strategy", ("--mig-strategy",), "MIG_STRATEGY", ("flags", "migStrategy"), "none",
         _choice(MIG_STRATEGIES), "how MIG devices are offered"),
    Spec("fail_on_init_error", ("--fail-on-init-error",), "FAIL_ON_INIT_ERROR", ("flags", "failOnInitError"),
         True, _bool, "exit when NVML cannot be initialised (false: serve nothing and retry)"),
    Spec("driver_root", ("--driver-root", "--nvidia-driver-root"), "NVIDIA_DRIVER_ROOT",
         ("flags", "nvidiaDriverRoot"), "/", _str, "root of the driver installation"),
    Spec("dev_root", ("--dev-root", "--nvidia-dev-root"), "NVIDIA_DEV_ROOT", ("flags", "nvidiaDevRoot"),
         None, _str, "root of the device nodes (default: the driver root)"),
    Spec("pass_device_specs", ("--pass-device-specs",), "PASS_DEVICE_SPECS",
         ("flags", "plugin", "passDeviceSpecs"), False, _bool, "add DeviceSpecs to Allocate answers"),
    Spec("device_list_strategy", ("--device-list-strategy",), "DEVICE_LIST_STRATEGY",
         ("flags", "plugin", "deviceListStrategy"), ("envvar",), _choice_list(DEVICE_LIST_STRATEGIES),
         "how allocated devices reach the container runtime"),
    Spec("device_id_strategy", ("--device-id-strategy",), "DEVICE_ID_STRATEGY",
         ("flags", "plugin", "deviceIDStrategy"), "uuid", _choice(DEVICE_ID_STRATEGIES),
         "how devices are named to the runtime"),
    Spec("cdi_annotation_prefix", ("--cdi-annotation-prefix",), "CDI_ANNOTATION_PREFIX",
         ("flags", "plugin", "cdiAnnotationPrefix"), "cdi.k8s.io/", _str, "prefix of the CDI annotation key"),
    Spec("cdi_spec_dir", ("--cdi-spec-dir",), "CDI_SPEC_DIR", None, DEFAULT_CDI_SPEC_DIR, _str,
         "where the CDI spec is written for the CDI strategies"),
    Spec("shared_devices_allocation_policy", ("--shared-devices-allocation-policy",),
         "SHARED_DEVICES_ALLOCATION_POLICY", ("flags", "plugin", "sharedDevicesAllocationPolicy"), "distributed",
         _choice(SHARED_ALLOCATION_POLICIES), "preferred allocation of replicas and MIG devices"),
    Spec("kubelet_socket", ("--kubelet-socket",), "KUBELET_SOCKET", ("flags", "plugin", "kubeletSocket"),
         DEFAULT_KUBELET_SOCKET, _str, 'kubelet registration socket; "" = do not register'),
    Spec("device_plugin_dir", ("--device-plugin-dir",), "DEVICE_PLUGIN_DIR", None, None, _str,
         "where plugin sockets are created (default: the kubelet socket's directory)"),
    Spec("run_dir", ("--run-dir",), "GPU_PLUGIN_RUN_DIR", None, DEFAULT_RUN_DIR, _str,
         "bus sockets and other runtime files (mode 0700)"),
    Spec("nvml_backend", ("--nvml-backend",), "NVML_BACKEND", None, "real", _choice(NVML_BACKENDS),
         "real: libnvidia-ml through pynvml; simulated: a device-description file"),
    Spec("simulated_devices", ("--simulated-devices",), "SIMULATED_DEVICES", None, "dgx-h100-8", _str,
         "simulated backend: fleet name (h200, dgx-h100-8, dgx-h100-8-mig) or description file"),
    Spec("log_level", ("--log-level",), "LOG_LEVEL", None, "info", _choice(LOG_LEVELS), "log level"),
    Spec("metrics_port", ("--metrics-port",), "METRICS_PORT", ("health", "metricsPort"), 0, _port,
         "health-monitor: serve Prometheus metrics on this TCP port (0: off, no listener)"),
    Spec("state_dir", ("--state-dir",), "GPU_PLUGIN_STATE_DIR", None, DEFAULT_STATE_DIR, _str,
         "state that must survive restarts (cordons); regular files under the device-plugin dir survive "
         "kubelet restarts and, being on its hostPath, pod restarts"),
    Spec("probe_interval", ("--health-probe-interval",), "HEALTH_PROBE_INTERVAL", ("health", "probeInterval"),
         10.0, _duration_parser(MIN_PROBE_INTERVAL_S), "how often every GPU is probed (at least 100ms)"),
    Spec("recovery_policy", ("--health-recovery",), "HEALTH_RECOVERY", ("health", "recovery", "policy"), "auto",
         _choice(RECOVERY_POLICIES), "auto: a device whose fault cleared returns to Healthy; never: as NVIDIA's"),
    Spec("quiet_period", ("--health-quiet-period",), "HEALTH_QUIET_PERIOD", ("health", "recovery", "quietPeriod"),
         60.0, _duration_parser(1.0), "clean probes needed before recovery where the driver gives no recovery advice"),
    # NVIDIA's settings for CDI, the containerized driver and fabric/storage devices.
    Spec("container_driver_root", ("--container-driver-root", "--driver-root-ctr-path"), "DRIVER_ROOT_CTR_PATH",
         ("flags", "plugin", "containerDriverRoot"), DEFAULT_CONTAINER_DRIVER_ROOT, _abs_path,
         "where the host's driver root is mounted in this container (NVML and the CDI spec are read from it; "
         "when absent, the driver root itself)", ("CONTAINER_DRIVER_ROOT",)),
    Spec("cdi_hook_path", ("--nvidia-cdi-hook-path", "--nvidia-ctk-path"), "NVIDIA_CDI_HOOK_PATH",
         ("flags", "plugin", "nvidiaCTKPath"), DEFAULT_CDI_HOOK_PATH, _abs_path,
         "host path of nvidia-ctk (or nvidia-cdi-hook) run by the CDI spec's hooks", ("NVIDIA_CTK_PATH",)),
    Spec("gds_enabled", ("--gds-enabled",), "GDS_ENABLED", ("flags", "gdsEnabled"), False, _bool,
         "give every GPU container GPUDirect Storage (NVIDIA_GDS=enabled; CDI: the nvidia-fs devices)"),
    Spec("mofed_enabled", ("--mofed-enabled",), "MOFED_ENABLED", ("flags", "mofedEnabled"), False, _bool,
         "give every GPU container the MOFED devices (NVIDIA_MOFED=enabled; CDI: /dev/infiniband nodes)"),
    Spec("gdrcopy_enabled", ("--gdrcopy-enabled",), "GDRCOPY_ENABLED", ("flags", "gdrcopyEnabled"), False,
         _refused_true("GDRCopy injection is not implemented"), "not served (must be false)"),
    Spec("imex_channel_ids", ("--imex-channel-ids",), "IMEX_CHANNEL_IDS", ("imex", "channelIDs"), (),
         _imex_channel_ids, "IMEX channels given to every GPU container: [] or [0]"),
    Spec("imex_required", ("--imex-required",), "IMEX_REQUIRED", ("imex", "required"), False, _bool,
         "the IMEX channels must exist at start (else they are skipped with a warning)"),
    Spec("device_discovery_strategy", ("--device-discovery-strategy",), "DEVICE_DISCOVERY_STRATEGY",
         ("flags", "deviceDiscoveryStrategy"), "auto", _discovery_strategy, "auto or nvml (tegra is refused)"),
    Spec("cdi_feature_flags", ("--cdi-feature-flags",), "CDI_FEATURE_FLAGS", None, (),
         _refused_list("nvcdi feature flags are not implemented (leave CDI_FEATURE_FLAGS empty)"),
         "not served (must be empty)"),
    Spec("mps_root", ("--mps-root",), "MPS_ROOT", ("flags", "mpsRoot"), None, _abs_path,
         f"host directory of the MPS pipe, log and shm directories (sharing.mps; default {DEFAULT_MPS_ROOT})"),
    Spec("mps_container_root", ("--mps-container-root",), "GPU_PLUGIN_MPS_CONTAINER_ROOT", None,
         DEFAULT_MPS_CONTAINER_ROOT, _abs_path,
         "where the MPS root is mounted in this container and in workloads (NVIDIA's: /mps)"),
)
_BY_NAME = {s.name: s for s in SPECS}


@dataclass(frozen=True)
class HealthConfig:
    """The `health:` section of the config file (our extension of NVIDIA's v1 format)."""

    fatal_xids: frozenset[int] = frozenset()  # count even if ignored by default
    ignored_xids: frozenset[int] = frozenset()
    monitor_only_xids: frozenset[int] = frozenset()  # reported, device stays schedulable
    ecc_single_bit: str = "report"
    ecc_double_bit: str = "fatal"


_HEALTH_KEYS = {"probeInterval", "recovery", "xids", "ecc", "metricsPort"}


def _xid_list(value: Any, where: str) -> frozenset[int]:
    if not isinstance(value, list):
        raise SettingsError(f"{where}: expected a list of XIDs (positive integers)")
    out = set()
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise SettingsError(f"{where}[{i}]: {_show(item)} is not an XID (a positive integer)")
        out.add(item)
    return frozenset(out)


def parse_health(section: Any) -> HealthConfig:
    if section is None:
        return HealthConfig()
    if not isinstance(section, Mapping):
        raise SettingsError("health: expected a mapping")
    for key in section:
        if key not in _HEALTH_KEYS:
            log.warning("config file: unknown key health.%s (known: %s)", key, ", ".join(sorted(_HEALTH_KEYS)))
    xids = section.get("xids") or {}
    if not isinstance(xids, Mapping):
        raise SettingsError("health.xids: expected a mapping with fatal, ignored, monitorOnly")
    for key in xids:
        if key not in ("fatal", "ignored", "monitorOnly"):
            raise SettingsError(f"health.xids.{key}: unknown key; allowed: fatal, ignored, monitorOnly")
    lists = {k: _xid_list(xids.get(k, []), f"health.xids.{k}") for k in ("fatal", "ignored", "monitorOnly")}
    for a, b in (("fatal", "ignored"), ("fatal", "monitorOnly"), ("ignored", "monitorOnly")):
        both = lists[a] & lists[b]
        if both:
            raise SettingsError(f"health.xids: XID {min(both)} is in both {a} and {b}")
    ecc = section.get("ecc") or {}
    if not isinstance(ecc, Mapping):
        raise SettingsError("health.ecc: expected a mapping with singleBit, doubleBit")
    for key in ecc:
        if key not in ("singleBit", "doubleBit"):
            raise SettingsError(f"health.ecc.{key}: unknown key; allowed: singleBit, doubleBit")
    return HealthConfig(
        fatal_xids=lists["fatal"],
        ignored_xids=lists["ignored"],
        monitor_only_xids=lists["monitorOnly"],
        ecc_single_bit=_choice(ECC_POLICIES)(ecc.get("singleBit", "report"), "health.ecc.singleBit"),
        ecc_double_bit=_choice(ECC_POLICIES)(ecc.get("doubleBit", "fatal"), "health.ecc.doubleBit"),
    )


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


@dataclass(frozen=True)
class Sharing:
    """`kind`, `rename_by_default`, `fail_requests_greater_than_one` and `resources` describe
    time-slicing when it is configured, else MPS (what they always meant); `time_slicing` and
    `mps` hold each section on its own, since both may be set for different GPUs."""

    kind: str = ""  # "" (none), "timeSlicing" or "mps"
    rename_by_default: bool = False
    fail_requests_greater_than_one: bool = False
    resources: tuple[SharedResource, ...] = ()
    time_slicing: Replicated | None = None
    mps: Replicated | None = None

    def for_resource(self, name: str) -> SharedResource | None:
        return next((r for r in self.resources if r.name == name), None)

    def served_name(self, res: SharedResource) -> str:
        if res.rename:
            return res.rename
        return f"{res.name}.shared" if self.rename_by_default else res.name


# An MPS server serves at most 48 clients on Volta and newer (16 before): NVIDIA's
# mps-control-daemon refuses more replicas than that per GPU at start.
MAX_MPS_REPLICAS = 48


def _resource_name(value: Any, where: str) -> str:
    text = _str(value, where)
    if not text.startswith("nvidia.com/") or len(text) <= len("nvidia.com/"):
        raise SettingsError(f"{where}: {_show(text)} is not a resource name of the form nvidia.com/<name>")
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
            raise SettingsError(f"{w}.replicas: {_show(replicas)} must be an integer >= 2")
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
        rename_by_default=_bool(body.get("renameByDefault", False), f"{where}.renameByDefault"),
        fail_requests_greater_than_one=_bool(body.get("failRequestsGreaterThanOne", fail_default),
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
    main = ts if ts is not None else mps
    if main is None:
        return Sharing()
    return Sharing(kind=main.kind, rename_by_default=main.rename_by_default,
                   fail_requests_greater_than_one=main.fail_requests_greater_than_one, resources=main.resources,
                   time_slicing=ts, mps=mps)


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
                raise SettingsError(f"{where}[{i}]: {_show(item)} is not a GPU index, \"i:j\" or a GPU/MIG UUID")
            out.append(text)
        return tuple(out)
    raise SettingsError(
        f"{where}: {_show(value)} must be all, a number of GPUs, or a list of indices / \"i:j\" / UUIDs")


# The v1 file's keys we know: anything else is warned about, never silently used.
_KNOWN_FILE_KEYS: dict[str, Any] = {
    "version": None,
    "flags": {
        "migStrategy": None, "failOnInitError": None, "nvidiaDriverRoot": None, "nvidiaDevRoot": None,
        "gdsEnabled": None, "mofedEnabled": None, "gdrcopyEnabled": None, "mpsRoot": None,
        "useNodeFeatureAPI": None, "deviceDiscoveryStrategy": None,
        "plugin": {"passDeviceSpecs": None, "deviceListStrategy": None, "deviceIDStrategy": None,
                   "cdiAnnotationPrefix": None, "nvidiaCTKPath": None, "containerDriverRoot": None,
                   "kubeletSocket": None, "sharedDevicesAllocationPolicy": None},
        "gfd": None,
    },
    "resources": None,
    "sharing": None,  # checked by parse_sharing
    "health": None,  # checked by parse_health
    "imex": {"channelIDs": None, "required": None},
}


def _refuse_resources(section: Any) -> None:
    # NVIDIA's plugin drops `resources` with a log line; an operator who set it expects renamed resources.
    if section:
        raise SettingsError("resources: custom resource naming is not supported (NVIDIA's plugin ignores it "
                            "too); remove the key, or rename with sharing.timeSlicing.resources[].rename")


def _warn_unknown(tree: Mapping[str, Any], known: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in tree.items():
        if key not in known:
            log.warning("config file: unknown key %s%s is ignored (known: %s)", prefix, key,
                        ", ".join(sorted(known)))
        elif isinstance(known[key], Mapping) and isinstance(value, Mapping):
            _warn_unknown(value, known[key], f"{prefix}{key}.")


@dataclass(frozen=True)
class Settings:
    config_file: str | None
    mig_strategy: str
    fail_on_init_error: bool
    driver_root: str
    dev_root: str
    pass_device_specs: bool
    device_list_strategy: tuple[str, ...]
    device_id_strategy: str
    kubelet_socket: str
    device_plugin_dir: Path
    run_dir: Path
    nvml_backend: str
    simulated_devices: str
    log_level: str
    metrics_port: int
    state_dir: Path
    probe_interval: float
    recovery_policy: str
    quiet_period: float
    health: HealthConfig
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    cdi_spec_dir: Path = Path(DEFAULT_CDI_SPEC_DIR)
    shared_devices_allocation_policy: str = "distributed"
    sharing: Sharing = field(default_factory=lambda: Sharing())
    container_driver_root: str = DEFAULT_CONTAINER_DRIVER_ROOT
    cdi_hook_path: str = DEFAULT_CDI_HOOK_PATH
    gds_enabled: bool = False
    mofed_enabled: bool = False
    gdrcopy_enabled: bool = False
    imex_channel_ids: tuple[int, ...] = ()
    imex_required: bool = False
    device_discovery_strategy: str = "auto"
    cdi_feature_flags: tuple[str, ...] = ()
    mps_root: str | None = None
    mps_container_root: str = DEFAULT_MPS_CONTAINER_ROOT

    @property
    def mps_host_root(self) -> str:
        return self.mps_root or DEFAULT_MPS_ROOT

    def bus_path(self, name: str) -> Path:
        return self.run_dir / name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every setting as a flag whose default is None (= not given)."""
    group = parser.add_argument_group("settings (flag > environment > config file)")
    for spec in SPECS:
        env = f" [env {', '.join((spec.env, *spec.env_aliases))}]" if spec.env else ""
        # A boolean flag alone means true, as NVIDIA's (--imex-required); a value is still accepted.
        if spec.default is False:
            group.add_argument(*spec.flags, dest=spec.name, default=None, help=f"{spec.help}{env}", nargs="?",
                               const="true")
        else:
            group.add_argument(*spec.flags, dest=spec.name, default=None, help=f"{spec.help}{env}")


def _lookup(tree: Mapping[str, Any], key: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = tree
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


class _ConfigInputError(Exception):
    """Raised inside the YAML loader; becomes a SettingsError naming the file."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and anchors, and with a depth bound.

    Aliases are what make a 1.4 KB file expand to gigabytes (and merge keys need them); no
    config of ours needs one. Depth is bounded before the composer recurses: 3000 levels
    ended in a RecursionError traceback. The pure-Python composer is what can be hooked;
    config files are small, so its speed does not matter.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _ConfigInputError(f"line {line}: YAML anchors and aliases (&, *, <<) are not accepted")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _ConfigInputError(f"line {line}: nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_sections(tree: Mapping[str, Any], known: Mapping[str, Any], prefix: str = "") -> None:
    """A known section that is not a mapping is an error: `flags: 1` used to be silently ignored."""
    for key, sub in known.items():
        value = tree.get(key)
        if isinstance(sub, Mapping) and value is not None:
            if not isinstance(value, Mapping):
                raise SettingsError(f"{prefix}{key}: expected a mapping, got {_show(value)}")
            _check_sections(value, sub, f"{prefix}{key}.")


def load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise SettingsError(f"config file {path}: {e.strerror}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise SettingsError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SettingsError(f"config file {path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from e
    try:
        loader = _StrictLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _ConfigInputError as e:
        raise SettingsError(f"config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise SettingsError(f"config file {path}: not valid YAML: {str(e)[:300]}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping at the top level")
    version = data.get("version")
    if version != "v1":
        raise SettingsError(f"config file {path}: version: {_show(version)} is not supported; allowed values: v1")
    return data


def resolve(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    given = vars(args) if args is not None else {}

    def raw(spec: Spec, file_data: Mapping[str, Any]) -> tuple[Any, str]:
        if given.get(spec.name) is not None:
            return given[spec.name], f"flag {spec.flags[0]}"
        for env in (spec.env, *spec.env_aliases) if spec.env else ():
            if env in environ:
                return environ[env], f"environment {env}"
        if spec.file_key is not None:
            found, value = _lookup(file_data, spec.file_key)
            if found and value is not None:  # "key:" with no value means unset, as in NVIDIA's plugin
                return value, f"config file key {'.'.join(spec.file_key)}"
        return spec.default, "default"

    config_value, _ = raw(_BY_NAME["config_file"], {})
    file_data = load_config_file(str(config_value)) if config_value else {}
    _check_sections(file_data, _KNOWN_FILE_KEYS)

    values: dict[str, Any] = {}
    for spec in SPECS:
        value, where = raw(spec, file_data)
        values[spec.name] = None if value is None else spec.parse(value, f"{spec.name} ({where})")
    if values["dev_root"] is None:
        values["dev_root"] = values["driver_root"]
    if values["device_plugin_dir"] is None:
        sock = values["kubelet_socket"]
        values["device_plugin_dir"] = os.path.dirname(sock) if sock else DEFAULT_DEVICE_PLUGIN_DIR
    values["device_plugin_dir"] = Path(values["device_plugin_dir"])
    values["run_dir"] = Path(values["run_dir"])
    values["state_dir"] = Path(values["state_dir"])
    values["health"] = parse_health(file_data.get("health"))
    values["sharing"] = parse_sharing(file_data.get("sharing"))
    if values["sharing"].mps is not None and values["mig_strategy"] == "mixed":
        raise SettingsError("sharing.mps: using --mig-strategy=mixed is not supported with MPS")
    values["cdi_spec_dir"] = Path(values["cdi_spec_dir"])
    _refuse_resources(file_data.get("resources"))
    _warn_unknown(file_data, _KNOWN_FILE_KEYS)
    return Settings(**values)
