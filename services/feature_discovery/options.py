"""gpu-feature-discovery's settings: NVIDIA's flags, environment and config file keys.

What GFD shares with the plugin (MIG strategy, failOnInitError, the config file and its
`sharing:` section, the discovery strategy, the container driver root) is resolved by
`common.settings`, from the variables GFD reads only: a plugin variable in the same
environment (PASS_DEVICE_SPECS, ...) is none of GFD's business, as in NVIDIA's command. GFD's
own names come first where NVIDIA has them (GFD_MIG_STRATEGY before MIG_STRATEGY). Its own
options (`--oneshot`, `--sleep-interval`, ...) are read here, with the same precedence: flag,
then environment, then the config file's `flags.gfd` (or `flags.useNodeFeatureAPI`), then the
default. A bad value is a SettingsError naming the setting and where it came from.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from common.settings import SPECS, Settings, SettingsError, resolve
from common.settings.config_file import load_config_file, lookup
from common.settings.values import boolean, duration, string
from common.version import VersionAction

PROG = "gpu-feature-discovery"
DEFAULT_OUTPUT_FILE = "/etc/kubernetes/node-feature-discovery/features.d/gfd"
DEFAULT_MACHINE_TYPE_FILE = "/sys/class/dmi/id/product_name"
DEFAULT_SLEEP_INTERVAL = "60s"
DEFAULT_NAMESPACE = "default"  # internal/flags/node.go: --namespace's default
INFINITE = "infinite"  # NVIDIA's since v0.19: label once, then stay up without labeling again
MIN_SLEEP_INTERVAL_S = 0.1  # below this a pass follows a pass: NVML all the time for nothing

# The shared settings' variables GFD reads, and NVIDIA's GFD_ names for them (read first).
_SHARED_ENV = ("MIG_STRATEGY", "FAIL_ON_INIT_ERROR", "CONFIG_FILE", "DEVICE_DISCOVERY_STRATEGY",
               "DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT", "NVIDIA_DRIVER_ROOT",
               # ours: the NVML backend (tests, the demo), the run dir it may use, the log level
               "NVML_BACKEND", "SIMULATED_DEVICES", "GPU_PLUGIN_RUN_DIR", "LOG_LEVEL")
_GFD_ALIASES = {"GFD_MIG_STRATEGY": "MIG_STRATEGY", "GFD_FAIL_ON_INIT_ERROR": "FAIL_ON_INIT_ERROR",
                "GFD_CONFIG_FILE": "CONFIG_FILE"}
# Flags of the shared settings, by Settings field: NVIDIA's GFD names, then ours.
_SHARED_FLAGS: dict[str, tuple[str, ...]] = {
    "mig_strategy": ("--mig-strategy",),
    "fail_on_init_error": ("--fail-on-init-error",),
    "config_file": ("--config-file",),
    "device_discovery_strategy": ("--device-discovery-strategy",),
    "container_driver_root": ("--driver-root-ctr-path", "--container-driver-root"),
    "nvml_backend": ("--nvml-backend",),
    "simulated_devices": ("--simulated-devices",),
    "run_dir": ("--run-dir",),
    "log_level": ("--log-level",),
}
_BOOLEAN_SHARED = ("fail_on_init_error",)
# Where a shared setting means something else to GFD than to the plugin's services.
_SHARED_HELP = {
    "fail_on_init_error": "exit when NVML cannot be initialised (false: write the labels that need no device, "
                          "and try again each pass)",
    "run_dir": "simulated backend only: where its fault socket is made",
}


@dataclass(frozen=True)
class Options:
    settings: Settings
    oneshot: bool
    no_timestamp: bool
    sleep_interval: float | None  # None: infinite
    output_file: str  # "": standard output
    machine_type_file: str  # "": "unknown"
    use_node_feature_api: bool  # the labels as a NodeFeature object, not the file (NVIDIA's default since v0.19)
    node_name: str  # the NodeFeature API's: whose object it is
    namespace: str  # the NodeFeature API's: where the object is
    kubeconfig: str  # the NodeFeature API's: "" in-cluster (else KUBECONFIG's search), or this file


@dataclass(frozen=True)
class _Own:
    """One of GFD's own options: its flags, environment variables, config file key, default, parser."""

    name: str
    flags: tuple[str, ...]
    env: tuple[str, ...]
    file_key: tuple[str, ...] | None
    default: Any
    parse: Callable[[Any, str], Any]
    help: str
    boolean: bool = False


def _sleep_interval(value: Any, where: str) -> float | None:
    if isinstance(value, str) and value.strip().lower() == INFINITE:
        return None
    return duration(MIN_SLEEP_INTERVAL_S)(value, where)


