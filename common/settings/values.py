"""Value parsers of the settings: each takes the raw value (a flag or environment string, or
whatever YAML produced) and where it came from, and returns the typed value or raises
SettingsError naming the setting, its source and what is allowed. Input is echoed clipped:
it may be anything, of any size."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
# Values (scalars, lists, mappings) in one file: a 100 000-item XID list took 4 s and 96 MB of
# PyYAML's pure-Python composer before anything looked at it.
MAX_CONFIG_NODES = 10_000
# NVIDIA's XID catalogue ends below 200: a bigger number is a typo, not a future XID (10**23 was
# accepted). A list names at most every XID there could be worth naming.
MAX_XID = 65_535
MAX_XID_ITEMS = 1024
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


def show(value: Any) -> str:
    """repr() of input for an error message, clipped: the input may be anything."""
    text = repr(value) if isinstance(value, str | int | float | bool | type(None)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise SettingsError(f"{where}: {show(value)} is not a boolean (true or false)")


def choice(choices: Sequence[str]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise SettingsError(f"{where}: {show(value)} is not one of {', '.join(choices)}")
        return value

    return parse


def choice_list(choices: Sequence[str]) -> Callable[[Any, str], tuple[str, ...]]:
    def parse(value: Any, where: str) -> tuple[str, ...]:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        out: list[str] = []
        for item in items:
            item = str(item).strip()
            if item not in choices:
                raise SettingsError(f"{where}: {show(item)} is not one of {', '.join(choices)}")
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


def duration(minimum: float) -> Callable[[Any, str], float]:
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
            raise SettingsError(f"{where}: {show(value)} is not a duration (e.g. 10s, 1m30s, 500ms, 1h)")
        if not minimum <= seconds <= MAX_DURATION_S:
            raise SettingsError(f"{where}: {show(value)} must be at least {go_duration(minimum)} and at most 24h")
        return seconds

    return parse


def go_duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def port(value: Any, where: str) -> int:
    try:
        port = int(str(value))
    except ValueError:
        raise SettingsError(f"{where}: {show(value)} is not a port number (0-65535)") from None
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise SettingsError(f"{where}: {show(value)} is not a port number (0-65535)")
    return port


def string(value: Any, where: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise SettingsError(f"{where}: {show(value)} is not a string")
    return str(value)


def abs_path(value: Any, where: str) -> str:
    text = string(value, where)
    if not text.startswith("/"):
        raise SettingsError(f"{where}: {text!r} is not an absolute path")
    return text


def imex_channel_ids(value: Any, where: str) -> tuple[int, ...]:
    """NVIDIA's rule (AssertChannelIDsValid): [] or [0], the only channel a node-local plugin can hand out."""
    items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v.strip()]
    try:
        ids = tuple(int(str(v).strip()) for v in items if not isinstance(v, bool))
    except ValueError:
        raise SettingsError(f"{where}: {value!r} is not a list of IMEX channel IDs (integers)") from None
    if len(ids) != len(items) or ids not in ((), (0,)):
        raise SettingsError(f"{where}: invalid IMEX channel IDs {value!r}: channelIDs must be [] or [0]")
    return ids


def discovery_strategy(value: Any, where: str) -> str:
    strategy = choice(DEVICE_DISCOVERY_STRATEGIES)(value, where)
    if strategy == "tegra":
        # Tegra (CSV-described iGPUs) has no NVML device list: serving it is a different plugin.
        raise SettingsError(f"{where}: tegra is not served: this plugin discovers GPUs through NVML only "
                            "(allowed: auto, nvml)")
    return strategy


def refused_list(what: str) -> Callable[[Any, str], tuple[str, ...]]:
    """A list setting of NVIDIA's we do not serve: empty is fine, anything else stops the start."""
    def parse(value: Any, where: str) -> tuple[str, ...]:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        out = tuple(str(v).strip() for v in items if str(v).strip())
        if out:
            raise SettingsError(f"{where}: {', '.join(out)}: {what}")
        return out

    return parse


def path(value: Any, where: str) -> Path:
    return Path(string(value, where))


def xid_list(value: Any, where: str) -> frozenset[int]:
    """XIDs: a list (config file) or a comma list (flag, environment) of positive integers."""
    items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v.strip()]
    if len(items) > MAX_XID_ITEMS:
        raise SettingsError(f"{where}: {len(items)} items; at most {MAX_XID_ITEMS}")
    out = set()
    for i, item in enumerate(items):
        if isinstance(item, str) and item.strip().isascii() and item.strip().isdigit() and len(item.strip()) < 10:
            item = int(item.strip())
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= MAX_XID:
            raise SettingsError(f"{where}: item {i}: {show(item)} is not an XID (an integer from 1 to {MAX_XID})")
        out.add(item)
    return frozenset(out)


def healthchecks(value: Any, where: str) -> str:
    """DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS, kept as written: NVIDIA's plugin reads
    them leniently (malformed entries are logged and skipped; see xid_policy)."""
    text = string(value, where)
    if len(text) > 4096:
        raise SettingsError(f"{where}: longer than 4096 characters")
    return text
