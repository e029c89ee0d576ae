"""The Helm chart, rendered by Helm's own engine (helm-python-sdk: Helm v4 as a library, offline).

Every value set is rendered once per module (functools.cache) and checked with the same functions
that check the static manifests (tests/unit/test_deploy_lint.py): Kubernetes schema validation,
security posture with exactly the hostPaths each configuration needs, the image's entry point. On
top: the environment the chart sets is read by the code it reaches, the settings it produces pass
the services' own validation, requests cover the measured use, NVIDIA features we do not serve fail
the render, and deploy/*.yaml equal their renders.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from helm_python import Chart, HelmRenderError, HelmValuesError

from common.settings import SPECS, SettingsError, resolve
from services import config_manager
from services.feature_labels import ENV as FEATURE_LABELS_ENV
from services.kube_agent.selection import ENV as KUBE_AGENT_ENV
from tests.unit.test_deploy_lint import (
    DOCKERFILE,
    K8S_VERSIONS,
    command_problems,
    needed_host_paths,
    posture_problems,
    validation_errors,
)
from tests.unit.test_settings_sections import NVIDIA_EXAMPLES

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "chart" / "gpu-device-plugin"
RENDER = REPO / "scripts" / "render_manifests.py"
NAMESPACE = "kube-system"

# The stack's measured memory: RSS summed over the entry point's process tree (sh, supervisord, the
# three services, the sh event listener), simulated 8 GPUs, 20 s after registration: 157 MiB (PSS
# 87 MiB, private dirty 77 MiB). RSS counts shared pages once per process, so this is an upper bound of
# what the container's cgroup is charged; the request must cover it.
MEASURED_RSS_BYTES = 157 * 2**20
# Read by the NVIDIA container runtime, not by our code: which GPUs and driver parts the container gets.
RUNTIME_ENV = {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_MIG_MONITOR_DEVICES"}
# Every variable the services read: the declared settings (NVIDIA's DP_* switches among them)
# the kube-agent's selection variables and feature-labels' gate and GFD variables.
SERVICE_ENV = {n for s in SPECS for n in (s.env, *s.env_aliases) if n} | set(KUBE_AGENT_ENV) | set(FEATURE_LABELS_ENV)

TIME_SLICING = NVIDIA_EXAMPLES["time-slicing"]
MIG_MIXED_CONFIG = "version: v1\nflags:\n  migStrategy: mixed\n"
# NVIDIA's mps.root default, always mounted as NVIDIA's chart mounts it: the pipe and log directories at
# /mps, the shm the MPS daemons share with their clients at /dev/shm.
MPS_MOUNTS = {"/run/nvidia/mps": ("/mps", False), "/run/nvidia/mps/shm": ("/dev/shm", False)}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # NVIDIA's README: helm install ... --set migStrategy=mixed
    "mig-mixed": {"migStrategy": "mixed"},
    "cdi-cri": {"deviceListStrategy": "cdi-cri"},
    "cdi-annotations-and-envvar": {"deviceListStrategy": "envvar,cdi-annotations",
                                   "cdi": {"nvidiaHookPath": "/usr/local/nvidia/toolkit/nvidia-cdi-hook"}},
    # NVIDIA's README: --set config.default=config0 --set-file config.map.config0=... (time-slicing)
    "time-slicing-config-map": {"config": {"default": "config0",
                                           "map": {"config0": TIME_SLICING, "config1": MIG_MIXED_CONFIG}}},
    "single-config-fallback": {"config": {"map": {"ts": TIME_SLICING}}},
    "external-config-map": {"config": {"name": "my-plugin-configs", "default": "ts"}},
    "containerized-driver": {"nvidiaDriverRoot": "/run/nvidia/driver"},
    "operator-cdi": {"nvidiaDriverRoot": "/run/nvidia/driver", "deviceListStrategy": "cdi-cri",
                     "compatWithCPUManager": True, "gdrcopyEnabled": True, "gdsEnabled": True,
                     "mofedEnabled": True, "deviceDiscoveryStrategy": "nvml", "mps": {"root": "/run/nvidia/mps"}},
    # NVIDIA's MPS values: the MPS root mounted at /mps and its shm at /dev/shm, hostPID on request.
    "mps": {"mps": {"root": "/run/nvidia/mps", "enableHostPID": True}},
    # NVIDIA's values with an MPS config: nothing about mps.* set, the default root serves it.
    "mps-config-map": {"config": {"map": {"mps": NVIDIA_EXAMPLES["mps"]}}},
    "mps-root-elsewhere": {"mps": {"root": "/var/run/gpu-mps"}},
    # ours: no MPS root at all (sharing.mps then cannot start)
    "no-mps-root": {"mps": {"root": ""}},
    # NVIDIA's values: gfd.enabled=true, here served by feature-labels in the plugin's pod.
    "gfd": {"gfd": {"enabled": True, "noTimestamp": True}},
    # Node health in the API: the condition and the Events, each with its RBAC.
    "node-health": {"health": {"node": {"condition": True, "events": True}}},
    # DRA: the dra-plugin with NVIDIA's DeviceClasses (resource.k8s.io/v1 as Helm's offline Kubernetes serves it),
    # and a split with the device plugin and the classes as a 1.32/1.33 cluster takes them.
    "dra": {"dra": {"enabled": True}},
    "dra-split-v1beta1": {"dra": {"enabled": True, "devices": "0,1,GPU-930bc548-4e27-0432-876f-a3553ef2f53f",
                                  "deviceClassApiVersion": "resource.k8s.io/v1beta1"}, "migStrategy": "mixed"},
    "metrics-on": {"metrics": {"port": 9400, "service": {"enabled": True}, "podMonitor": {"enabled": True}},
                   "health": {"probeInterval": "5s", "recovery": {"policy": "never", "quietPeriod": "2m"}},
                   "stateDir": "/var/lib/kubelet/device-plugins/gpu-device-plugin", "logLevel": "debug",
                   "failOnInitError": False, "deviceIDStrategy": "index"},
}


def render(values: dict[str, Any], namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    with Chart.load(CHART) as chart:
        rendered = chart.render(values, name="gdp", namespace=namespace)
    return [doc for _p, text in sorted(rendered.items()) for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def rendered(set_name: str) -> tuple[dict[str, Any], ...]:
    """One render per value set for the whole module (each test gets a deep copy)."""
    return tuple(render(VALUE_SETS[set_name]))


def docs(set_name: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(rendered(set_name)))


def daemonset(set_name: str) -> dict[str, Any]:
    (ds,) = [d for d in docs(set_name) if d["kind"] == "DaemonSet"]
    return ds


def pod(ds: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from field>") for e in container.get("env", [])}


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


SETS = list(VALUE_SETS)

# --------------------------------------------------------------------------------------------------
# every value set: valid objects, NVIDIA's posture, the image's entry point
# --------------------------------------------------------------------------------------------------


def test_the_chart_lints_clean() -> None:
    assert helm_python.lint(str(CHART))["errors"] == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("set_name", SETS)
def test_every_rendered_object_validates(set_name: str, version: str) -> None:
    objects = [d for d in docs(set_name) if d["kind"] != "PodMonitor"  # a CRD: checked below
               # resource.k8s.io/v1 is served from 1.34: the chart picks it only where the cluster serves it
               and not (d["apiVersion"] == "resource.k8s.io/v1" and version == "1.33")]
    assert validation_errors(objects, version) == []


@pytest.mark.parametrize("set_name", SETS)
def test_posture_and_entry_point(set_name: str) -> None:
    ds = daemonset(set_name)
    assert posture_problems(ds) == []
    assert command_problems(ds, DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("set_name", SETS)
def test_every_variable_the_chart_sets_is_read(set_name: str) -> None:
    ds = daemonset(set_name)
    (main,) = pod(ds)["containers"]
    unread = set(env_of(main)) - SERVICE_ENV - RUNTIME_ENV
    assert unread == set(), "the chart sets variables no service reads"
    for init in pod(ds).get("initContainers", []):
        assert init["command"] == ["config-manager"]
        assert set(env_of(init)) - set(config_manager.ENV) == set()


def test_the_read_check_catches_a_variable_nobody_reads() -> None:
    ds = daemonset("defaults")
    pod(ds)["containers"][0]["env"].append({"name": "MIG_STRATEGIE", "value": "mixed"})
    assert set(env_of(pod(ds)["containers"][0])) - SERVICE_ENV - RUNTIME_ENV == {"MIG_STRATEGIE"}


@pytest.mark.parametrize("set_name", SETS)
def test_the_settings_pass_the_services_validation(set_name: str, tmp_path: Path) -> None:
    """What the container's services will resolve at start, from the chart's env and config."""
    ds = daemonset(set_name)
    env = env_of(pod(ds)["containers"][0])
    values = VALUE_SETS[set_name]
    if "CONFIG_FILE" in env:
        chosen = values["config"].get("default") or next(iter(values["config"].get("map", {})), None)
        text = values["config"].get("map", {}).get(chosen, TIME_SLICING)
        (tmp_path / "config.yaml").write_text(text)
        env["CONFIG_FILE"] = str(tmp_path / "config.yaml")
    settings = resolve(environ=env)
    assert settings.mig_strategy == (values.get("migStrategy") or "none")


def test_a_config_files_flags_are_not_overridden_by_the_chart(tmp_path: Path) -> None:
    """The chart sets NVIDIA's flag variables only when given: a config.map's flags.* take effect."""
    config = ("version: v1\nflags:\n  migStrategy: mixed\n  failOnInitError: false\n"
              "  plugin:\n    deviceIDStrategy: index\n")
    ds = pod(next(d for d in render({"config": {"map": {"main": config}}}) if d["kind"] == "DaemonSet"))
    env = env_of(ds["containers"][0])
    (tmp_path / "config.yaml").write_text(config)
    env["CONFIG_FILE"] = str(tmp_path / "config.yaml")
    settings = resolve(environ=env)
    chosen = (settings.mig_strategy, settings.fail_on_init_error, settings.device_id_strategy)
    assert chosen == ("mixed", False, "index")


def test_the_settings_check_catches_a_bad_value() -> None:
    with pytest.raises(SettingsError, match="mig_strategy"):
        resolve(environ={"MIG_STRATEGY": "mixd"})


@pytest.mark.parametrize("set_name", SETS)
def test_requests_cover_the_measured_use(set_name: str) -> None:
    (main,) = pod(daemonset(set_name))["containers"]
    requests = main["resources"]["requests"]
    assert memory_bytes(requests["memory"]) >= MEASURED_RSS_BYTES
    assert memory_bytes(main["resources"]["limits"]["memory"]) > memory_bytes(requests["memory"])


# --------------------------------------------------------------------------------------------------
# what each value set must produce
# --------------------------------------------------------------------------------------------------


def mounts(ds: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """host path -> (mount path, read-only) of the main container."""
    volumes = {v["name"]: v for v in pod(ds)["volumes"]}
    out = {}
    for m in pod(ds)["containers"][0]["volumeMounts"]:
        host = volumes[m["name"]].get("hostPath", {}).get("path")
        if host:
            out[host] = (m["mountPath"], bool(m.get("readOnly")))
    return out


def test_defaults_select_gpu_nodes_as_nvidias_chart_does() -> None:
    ds = daemonset("defaults")
    terms = pod(ds)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {(e["key"], tuple(e["values"])) for t in terms for e in t["matchExpressions"]}
    assert keys == {("feature.node.kubernetes.io/pci-10de.present", ("true",)),
                    ("feature.node.kubernetes.io/cpu-model.vendor_id", ("NVIDIA",)),
                    ("nvidia.com/gpu.present", ("true",))}
    assert "nodeSelector" not in pod(ds)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod(ds)["tolerations"]
    assert pod(ds)["priorityClassName"] == "system-node-critical"
    assert mounts(ds) == {"/var/lib/kubelet/device-plugins": ("/var/lib/kubelet/device-plugins", False),
                          **MPS_MOUNTS}


def test_mig_mixed() -> None:
    env = env_of(pod(daemonset("mig-mixed"))["containers"][0])
    assert env["MIG_STRATEGY"] == "mixed" and env["NVIDIA_MIG_MONITOR_DEVICES"] == "all"
    assert "NVIDIA_MIG_MONITOR_DEVICES" not in env_of(pod(daemonset("defaults"))["containers"][0])


@pytest.mark.parametrize(("set_name", "monitor"), [
    ("time-slicing-config-map", True),  # config1 asks for mixed
    ("external-config-map", True),  # unknown at render: as NVIDIA's chart, yes
    ("single-config-fallback", False),
])
def test_mig_monitoring_when_a_config_may_offer_mig(set_name: str, monitor: bool) -> None:
    env = env_of(pod(daemonset(set_name))["containers"][0])
    assert ("NVIDIA_MIG_MONITOR_DEVICES" in env) == monitor


@pytest.mark.parametrize(("set_name", "expected"), [
    ("cdi-cri", {"/var/run/cdi": ("/var/run/cdi", False), "/": ("/driver-root", True), **MPS_MOUNTS}),
    ("cdi-annotations-and-envvar", {"/var/run/cdi": ("/var/run/cdi", False), "/": ("/driver-root", True),
                                    **MPS_MOUNTS}),
    ("containerized-driver", {"/run/nvidia/driver": ("/driver-root", True), **MPS_MOUNTS}),
    ("operator-cdi", {"/var/run/cdi": ("/var/run/cdi", False), "/run/nvidia/driver": ("/driver-root", True),
                      **MPS_MOUNTS}),
    ("mps", MPS_MOUNTS),
    ("mps-config-map", MPS_MOUNTS),
    ("mps-root-elsewhere", {"/var/run/gpu-mps": ("/mps", False), "/var/run/gpu-mps/shm": ("/dev/shm", False)}),
    ("no-mps-root", {}),
])
def test_each_strategy_gets_its_mounts(set_name: str, expected: dict[str, tuple[str, bool]]) -> None:
    ds = daemonset(set_name)
    dp = "/var/lib/kubelet/device-plugins"
    assert mounts(ds) == {dp: (dp, False), **expected}
    assert set(needed_host_paths(pod(ds))) == set(mounts(ds))


def test_mps_root_as_nvidias_chart() -> None:
    """mps.root defaults to /run/nvidia/mps and is mounted whatever the config: NVIDIA's values with an MPS
    config in config.map (or one a node label picks later) find the MPS root there."""
    for set_name in ("defaults", "mps-config-map"):
        env = env_of(pod(daemonset(set_name))["containers"][0])
        assert env["MPS_ROOT"] == "/run/nvidia/mps", set_name
        assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility", "the MPS daemon's binaries and libcuda"
    assert "MPS_ROOT" not in env_of(pod(daemonset("no-mps-root"))["containers"][0])
    assert env_of(pod(daemonset("no-mps-root"))["containers"][0])["NVIDIA_DRIVER_CAPABILITIES"] == "utility"


def test_host_pid_only_on_request_and_only_for_mps() -> None:
    assert pod(daemonset("mps")).get("hostPID") is True
    assert "hostPID" not in pod(daemonset("operator-cdi")), "MPS root alone: no host PID namespace"
    assert "hostPID" not in pod(daemonset("defaults"))


def test_cdi_hook_path_and_operator_values_reach_the_plugin() -> None:
    env = env_of(pod(daemonset("cdi-annotations-and-envvar"))["containers"][0])
    assert env["NVIDIA_CDI_HOOK_PATH"] == "/usr/local/nvidia/toolkit/nvidia-cdi-hook"
    assert env["DEVICE_LIST_STRATEGY"] == "envvar,cdi-annotations"
    env = env_of(pod(daemonset("operator-cdi"))["containers"][0])
    assert {k: env[k] for k in ("PASS_DEVICE_SPECS", "GDRCOPY_ENABLED", "GDS_ENABLED", "MOFED_ENABLED",
                                "DEVICE_DISCOVERY_STRATEGY", "MPS_ROOT", "NVIDIA_DRIVER_ROOT",
                                "DRIVER_ROOT_CTR_PATH")} == {
        "PASS_DEVICE_SPECS": "true", "GDRCOPY_ENABLED": "true", "GDS_ENABLED": "true", "MOFED_ENABLED": "true",
        "DEVICE_DISCOVERY_STRATEGY": "nvml", "MPS_ROOT": "/run/nvidia/mps",
        "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver", "DRIVER_ROOT_CTR_PATH": "/driver-root"}


@pytest.mark.parametrize("set_name", ["time-slicing-config-map", "single-config-fallback", "external-config-map"])
def test_a_config_reaches_the_plugin_through_the_config_manager(set_name: str) -> None:
    objects = docs(set_name)
    ds = next(d for d in objects if d["kind"] == "DaemonSet")
    (init,) = pod(ds)["initContainers"]
    init_env = env_of(init)
    main_env = env_of(pod(ds)["containers"][0])
    assert init_env["ONESHOT"] == "true" and main_env["CONFIG_FILE"] == init_env["CONFIG_FILE_DST"]
    assert init_env["DEFAULT_CONFIG"] == VALUE_SETS[set_name]["config"].get("default", "")
    volumes = {v["name"]: v for v in pod(ds)["volumes"]}
    src = next(m for m in init["volumeMounts"] if m["mountPath"] == init_env["CONFIG_FILE_SRCDIR"])
    dst_dir = str(Path(init_env["CONFIG_FILE_DST"]).parent)
    assert any(m["mountPath"] == dst_dir and m["name"] in volumes for m in init["volumeMounts"])
    # The kube-agent in the main container rewrites the file (writable) from the same ConfigMap (read-only).
    main_mounts = {m["mountPath"]: m for m in pod(ds)["containers"][0]["volumeMounts"]}
    assert main_mounts[dst_dir]["name"] == "config" and not main_mounts[dst_dir].get("readOnly")
    assert main_mounts[main_env["CONFIG_FILE_SRCDIR"]] == {**src, "readOnly": True}
    assert (main_env["NODE_LABEL"], main_env["FALLBACK_STRATEGIES"], main_env["DEFAULT_CONFIG"]) == (
        init_env["NODE_LABEL"], init_env["FALLBACK_STRATEGIES"], init_env["DEFAULT_CONFIG"])
    # Least RBAC: its own ServiceAccount may only read nodes.
    (role,) = [d for d in objects if d["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    (binding,) = [d for d in objects if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["name"] == pod(ds)["serviceAccountName"]
    assert pod(ds)["automountServiceAccountToken"] is True
    config_maps = {d["metadata"]["name"]: d for d in objects if d["kind"] == "ConfigMap"}
    cm_name = volumes[src["name"]]["configMap"]["name"]
    if set_name == "external-config-map":
        assert cm_name == "my-plugin-configs" and config_maps == {}
    else:
        assert config_maps[cm_name]["data"] == VALUE_SETS[set_name]["config"]["map"]
        assert "checksum/config" in ds["spec"]["template"]["metadata"]["annotations"]


def test_the_chart_configs_are_valid_plugin_configs(tmp_path: Path) -> None:
    for name, text in VALUE_SETS["time-slicing-config-map"]["config"]["map"].items():
        (tmp_path / name).write_text(text)
        resolve(environ={"CONFIG_FILE": str(tmp_path / name)})


def test_metrics_service_and_pod_monitor() -> None:
    objects = docs("metrics-on")
    ds = next(d for d in objects if d["kind"] == "DaemonSet")
    main = pod(ds)["containers"][0]
    assert env_of(main)["METRICS_PORT"] == "9400"
    assert env_of(main)["NODE_NAME"] == "<from field>", "the Hostname label, as DCGM exporter's"
    assert main["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    with_config = [d for d in render({**VALUE_SETS["external-config-map"], "metrics": {"port": 9400}})
                   if d["kind"] == "DaemonSet"]
    names = [e["name"] for e in pod(with_config[0])["containers"][0]["env"]]
    assert names.count("NODE_NAME") == 1 and "METRICS_PORT" in names
    (svc,) = [d for d in objects if d["kind"] == "Service"]
    assert svc["spec"]["selector"] == ds["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    (pm,) = [d for d in objects if d["kind"] == "PodMonitor"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"] == ds["spec"]["selector"]["matchLabels"]
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "interval": "30s"}]
    assert [d["kind"] for d in docs("defaults")] == ["DaemonSet"], "no metrics objects unless asked"
    assert "ports" not in pod(daemonset("defaults"))["containers"][0]


def test_names_and_namespace_as_nvidias_chart() -> None:
    (ds,) = render({"fullnameOverride": "nvdp", "namespaceOverride": "gpu"})
    assert (ds["metadata"]["name"], ds["metadata"]["namespace"]) == ("nvdp", "gpu")
    (ds,) = render({"image": {"repository": "r.example/p", "tag": "v9"}, "allowDefaultNamespace": True},
                   namespace="default")
    assert pod(ds)["containers"][0]["image"] == "r.example/p:v9"


def test_gfd_enabled_labels_from_our_pod_with_nvidias_features_d_and_no_more_rights() -> None:
    """NVIDIA's gfd.enabled: feature-labels on (supervisord.conf's gate), NVIDIA's features.d directory
    mounted for its file, and nothing else: no second pod, no privileges, no RBAC (a file, not the API)."""
    ds = daemonset("gfd")
    env = env_of(pod(ds)["containers"][0])
    assert env["GPU_PLUGIN_FEATURE_LABELS"] == "true" and env["GFD_NO_TIMESTAMP"] == "true"
    assert "GFD_OUTPUT_FILE" not in env  # NVIDIA's default path, mounted at the same place
    features = "/etc/kubernetes/node-feature-discovery/features.d"
    assert mounts(ds) == {**mounts(daemonset("defaults")), features: (features, False)}
    assert [d["kind"] for d in docs("gfd")] == [d["kind"] for d in docs("defaults")]  # no RBAC, no other pod
    defaults = env_of(pod(daemonset("defaults"))["containers"][0])
    assert "GPU_PLUGIN_FEATURE_LABELS" not in defaults and "GFD_NO_TIMESTAMP" not in defaults
    (ds,) = [d for d in render({"gfd": {"enabled": True}}) if d["kind"] == "DaemonSet"]
    assert "GFD_NO_TIMESTAMP" not in env_of(pod(ds)["containers"][0])  # null: the command's default


# --------------------------------------------------------------------------------------------------
# refused: NVIDIA features we do not serve fail the render, naming the value; typos fail the schema
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "message"), [
    ({"cdi": {"featureFlags": "disable-multiple-csv-devices"}}, "cdi.featureFlags"),
    ({"deviceDiscoveryStrategy": "tegra"}, "tegra is not served"),
    ({"gfd": {"enabled": True, "sleepInterval": "30s"}}, "gfd.sleepInterval: not served"),
    ({"gfd": {"enabled": True, "nameOverride": "gpu-feature-discovery"}}, "gfd.nameOverride: not served"),
    ({"gfd": {"namespaceOverride": "gfd"}}, "gfd.namespaceOverride: not served"),
    ({"gfd": {"enabled": True, "securityContext": {"privileged": True}}}, "gfd.securityContext: not served"),
    ({"gfd": {"enabled": True, "enableHostNetwork": True, "sleepInterval": "1m"}},
     "gfd.sleepInterval, gfd.enableHostNetwork: not served"),
    ({"nfd": {"enabled": True}}, "node-feature-discovery"),
    ({"devicePlugin": {"enabled": False}}, "deploys only the device plugin"),
    ({"devicePlugin": {"enableHostNetwork": True}}, "enableHostNetwork"),
    ({"mps": {"root": "", "enableHostPID": True}}, "only for MPS: set mps.root too"),
    ({"config": {"map": {"a": "version: v1\n", "b": "version: v1\n"}}}, "set config.default"),
    ({"config": {"map": {"a": "version: v1\n"}, "default": "b"}}, "config.default b is not in config.map"),
    ({"config": {"map": {"a": "version: v2\n"}}}, "config.map.a: version: v2 is not supported"),
    ({"config": {"map": {"a": "version: v1\nflags:\n  plugin:\n    deviceListStrategy: cdi-cri\n"}}},
     "set the chart value deviceListStrategy"),
    ({"config": {"name": "x", "map": {"a": "version: v1\n"}}}, "only one of config.name"),
    ({"stateDir": "/var/lib/gpu"}, "stateDir /var/lib/gpu: must lie under"),
    ({"metrics": {"service": {"enabled": True}}}, "need metrics.port"),
])
def test_unserved_values_fail_the_render_naming_them(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmRenderError, match=message.replace(".", r"\.")):
        render(values)


def test_the_default_namespace_is_refused_unless_allowed() -> None:
    with pytest.raises(HelmRenderError, match="allowDefaultNamespace"):
        render({}, namespace="default")


@pytest.mark.parametrize(("values", "where"), [
    ({"migStrateg": "mixed"}, "migStrateg"),
    ({"migStrategy": "dual"}, "/migStrategy"),
    ({"deviceListStrategy": "envvar,cdi"}, "/deviceListStrategy"),
    ({"failOnInitError": "yes"}, "/failOnInitError"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"health": {"probeInterval": "often"}}, "/health/probeInterval"),
    ({"health": {"node": {"condition": "yes"}}}, "/health/node/condition"),
    ({"dra": {"enabled": True, "devices": "none"}}, "/dra/devices"),
    ({"dra": {"enabled": True, "devices": "0, 1"}}, "/dra/devices"),
    ({"dra": {"deviceClassApiVersion": "resource.k8s.io/v1alpha3"}}, "/dra/deviceClassApiVersion"),
])
def test_the_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(HelmValuesError, match=where):
        render(values)


# --------------------------------------------------------------------------------------------------
# the static manifests are the chart's renders
# --------------------------------------------------------------------------------------------------


def test_static_manifests_equal_the_charts_renders() -> None:
    result = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, "")


def test_the_drift_check_catches_an_edited_manifest(tmp_path: Path) -> None:
    for name in ("daemonset.yaml", "daemonset-cdi-operator.yaml"):
        (tmp_path / name).write_text((REPO / "deploy" / name).read_text())
    edited = tmp_path / "daemonset.yaml"
    edited.write_text(edited.read_text().replace("memory: 160Mi", "memory: 64Mi"))
    result = subprocess.run([sys.executable, str(RENDER), "--check", "--deploy-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "daemonset.yaml" in result.stderr
    assert "daemonset-cdi-operator.yaml" not in result.stderr


PASS_THROUGH = {
    "imagePullSecrets": [{"name": "regcred"}],
    "updateStrategy": {"type": "OnDelete"},
    "podAnnotations": {"example.com/owner": "gpu-team"},
    "podSecurityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    "securityContext": {"privileged": True},  # the GPU Operator's choice: used verbatim, as NVIDIA's chart
    "resources": {"requests": {"cpu": "50m", "memory": "200Mi"}},
    "nodeSelector": {"nvidia.com/gpu.deploy.device-plugin": "true"},
    "affinity": None,  # as with helm --set affinity=null: Helm merges maps, {} would keep the default
    "tolerations": [{"operator": "Exists"}],
    "priorityClassName": "",
    "runtimeClassName": "nvidia",
    "selectorLabelsOverride": {"app": "nvidia-device-plugin-daemonset"},
    "componentSelectorLabels": {"enabled": True},
}


def test_nvidias_pod_values_are_used_as_nvidias_chart_uses_them() -> None:
    (ds,) = render(PASS_THROUGH)
    assert validation_errors([ds], K8S_VERSIONS[-1]) == []
    spec = pod(ds)
    main = spec["containers"][0]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert ds["spec"]["template"]["metadata"]["annotations"] == {"example.com/owner": "gpu-team"}
    assert spec["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert main["securityContext"] == {"privileged": True}
    # Helm merges maps: the default limit stays unless set (or nulled: resources.limits=null).
    assert main["resources"] == {"requests": {"cpu": "50m", "memory": "200Mi"}, "limits": {"memory": "256Mi"}}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.deploy.device-plugin": "true"}
    assert "affinity" not in spec and "priorityClassName" not in spec
    assert spec["tolerations"] == [{"operator": "Exists"}] and spec["runtimeClassName"] == "nvidia"
    selector = {"app": "nvidia-device-plugin-daemonset", "app.kubernetes.io/component": "device-plugin"}
    assert ds["spec"]["selector"]["matchLabels"] == selector
    assert ds["spec"]["template"]["metadata"]["labels"] == selector
    # Our posture check tells the operator's privileged choice apart from the default.
    assert any("privileged" in p for p in posture_problems(ds))


def test_without_a_config_no_api_access_at_all() -> None:
    objects = docs("defaults")
    ds = next(d for d in objects if d["kind"] == "DaemonSet")
    assert pod(ds)["automountServiceAccountToken"] is False and "serviceAccountName" not in pod(ds)
    assert not [d for d in objects if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")]
    assert "CONFIG_FILE_SRCDIR" not in env_of(pod(ds)["containers"][0])


def test_node_health_each_part_with_only_its_rbac() -> None:
    def rules(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
        return {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "")): d.get("rules", [])
                for d in objects if d["kind"] in ("ServiceAccount", "ClusterRole", "Role")}

    condition = render({"health": {"node": {"condition": True}}})
    ds = next(d for d in condition if d["kind"] == "DaemonSet")
    env = env_of(pod(ds)["containers"][0])
    assert (env["HEALTH_NODE_CONDITION"], env["NODE_NAME"]) == ("true", "<from field>")
    assert "HEALTH_NODE_EVENTS" not in env
    assert pod(ds)["serviceAccountName"] == "gdp-gpu-device-plugin" and pod(ds)["automountServiceAccountToken"]
    assert rules(condition) == {
        ("ServiceAccount", "gdp-gpu-device-plugin", NAMESPACE): [],
        ("ClusterRole", "gdp-gpu-device-plugin-node-condition", ""): [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]}]}
    events = render({"health": {"node": {"events": True}}})
    ds = next(d for d in events if d["kind"] == "DaemonSet")
    assert "HEALTH_NODE_CONDITION" not in env_of(pod(ds)["containers"][0])
    assert rules(events) == {
        ("ServiceAccount", "gdp-gpu-device-plugin", NAMESPACE): [],
        ("Role", "gdp-gpu-device-plugin-node-events", "default"): [
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]}]}
    (binding,) = [d for d in events if d["kind"] == "RoleBinding"]
    assert binding["metadata"]["namespace"] == "default"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gdp-gpu-device-plugin", "namespace": NAMESPACE}]
    # With the per-node configuration and metrics too: NODE_NAME once, each part's own rules.
    both = render({**VALUE_SETS["external-config-map"], "metrics": {"port": 9400},
                   "health": {"node": {"condition": True, "events": True}}})
    ds = next(d for d in both if d["kind"] == "DaemonSet")
    assert [e["name"] for e in pod(ds)["containers"][0]["env"]].count("NODE_NAME") == 1
    assert {k[1] for k in rules(both)} == {"gdp-gpu-device-plugin", "gdp-gpu-device-plugin-node-reader",
                                           "gdp-gpu-device-plugin-node-condition", "gdp-gpu-device-plugin-node-events"}


def test_dra_the_plugin_its_classes_and_only_its_rbac() -> None:
    """dra.enabled: the dra-plugin on (DRA_ENABLED, DRA_DEVICES, NODE_NAME), the kubelet's plugin directories,
    the CDI directory and the driver root for the claims' specs, NVIDIA's two DeviceClasses, and a
    ServiceAccount that may write ResourceSlices and read ResourceClaims, nothing else."""
    objects = docs("dra")
    ds = next(d for d in objects if d["kind"] == "DaemonSet")
    env = env_of(pod(ds)["containers"][0])
    assert (env["DRA_ENABLED"], env["DRA_DEVICES"], env["NODE_NAME"]) == ("true", "all", "<from field>")
    assert "DRA_ENABLED" not in env_of(pod(daemonset("defaults"))["containers"][0])
    plugins, registry = "/var/lib/kubelet/plugins", "/var/lib/kubelet/plugins_registry"
    assert mounts(ds) == {**mounts(daemonset("defaults")), plugins: (plugins, False), registry: (registry, False),
                          "/var/run/cdi": ("/var/run/cdi", False), "/": ("/driver-root", True)}
    classes = {d["metadata"]["name"]: d for d in objects if d["kind"] == "DeviceClass"}
    def nvidias(kind: str) -> list[dict[str, Any]]:  # NVIDIA's chart's selector, verbatim
        return [{"cel": {"expression": f"device.driver == 'gpu.nvidia.com' && "
                                       f"device.attributes['gpu.nvidia.com'].type == '{kind}'"}}]

    assert {n: (c["apiVersion"], c["spec"]["selectors"]) for n, c in classes.items()} == {
        "gpu.nvidia.com": ("resource.k8s.io/v1", nvidias("gpu")),
        "mig.nvidia.com": ("resource.k8s.io/v1", nvidias("mig"))}
    assert classes["gpu.nvidia.com"]["spec"]["extendedResourceName"] == "nvidia.com/gpu"  # NVIDIA's, on v1 only
    rules = {d["metadata"]["name"]: d["rules"] for d in objects if d["kind"] == "ClusterRole"}
    assert rules == {"gdp-gpu-device-plugin-dra": [
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"],
         "verbs": ["get", "list", "watch", "create", "update", "delete"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]}]}
    (binding,) = [d for d in objects if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["name"] == pod(ds)["serviceAccountName"] and pod(ds)["automountServiceAccountToken"]
    # The split and an older cluster's classes; DRA_DEVICES as the services read it.
    split = docs("dra-split-v1beta1")
    env = env_of(pod(next(d for d in split if d["kind"] == "DaemonSet"))["containers"][0])
    assert str(resolve(environ=env).dra_devices) == "0,1,GPU-930bc548-4e27-0432-876f-a3553ef2f53f"
    v1beta1 = [d for d in split if d["kind"] == "DeviceClass"]
    assert [d["apiVersion"] for d in v1beta1] == ["resource.k8s.io/v1beta1"] * 2
    assert all("extendedResourceName" not in d["spec"] for d in v1beta1)
    # A split with the classes on v1: nvidia.com/gpu stays the device plugin's alone (NVIDIA's chart refuses both).
    split_v1 = render({"dra": {"enabled": True, "devices": "0,1"}})
    (gpu_class,) = [d for d in split_v1 if d["kind"] == "DeviceClass" and d["metadata"]["name"] == "gpu.nvidia.com"]
    assert gpu_class["apiVersion"] == "resource.k8s.io/v1" and "extendedResourceName" not in gpu_class["spec"]
    # Another release (or NVIDIA's driver) owns the classes: none here.
    assert not [d for d in render({"dra": {"enabled": True, "deviceClasses": False}}) if d["kind"] == "DeviceClass"]


def test_dra_devices_with_a_per_node_config_is_each_nodes_unless_given() -> None:
    """With per-node configs and no dra.devices, DRA_DEVICES is not set: the environment would override each
    node's file (dra.devices there). Given, it is set (and overrides them); the extended resource only with all."""
    per_node = {"config": {"map": {"default": "version: v1\n", "split": "version: v1\ndra:\n  devices: [0]\n"}}}
    objects = render({**per_node, "dra": {"enabled": True}})
    env = env_of(pod(next(d for d in objects if d["kind"] == "DaemonSet"))["containers"][0])
    assert env["DRA_ENABLED"] == "true" and "DRA_DEVICES" not in env
    (gpu_class,) = [d for d in objects if d["kind"] == "DeviceClass" and d["metadata"]["name"] == "gpu.nvidia.com"]
    assert "extendedResourceName" not in gpu_class["spec"]
    given = render({**per_node, "dra": {"enabled": True, "devices": "all"}})
    env = env_of(pod(next(d for d in given if d["kind"] == "DaemonSet"))["containers"][0])
    assert env["DRA_DEVICES"] == "all"
    (gpu_class,) = [d for d in given if d["kind"] == "DeviceClass" and d["metadata"]["name"] == "gpu.nvidia.com"]
    assert gpu_class["spec"]["extendedResourceName"] == "nvidia.com/gpu"
