"""Settings of every service, declared once, resolved and validated once.

Each setting is one field of `Settings`, declared with `setting(...)`: its flag(s), its
environment variable(s), its key in the v1 config file, its default, its parser and its help.
Everything else comes from that declaration: the flags and `--help` (`add_arguments`), the
precedence flag > environment > config file > default (`resolve`), validation (the parser),
the config file's known keys (unknown ones are warned about, or refused in our own strict
sections), and the README's settings table (`settings_table`, checked by a test).

Names follow NVIDIA's plugin so that an operator's DaemonSet environment and config file carry
over; NVIDIA's health variables (DP_DISABLE_HEALTHCHECKS, DP_ENABLE_HEALTHCHECKS) are settings
like the others. Every service parses the same declarations, so a container environment
configures all its processes alike. A bad value raises `SettingsError` naming the setting,
where it came from and the allowed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.settings.config_file import Strict, check_sections, load_config_file, lookup, refuse_resources, warn_unknown
from common.settings.dra import DraDevices, dra_devices
from common.settings.sections import MAX_MPS_REPLICAS, HealthConfig, Replicated, SharedResource, Sharing, parse_sharing
from common.settings.values import (
    DEFAULT_CDI_HOOK_PATH,
    DEFAULT_CDI_SPEC_DIR,
    DEFAULT_CONTAINER_DRIVER_ROOT,
    DEFAULT_DEVICE_PLUGIN_DIR,
    DEFAULT_KUBELET_SOCKET,
    DEFAULT_MPS_CONTAINER_ROOT,
    DEFAULT_MPS_ROOT,
    DEFAULT_RUN_DIR,
    DEFAULT_STATE_DIR,
    DEVICE_ENTRY_BYTES,
    DEVICE_ID_STRATEGIES,
    DEVICE_LIST_STRATEGIES,
    ECC_POLICIES,
    GRPC_MAX_MESSAGE_BYTES,
    LOG_LEVELS,
    MAX_DEVICES_PER_RESOURCE,
    MAX_REPLICAS,
    MIG_STRATEGIES,
    MIN_PROBE_INTERVAL_S,
    NVML_BACKENDS,
    RECOVERY_POLICIES,
    SHARED_ALLOCATION_POLICIES,
    SettingsError,
    abs_path,
    boolean,
    choice,
    choice_list,
    discovery_strategy,
    duration,
    healthchecks,
    imex_channel_ids,
    path,
    port,
    refused_list,
    string,
    xid_list,
)

__all__ = [
    "DEFAULT_DEVICE_PLUGIN_DIR",
    "DEFAULT_KUBELET_SOCKET",
    "DEFAULT_MPS_CONTAINER_ROOT",
    "DEFAULT_MPS_ROOT",
    "DEVICE_ENTRY_BYTES",
    "GRPC_MAX_MESSAGE_BYTES",
    "MAX_DEVICES_PER_RESOURCE",
    "MAX_MPS_REPLICAS",
    "MAX_REPLICAS",
    "SPECS",
    "DraDevices",
    "HealthConfig",
    "Replicated",
    "Settings",
    "SettingsError",
    "SharedResource",
    "Sharing",
    "Spec",
    "add_arguments",
    "resolve",
    "settings_table",
]


@dataclass(frozen=True)
class Spec:
    """How one setting is given. `name` is the Settings field's."""

    name: str
    flags: tuple[str, ...]
    env: str | None
    file_key: tuple[str, ...] | None  # path in the v1 config file
    default: Any  # as it would be written (parsed like any given value); None: unset or derived
    parse: Callable[[Any, str], Any]
    help: str
    env_aliases: tuple[str, ...] = ()  # NVIDIA's other names for the same setting, read after `env`


def setting(flags: tuple[str, ...], env: str | None, file_key: tuple[str, ...] | None, default: Any,
            parse: Callable[[Any, str], Any], help: str, env_aliases: tuple[str, ...] = ()) -> Any:
    """Declares a setting: the field's default is the parsed `default` (None stays None)."""
    spec = Spec("", flags, env, file_key, default, parse, help, env_aliases)
    value = None if default is None else parse(default, f"default of {flags[0]}")
    return field(default=value, metadata={"spec": spec})