_OWN = (
    _Own("oneshot", ("--oneshot",), ("GFD_ONESHOT",), ("flags", "gfd", "oneshot"), False, boolean,
         "label once and exit", boolean=True),
    _Own("no_timestamp", ("--no-timestamp",), ("GFD_NO_TIMESTAMP",), ("flags", "gfd", "noTimestamp"), False,
         boolean, "do not add the timestamp label", boolean=True),
    _Own("sleep_interval", ("--sleep-interval",), ("GFD_SLEEP_INTERVAL",), ("flags", "gfd", "sleepInterval"),
         DEFAULT_SLEEP_INTERVAL, _sleep_interval,
         "time between labeling passes (Go duration, or infinite: label once and stay up)"),
    _Own("output_file", ("--output-file", "--output", "-o"), ("GFD_OUTPUT_FILE",), ("flags", "gfd", "outputFile"),
         DEFAULT_OUTPUT_FILE, string, 'the NFD features.d file the labels are written to ("": standard output)'),
    _Own("machine_type_file", ("--machine-type-file",), ("GFD_MACHINE_TYPE_FILE",),
         ("flags", "gfd", "machineTypeFile"), DEFAULT_MACHINE_TYPE_FILE, string,
         "the file holding the node's DMI product name"),
    # NVIDIA's default since v0.19 (k8s-device-plugin#1504): its chart and the GPU Operator set nothing,
    # so a switched cluster publishes the object as NVIDIA's image did (false: the features.d file).
    _Own("use_node_feature_api", ("--use-node-feature-api",), ("GFD_USE_NODE_FEATURE_API", "USE_NODE_FEATURE_API"),
         ("flags", "useNodeFeatureAPI"), True, boolean,
         "publish the labels as NFD's NodeFeature object nvidia-features-for-<node> (false: write "
         "--output-file)", boolean=True),
    _Own("node_name", ("--node-name",), ("NODE_NAME",), None, "", string,
         "the node's name (the NodeFeature API's object is for it)"),
    _Own("namespace", ("--namespace",), ("NAMESPACE",), None, DEFAULT_NAMESPACE, string,
         "the namespace of the NodeFeature object (the pod's)"),
    _Own("kubeconfig", ("--kubeconfig",), ("KUBECONFIG",), None, "", string,
         "API server access for the NodeFeature API (default: in-cluster)"),
)


class _Parser(argparse.ArgumentParser):
    """argparse, its errors a SettingsError: the command's one way to say a setting is bad."""

    def error(self, message: str) -> NoReturn:
        raise SettingsError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="NVIDIA's GPU feature discovery: labels the node with its GPUs' features "
                                       "in NFD's NodeFeature object or features.d file")
    p.add_argument("--version", "-v", action=VersionAction)  # urfave/cli's version flag and alias
    shared = {s.name: s for s in SPECS}
    for name, flags in _SHARED_FLAGS.items():
        spec = shared[name]
        gfd_names = [alias for alias, plain in _GFD_ALIASES.items() if plain == spec.env]
        env = gfd_names + [e for e in (spec.env, *spec.env_aliases) if e]
        kwargs: dict[str, Any] = {"nargs": "?", "const": "true"} if name in _BOOLEAN_SHARED else {}
        what = _SHARED_HELP.get(name, spec.help)
        p.add_argument(*flags, dest=name, default=None, help=f"{what} [env {', '.join(env)}]", **kwargs)
    for own in _OWN:
        kwargs = {"nargs": "?", "const": "true"} if own.boolean else {}
        p.add_argument(*own.flags, dest=own.name, default=None, help=f"{own.help} [env {', '.join(own.env)}]",
                       **kwargs)
    return p


def _shared_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables GFD reads of the shared settings, its GFD_ names taking their plain names' place."""
    shared = {s.env: s for s in SPECS if s.env}
    env = {k: environ[k] for k in _SHARED_ENV if k in environ}
    for alias, plain in _GFD_ALIASES.items():
        if alias in environ:
            # Checked under its own name, so that an error names the variable the operator set.
            spec = shared[plain]
            spec.parse(environ[alias], f"{spec.name} (environment {alias})")
            env[plain] = environ[alias]
    return env


def _strategy_check(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """NVIDIA's GFD also knows vfio (GPUs bound to vfio-pci for VMs): refused with its reason."""
    raw = args.device_discovery_strategy or environ.get("DEVICE_DISCOVERY_STRATEGY")
    if raw is not None and raw.strip() == "vfio":
        where = "flag --device-discovery-strategy" if args.device_discovery_strategy else \
            "environment DEVICE_DISCOVERY_STRATEGY"
        raise SettingsError(f"device_discovery_strategy ({where}): vfio is not served: this image discovers GPUs "
                            "through NVML only (allowed: auto, nvml)")


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Options:
    """The options (--version prints it and exits). Raises SettingsError."""
    args = parser().parse_args(argv)
    _strategy_check(args, environ)
    shared_args = argparse.Namespace(**{name: getattr(args, name) for name in _SHARED_FLAGS})
    settings = resolve(shared_args, _shared_environ(environ))
    file_data = load_config_file(settings.config_file) if settings.config_file else {}
    values: dict[str, Any] = {}
    for own in _OWN:
        raw, where = _raw(own, args, environ, file_data)
        values[own.name] = own.parse(raw, f"{own.name.replace('_', '-')} ({where})")
    return Options(settings=settings, oneshot=values["oneshot"], no_timestamp=values["no_timestamp"],
                   sleep_interval=values["sleep_interval"], output_file=values["output_file"],
                   machine_type_file=values["machine_type_file"],
                   use_node_feature_api=values["use_node_feature_api"], node_name=values["node_name"],
                   namespace=values["namespace"], kubeconfig=values["kubeconfig"])


def _raw(own: _Own, args: argparse.Namespace, environ: Mapping[str, str],
         file_data: Mapping[str, Any]) -> tuple[Any, str]:
    given = getattr(args, own.name)
    if given is not None:
        return given, f"flag {own.flags[0]}"
    for env in own.env:
        if env in environ:
            return environ[env], f"environment {env}"
    if own.file_key is not None:
        found, value = lookup(file_data, own.file_key)
        if found and value is not None:
            return value, f"config file key {'.'.join(own.file_key)}"
    return own.default, "default"