def _file(*key: str) -> tuple[str, ...]:
    return key


@dataclass(frozen=True)
class Settings:
    config_file: str | None = setting(("--config-file",), "CONFIG_FILE", None, None, string, "v1 config file (YAML)")
    mig_strategy: str = setting(("--mig-strategy",), "MIG_STRATEGY", _file("flags", "migStrategy"), "none",
                                choice(MIG_STRATEGIES), "how MIG devices are offered")
    fail_on_init_error: bool = setting(
        ("--fail-on-init-error",), "FAIL_ON_INIT_ERROR", _file("flags", "failOnInitError"), True, boolean,
        "exit when NVML cannot be initialised (false: serve nothing and retry)")
    driver_root: str = setting(("--driver-root", "--nvidia-driver-root"), "NVIDIA_DRIVER_ROOT",
                               _file("flags", "nvidiaDriverRoot"), "/", string, "root of the driver installation")
    # None until resolved: then the driver root unless given.
    dev_root: str = setting(("--dev-root", "--nvidia-dev-root"), "NVIDIA_DEV_ROOT", _file("flags", "nvidiaDevRoot"),
                            None, string, "root of the device nodes (default: the driver root)")
    pass_device_specs: bool = setting(("--pass-device-specs",), "PASS_DEVICE_SPECS",
                                      _file("flags", "plugin", "passDeviceSpecs"), False, boolean,
                                      "add DeviceSpecs to Allocate answers")
    device_list_strategy: tuple[str, ...] = setting(
        ("--device-list-strategy",), "DEVICE_LIST_STRATEGY", _file("flags", "plugin", "deviceListStrategy"),
        "envvar", choice_list(DEVICE_LIST_STRATEGIES), "how allocated devices reach the container runtime (a list)")
    device_id_strategy: str = setting(("--device-id-strategy",), "DEVICE_ID_STRATEGY",
                                      _file("flags", "plugin", "deviceIDStrategy"), "uuid",
                                      choice(DEVICE_ID_STRATEGIES), "how devices are named to the runtime")
    cdi_annotation_prefix: str = setting(("--cdi-annotation-prefix",), "CDI_ANNOTATION_PREFIX",
                                         _file("flags", "plugin", "cdiAnnotationPrefix"), "cdi.k8s.io/", string,
                                         "prefix of the CDI annotation key")
    cdi_spec_dir: Path = setting(("--cdi-spec-dir",), "CDI_SPEC_DIR", None, DEFAULT_CDI_SPEC_DIR, path,
                                 "where the CDI spec is written for the CDI strategies")
    shared_devices_allocation_policy: str = setting(
        ("--shared-devices-allocation-policy",), "SHARED_DEVICES_ALLOCATION_POLICY",
        _file("flags", "plugin", "sharedDevicesAllocationPolicy"), "distributed", choice(SHARED_ALLOCATION_POLICIES),
        "preferred allocation of replicas and MIG devices")
    kubelet_socket: str = setting(("--kubelet-socket",), "KUBELET_SOCKET", _file("flags", "plugin", "kubeletSocket"),
                                  DEFAULT_KUBELET_SOCKET, string, 'kubelet registration socket; "" = do not register')
    # None until resolved: then the kubelet socket's directory unless given.
    device_plugin_dir: Path = setting(("--device-plugin-dir",), "DEVICE_PLUGIN_DIR", None, None, path,
                                      "where plugin sockets are created (default: the kubelet socket's directory)")
    run_dir: Path = setting(("--run-dir",), "GPU_PLUGIN_RUN_DIR", None, DEFAULT_RUN_DIR, path,
                            "bus sockets and other runtime files (mode 0700)")
    state_dir: Path = setting(
        ("--state-dir",), "GPU_PLUGIN_STATE_DIR", None, DEFAULT_STATE_DIR, path,
        "state that must survive restarts (cordons); regular files under the device-plugin dir survive "
        "kubelet restarts and, being on its hostPath, pod restarts")
    nvml_backend: str = setting(("--nvml-backend",), "NVML_BACKEND", None, "real", choice(NVML_BACKENDS),
                                "real: the driver's libnvidia-ml; simulated: the development tools' simulated driver")
    simulated_devices: str = setting(
        ("--simulated-devices",), "SIMULATED_DEVICES", None, "dgx-h100-8", string,
        "simulated backend: fleet name (h200, dgx-h100-8, dgx-h100-8-mig) or description file")
    log_level: str = setting(("--log-level",), "LOG_LEVEL", None, "info", choice(LOG_LEVELS), "log level")
    # -- health (ours, under `health:`; and NVIDIA's DP_* variables) -------------------------
    metrics_port: int = setting(("--metrics-port",), "METRICS_PORT", _file("health", "metricsPort"), 0, port,
                                "kube-agent: serve the pod's Prometheus metrics (every service's, from the buses) on "
                                "this TCP port (0: off, no listener)")
    node_condition: bool = setting(
        ("--node-condition",), "HEALTH_NODE_CONDITION", _file("health", "node", "condition"), False, boolean,
        "kube-agent: GPU health as the Node condition GPUUnhealthy (patches nodes/status; needs NODE_NAME)")
    node_events: bool = setting(
        ("--node-events",), "HEALTH_NODE_EVENTS", _file("health", "node", "events"), False, boolean,
        "kube-agent: Events on the Node for health changes, cordons and config changes (needs NODE_NAME)")
    probe_interval: float = setting(
        ("--health-probe-interval",), "HEALTH_PROBE_INTERVAL", _file("health", "probeInterval"), "10s",
        duration(MIN_PROBE_INTERVAL_S), "how often every GPU is probed (at least 100ms)")
    recovery_policy: str = setting(
        ("--health-recovery",), "HEALTH_RECOVERY", _file("health", "recovery", "policy"), "auto",
        choice(RECOVERY_POLICIES), "auto: a device whose fault cleared returns to Healthy; never: as NVIDIA's")
    quiet_period: float = setting(
        ("--health-quiet-period",), "HEALTH_QUIET_PERIOD", _file("health", "recovery", "quietPeriod"), "60s",
        duration(1.0), "clean probes needed before recovery where the driver gives no recovery advice")
    fatal_xids: frozenset[int] = setting(("--health-fatal-xids",), "HEALTH_FATAL_XIDS",
                                         _file("health", "xids", "fatal"), "", xid_list,
                                         "XIDs that take a device out even if ignored by default (e.g. 13)")
    ignored_xids: frozenset[int] = setting(("--health-ignored-xids",), "HEALTH_IGNORED_XIDS",
                                           _file("health", "xids", "ignored"), "", xid_list,
                                           "XIDs that never take a device out")
    monitor_only_xids: frozenset[int] = setting(
        ("--health-monitor-only-xids",), "HEALTH_MONITOR_ONLY_XIDS", _file("health", "xids", "monitorOnly"), "",
        xid_list, "XIDs reported on the bus and in metrics; the device stays schedulable")
    ecc_single_bit: str = setting(("--health-ecc-single-bit",), "HEALTH_ECC_SINGLE_BIT",
                                  _file("health", "ecc", "singleBit"), "report", choice(ECC_POLICIES),
                                  "single-bit (corrected) ECC errors: report or fatal")
    ecc_double_bit: str = setting(("--health-ecc-double-bit",), "HEALTH_ECC_DOUBLE_BIT",
                                  _file("health", "ecc", "doubleBit"), "fatal", choice(ECC_POLICIES),
                                  "double-bit (uncorrected) ECC errors: fatal or report")
    disable_healthchecks: str = setting(
        ("--disable-healthchecks",), "DP_DISABLE_HEALTHCHECKS", None, "", healthchecks,
        'NVIDIA\'s: "all" (no health checks), "xids" (no XID is fatal) or XIDs to ignore, comma-separated')
    enable_healthchecks: str = setting(
        ("--enable-healthchecks",), "DP_ENABLE_HEALTHCHECKS", None, "", healthchecks,
        'NVIDIA\'s: "all" (every XID is fatal) or XIDs that count even if ignored by default')
    # -- timings of ours (tests shorten them; the defaults are for nodes) -------------------------
    # A probe is five NVML queries that answer in milliseconds (tens of ms on a busy driver); one
    # that has not answered in 5 s is stuck, not slow. Short enough that a GPU wedging under a
    # running job is out of the kubelet's allocatable within one probe interval and a few seconds.
    probe_deadline: float = setting(
        ("--health-probe-deadline",), "HEALTH_PROBE_DEADLINE", None, "5s", duration(0.1),
        "a GPU whose probe has not answered this long is Unhealthy, the hung NVML call named")
    stale_after: float = setting(
        ("--stale-after",), "GPU_PLUGIN_STALE_AFTER", None, "15s", duration(0.3),
        "a bus silent this long is reported stale (every bus heartbeats at a third of it; the plugin-server keeps "
        "the last health state)")
    stream_lost_grace: float = setting(
        ("--stream-lost-grace",), "GPU_PLUGIN_STREAM_LOST_GRACE", None, "2s", duration(0.1),
        "registrar: an endpoint the kubelet stops streaming from this long is registered again")
    watchdog_timeout: float = setting(
        ("--watchdog-timeout",), "GPU_PLUGIN_WATCHDOG_TIMEOUT", None, "30s", duration(1.0),
        "a service whose event loop has not answered this long exits (supervisord restarts it alone)")
    # A probe is a command over the daemon's pipe: one short process of the driver's (nvidia-cuda-mps-control).
    mps_probe_interval: float = setting(
        ("--mps-probe-interval",), "GPU_PLUGIN_MPS_PROBE_INTERVAL", None, "10s", duration(1.0),
        "mps-control: how often each MPS control daemon is asked over its pipe whether it answers (at least 1s)")
    # -- NVIDIA's settings for CDI, the containerized driver and fabric/storage devices ----------
    container_driver_root: str = setting(
        ("--container-driver-root", "--driver-root-ctr-path"), "DRIVER_ROOT_CTR_PATH",
        _file("flags", "plugin", "containerDriverRoot"), DEFAULT_CONTAINER_DRIVER_ROOT, abs_path,
        "where the host's driver root is mounted in this container (NVML and the CDI spec are read from it; "
        "when absent, the driver root itself)", ("CONTAINER_DRIVER_ROOT",))
    cdi_hook_path: str = setting(
        ("--nvidia-cdi-hook-path", "--nvidia-ctk-path"), "NVIDIA_CDI_HOOK_PATH",
        _file("flags", "plugin", "nvidiaCTKPath"), DEFAULT_CDI_HOOK_PATH, abs_path,
        "host path of nvidia-ctk (or nvidia-cdi-hook) run by the CDI spec's hooks", ("NVIDIA_CTK_PATH",))
    gds_enabled: bool = setting(
        ("--gds-enabled",), "GDS_ENABLED", _file("flags", "gdsEnabled"), False, boolean,
        "give every GPU container GPUDirect Storage (NVIDIA_GDS=enabled; CDI: the nvidia-fs devices)")
    mofed_enabled: bool = setting(
        ("--mofed-enabled",), "MOFED_ENABLED", _file("flags", "mofedEnabled"), False, boolean,
        "give every GPU container the MOFED devices (NVIDIA_MOFED=enabled; CDI: /dev/infiniband nodes)")
    gdrcopy_enabled: bool = setting(
        ("--gdrcopy-enabled",), "GDRCOPY_ENABLED", _file("flags", "gdrcopyEnabled"), False, boolean,
        "give every GPU container GDRCopy (NVIDIA_GDRCOPY=enabled; CDI: the /dev/gdrdrv node)")
    imex_channel_ids: tuple[int, ...] = setting(("--imex-channel-ids",), "IMEX_CHANNEL_IDS",
                                                _file("imex", "channelIDs"), "", imex_channel_ids,
                                                "IMEX channels given to every GPU container: [] or [0]")
    imex_required: bool = setting(("--imex-required",), "IMEX_REQUIRED", _file("imex", "required"), False, boolean,
                                  "the IMEX channels must exist at start (else they are skipped with a warning)")
    device_discovery_strategy: str = setting(
        ("--device-discovery-strategy",), "DEVICE_DISCOVERY_STRATEGY", _file("flags", "deviceDiscoveryStrategy"),
        "auto", discovery_strategy, "auto or nvml (tegra is refused)")
    cdi_feature_flags: tuple[str, ...] = setting(
        ("--cdi-feature-flags",), "CDI_FEATURE_FLAGS", None, "",
        refused_list("nvcdi feature flags are not implemented (leave CDI_FEATURE_FLAGS empty)"),
        "not served (must be empty)")
    mps_root: str | None = setting(
        ("--mps-root",), "MPS_ROOT", _file("flags", "mpsRoot"), None, abs_path,
        f"host directory of the MPS pipe, log and shm directories (sharing.mps; default {DEFAULT_MPS_ROOT})")
    mps_container_root: str = setting(
        ("--mps-container-root",), "GPU_PLUGIN_MPS_CONTAINER_ROOT", None, DEFAULT_MPS_CONTAINER_ROOT, abs_path,
        "where the MPS root is mounted in this container and in workloads (NVIDIA's: /mps)")
    # -- DRA (dra-plugin; NVIDIA's DRA driver's flag and variable names for the kubelet's directories) ----
    dra_enabled: bool = setting(
        ("--dra-enabled",), "DRA_ENABLED", None, False, boolean,
        "dra-plugin: serve the GPUs through Dynamic Resource Allocation as NVIDIA's DRA driver (gpu.nvidia.com) "
        "does: a kubelet plugin, and ResourceSlices (needs NODE_NAME)")
    kubelet_registrar_dir: Path = setting(
        ("--kubelet-registrar-directory-path",), "KUBELET_REGISTRAR_DIRECTORY_PATH", None,
        "/var/lib/kubelet/plugins_registry", path,
        "dra-plugin: where the kubelet's plugin watcher finds registration sockets")
    kubelet_plugins_dir: Path = setting(
        ("--kubelet-plugins-directory-path",), "KUBELET_PLUGINS_DIRECTORY_PATH", None, "/var/lib/kubelet/plugins",
        path, "dra-plugin: the kubelet's plugin directory; its DRA socket is <this>/gpu.nvidia.com/dra.sock")
    # -- Kubernetes DRA: which GPUs the dra-plugin publishes (the plugin-server leaves them out) ----
    dra_devices: DraDevices = setting(
        ("--dra-devices",), "DRA_DEVICES", _file("dra", "devices"), "none", dra_devices,
        "GPUs served through DRA (ResourceSlices) and not by the device plugin: all, none, or GPU indexes "
        "and UUIDs, comma-separated")
    # -- the v1 file's `sharing:` section (a list of resources: no flag or environment form) ----
    sharing: Sharing = field(default_factory=Sharing)

    @property
    def mps_host_root(self) -> str:
        return self.mps_root or DEFAULT_MPS_ROOT

    @property
    def health(self) -> HealthConfig:
        return HealthConfig(self.fatal_xids, self.ignored_xids, self.monitor_only_xids, self.ecc_single_bit,
                            self.ecc_double_bit)

    @property
    def heartbeat_s(self) -> float:
        """How often every bus re-sends its state: three heartbeats fit in stale_after, so one lost
        or late beat never reads as a silent publisher."""
        return self.stale_after / 3

    def bus_path(self, name: str) -> Path:
        return self.run_dir / name


SPECS: tuple[Spec, ...] = tuple(
    dataclasses.replace(f.metadata["spec"], name=f.name) for f in dataclasses.fields(Settings) if "spec" in f.metadata
)
_BY_NAME = {s.name: s for s in SPECS}

# Keys of the v1 file that no Settings field declares, but that NVIDIA's files carry.
_OTHER_FILE_KEYS: dict[str, Any] = {
    "version": None,
    "flags": {"useNodeFeatureAPI": None, "gfd": None},
    "resources": None,  # refused when set (refuse_resources)
    "sharing": None,  # checked by parse_sharing
}
# Our own sections, where an unknown key is an error (a typo would silently change the policy).
_STRICT = (("health",), ("health", "xids"), ("health", "ecc"), ("health", "recovery"), ("health", "node"))


def _known_file_keys() -> dict[str, Any]:
    tree: dict[str, Any] = {}

    def put(node: dict[str, Any], src: Mapping[str, Any]) -> None:
        for key, sub in src.items():
            if isinstance(sub, Mapping):
                put(node.setdefault(key, {}), sub)
            else:
                node.setdefault(key, None)

    put(tree, _OTHER_FILE_KEYS)
    for spec in SPECS:
        if spec.file_key is None:
            continue
        node = tree
        for part in spec.file_key[:-1]:
            node = node.setdefault(part, {})
        node[spec.file_key[-1]] = None
    for strict in _STRICT:
        parent, node = None, tree
        for part in strict:
            parent, node = node, node[part]
        assert parent is not None
        parent[strict[-1]] = Strict(node)
    return tree


_KNOWN_FILE_KEYS = _known_file_keys()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every setting as a flag whose default is None (= not given)."""
    group = parser.add_argument_group("settings (flag > environment > config file)")
    for spec in SPECS:
        env = f" [env {', '.join((spec.env, *spec.env_aliases))}]" if spec.env else ""
        # A boolean flag alone means true, as NVIDIA's (--imex-required); a value is still accepted.
        if spec.default is False or spec.default is True:
            group.add_argument(*spec.flags, dest=spec.name, default=None, help=f"{spec.help}{env}", nargs="?",
                               const="true")
        else:
            group.add_argument(*spec.flags, dest=spec.name, default=None, help=f"{spec.help}{env}")


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
            found, value = lookup(file_data, spec.file_key)
            if found and value is not None:  # "key:" with no value means unset, as in NVIDIA's plugin
                return value, f"config file key {'.'.join(spec.file_key)}"
        return spec.default, "default"

    config_value, _ = raw(_BY_NAME["config_file"], {})
    file_data = load_config_file(str(config_value)) if config_value else {}
    check_sections(file_data, _KNOWN_FILE_KEYS)
    warn_unknown(file_data, _KNOWN_FILE_KEYS)

    values: dict[str, Any] = {}
    for spec in SPECS:
        value, where = raw(spec, file_data)
        values[spec.name] = None if value is None else spec.parse(value, f"{spec.name} ({where})")
    if values["dev_root"] is None:
        values["dev_root"] = values["driver_root"]
    if values["device_plugin_dir"] is None:
        sock = values["kubelet_socket"]
        values["device_plugin_dir"] = Path(os.path.dirname(sock) if sock else DEFAULT_DEVICE_PLUGIN_DIR)
    for a, b in (("fatal_xids", "ignored_xids"), ("fatal_xids", "monitor_only_xids"),
                 ("ignored_xids", "monitor_only_xids")):
        both = values[a] & values[b]
        if both:
            raise SettingsError(f"health XIDs: XID {min(both)} is in both {a} and {b}")
    values["sharing"] = parse_sharing(file_data.get("sharing"))
    if values["sharing"].mps is not None and values["mig_strategy"] == "mixed":
        raise SettingsError("sharing.mps: using --mig-strategy=mixed is not supported with MPS")
    refuse_resources(file_data.get("resources"))
    return Settings(**values)


def settings_table() -> str:
    """The README's settings table, made from the declarations (a test keeps them equal)."""
    rows = ["| flag | environment | config file key | default | what |", "|---|---|---|---|---|"]
    for spec in SPECS:
        env = ", ".join(e for e in (spec.env, *spec.env_aliases) if e)
        key = ".".join(spec.file_key) if spec.file_key else ""
        shown = str(spec.default).lower() if isinstance(spec.default, bool) else spec.default
        default = "" if shown is None else f"`{shown}`" if shown != "" else '`""`'
        rows.append(f"| {' '.join(f'`{f}`' for f in spec.flags)} | {env} | {key} | {default} | "
                    f"{spec.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
