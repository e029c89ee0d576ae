"""The containers of nvidia_layouts.yaml, and a fake node that runs them with podman as the kubelet would.

What is reproduced: the command and args (Kubernetes' command replaces the image's entry point),
the environment (downward-API values by their test values), the security context (privileged,
capabilities, no-new-privileges) and every volume mount, each volume a directory of the test's own:
a hostPath lives below the node's fake host root (so that /run/nvidia/mps/shm is inside
/run/nvidia/mps, and the Operator's /host is that whole root), a ConfigMap is laid out as the
kubelet lays it out (keys are symlinks into ..data), an emptyDir is shared by the pod's containers.
What is not: hostPID and shareProcessNamespace (each container runs alone), mount propagation (a
Bidirectional /mps would put the init container's tmpfs on this machine's own mount table on a host
whose / is shared), the pod network (every container runs with --network none: no API server is
reachable, and none of these jobs needs another network).

Every container gets a name of its own and `--rm`; the node removes whatever is still there at
teardown, so a failed test leaves no container (or conmon) behind for the leak check.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scripts.image import podman_env
from tests.image.test_container import IMAGE, podman

LAYOUTS_FILE = Path(__file__).with_name("nvidia_layouts.yaml")
# The fake node's machine type (the host's /sys/class/dmi/id/product_name), as GFD reads it.
PRODUCT_NAME = "DGX H100"


@dataclass(frozen=True)
class Mount:
    mount_path: str
    host_path: str | None = None  # a hostPath volume
    host_type: str = ""
    config_map: str | None = None  # a ConfigMap volume
    empty_dir: str | None = None  # an emptyDir volume, by its name
    sub_path: str = ""
    read_only: bool = False
    default_mode: int | None = None
    propagation: str = ""


@dataclass(frozen=True)
class Container:
    layout: str
    daemonset: str
    name: str
    init: bool
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # as the container sees it (downward API: the test value)
    security: Mapping[str, Any]
    mounts: tuple[Mount, ...]

    @property
    def id(self) -> str:
        return f"{self.layout}/{self.name}"

    @property
    def argv(self) -> tuple[str, ...]:
        return self.command + self.args

    def getenv(self, name: str) -> str | None:
        return next((v for k, v in self.env if k == name), None)

    def mount(self, mount_path: str) -> Mount:
        return next(m for m in self.mounts if m.mount_path == mount_path)


@dataclass(frozen=True)
class Pod:
    layout: str
    daemonset: str
    host_pid: bool
    share_process_namespace: bool
    containers: tuple[Container, ...]
    also_in: list[str] = field(default_factory=list)  # layouts that render it the same (same_as)

    @property
    def init_containers(self) -> tuple[Container, ...]:
        return tuple(c for c in self.containers if c.init)


@dataclass(frozen=True)
class ConfigMap:
    name: str
    data: Mapping[str, str]
    selected_without_label: str | None = None


@dataclass(frozen=True)
class Layout:
    id: str
    title: str
    config_maps: Mapping[str, ConfigMap]
    host_files: Mapping[str, str]
    pods: tuple[Pod, ...]


def _mount(raw: Mapping[str, Any]) -> Mount:
    return Mount(mount_path=raw["mountPath"], host_path=raw.get("hostPath"), host_type=raw.get("type", ""),
                 config_map=raw.get("configMap"), empty_dir=raw.get("emptyDir"), sub_path=raw.get("subPath", ""),
                 read_only=bool(raw.get("readOnly", False)), default_mode=raw.get("defaultMode"),
                 propagation=raw.get("mountPropagation", ""))


def _env(raw: list[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    env = []
    for item in raw:
        if "fieldRef" in item:
            env.append((item["name"], str(item["test"])))
        else:
            value = item.get("value")
            env.append((item["name"], "" if value is None else str(value)))  # a null value is ""
    return tuple(env)


def load(path: Path = LAYOUTS_FILE) -> list[Layout]:
    raw = yaml.safe_load(path.read_text())
    layouts: list[Layout] = []
    pods_by_ref: dict[str, Pod] = {}
    for lay in raw["layouts"]:
        pods: list[Pod] = []
        for p in lay["pods"]:
            if "same_as" in p:
                same = pods_by_ref[p["same_as"]]
                same.also_in.append(lay["id"])
                pods.append(same)
                continue
            containers = tuple(
                Container(layout=lay["id"], daemonset=p["daemonset"], name=c["name"], init=bool(c["init"]),
                          command=tuple(c["command"]), args=tuple(c.get("args") or ()), env=_env(c.get("env") or []),
                          security=c.get("securityContext") or {},
                          mounts=tuple(_mount(m) for m in c.get("volumeMounts") or ()))
                for c in p["containers"])
            pod = Pod(lay["id"], p["daemonset"], bool(p["hostPID"]), bool(p["shareProcessNamespace"]), containers)
            pods_by_ref[f"{lay['id']}/{p['daemonset']}"] = pod
            pods.append(pod)
        config_maps = {name: ConfigMap(name, cm["data"], cm.get("selected_without_label"))
                       for name, cm in (lay.get("configMaps") or {}).items()}
        layouts.append(Layout(lay["id"], lay["title"], config_maps, lay.get("hostFiles") or {}, tuple(pods)))
    return layouts


def distinct_pods(layouts: list[Layout]) -> list[Pod]:
    """Each pod once: one rendered the same in several layouts (same_as) is one pod."""
    seen: dict[int, Pod] = {}
    for lay in layouts:
        for pod in lay.pods:
            seen.setdefault(id(pod), pod)
    return list(seen.values())


def layout_of(layouts: list[Layout], pod: Pod) -> Layout:
    return next(lay for lay in layouts if lay.id == pod.layout)


def job(c: Container) -> str:
    """What the container is for, from its command (and ONESHOT for the config-manager)."""
    argv = c.argv
    if argv[0] == "config-manager":
        return "config-manager-oneshot" if c.getenv("ONESHOT") == "true" else "config-manager-sidecar"
    if argv == ("nvidia-device-plugin",) or argv == ("/bin/sh", "-c", "/bin/entrypoint.sh"):
        return "device-plugin"
    if argv == ("gpu-feature-discovery",):
        return "gpu-feature-discovery"
    if argv == ("mps-control-daemon", "mount-shm"):
        return "mps-mount-shm"
    if argv == ("mps-control-daemon",):
        return "mps-control-daemon"
    return "unknown"


def nvidia_selection(keys: list[str], default: str, strategies: list[str]) -> str | None:
    """The config NVIDIA's config-manager selects without the node label (cmd/config-manager
    updateConfigName): DEFAULT_CONFIG, else the fallback strategies in order; None: the empty config."""
    if default:
        return default
    for s in strategies:
        if s == "named" and "default" in keys:
            return "default"
        if s == "single" and len(keys) == 1:
            return keys[0]
        if s == "empty":
            return None
    raise AssertionError(f"NVIDIA's config-manager selects nothing from {keys} with {strategies}: it exits 1")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        return self.stderr.rstrip("\n").rsplit("\n", 1)[-1]

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"


@dataclass
class Started:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None


class Node:
    """One test's fake GPU node (without a GPU): a host root, the pods' volumes, the containers run."""

    def __init__(self, root: Path, layout: Layout) -> None:
        self.root = root
        self.layout = layout
        self.names: list[str] = []
        self.started: list[Started] = []
        self.host_root.mkdir(parents=True, exist_ok=True)
        for path, text in layout.host_files.items():
            self.host(path).parent.mkdir(parents=True, exist_ok=True)
            self.host(path).write_text(text)
        dmi = self.host("/sys/class/dmi/id/product_name")
        dmi.parent.mkdir(parents=True, exist_ok=True)
        dmi.write_text(PRODUCT_NAME + "\n")

    @property
    def host_root(self) -> Path:
        return self.root / "host"

    def host(self, path: str) -> Path:
        return self.host_root / path.lstrip("/")

    # -- volumes --------------------------------------------------------------------------
    def _config_map_dir(self, c: Container, name: str) -> Path:
        """The ConfigMap as the kubelet's atomic writer lays it out: the files in a dated directory,
        ..data a link to it, each key a link through ..data (what a selection must follow)."""
        d = self.root / "pods" / c.daemonset / f"configmap-{name}"
        if not d.exists():
            cm = self.layout.config_maps[name]
            dated = d / "..2026_01_01_00_00_00.000000001"
            dated.mkdir(parents=True)
            mode = next((m.default_mode for m in c.mounts if m.config_map == name and m.default_mode), None)
            for key, text in cm.data.items():
                (dated / key).write_text(text)
                (dated / key).chmod(mode or 0o644)
                (d / key).symlink_to(Path("..data") / key)
            (d / "..data").symlink_to(dated.name)
        return d

    def source(self, c: Container, m: Mount) -> Path:
        """Where the volume of mount `m` is on this machine (created as the kubelet would)."""
        if m.host_path is not None:
            src = self.host(m.host_path)
            src.mkdir(parents=True, exist_ok=True)  # Directory: the node has it; DirectoryOrCreate: made
        elif m.config_map is not None:
            src = self._config_map_dir(c, m.config_map)
        elif m.empty_dir is not None:
            src = self.root / "pods" / c.daemonset / f"emptydir-{m.empty_dir}"
            src.mkdir(parents=True, exist_ok=True)
        else:
            raise AssertionError(f"{c.id}: mount {m.mount_path} has no volume")
        if m.sub_path:
            # The kubelet resolves a subPath inside the volume: a ConfigMap key is a file in ..data.
            src = (src / m.sub_path).resolve()
        return src

    def volume(self, c: Container, mount_path: str) -> Path:
        return self.source(c, c.mount(mount_path))

    # -- podman ---------------------------------------------------------------------------
    def podman_run_args(self, c: Container, env: Mapping[str, str | None] | None = None) -> tuple[str, list[str]]:
        name = f"gpl-{c.name}-{uuid.uuid4().hex[:8]}"
        argv = ["run", "--rm", "--name", name, "--pull", "never", "--network", "none"]
        sec = c.security
        if sec.get("privileged"):
            argv.append("--privileged")
        for cap in (sec.get("capabilities") or {}).get("add") or ():
            argv += ["--cap-add", cap]
        for cap in (sec.get("capabilities") or {}).get("drop") or ():
            argv += ["--cap-drop", cap]
        if sec.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        merged = dict(c.env)
        for k, v in (env or {}).items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = v
        for k, v in merged.items():
            argv += ["-e", f"{k}={v}"]
        for m in c.mounts:
            # /sys read-only cannot be reproduced: the runtime mounts the cgroup filesystem below it.
            ro = m.read_only and m.mount_path != "/sys"
            argv += ["-v", f"{self.source(c, m)}:{m.mount_path}{':ro' if ro else ''}"]
        argv += ["--entrypoint", json.dumps(list(c.command)), IMAGE, *c.args]
        self.names.append(name)
        return name, argv

    def run(self, c: Container, env: Mapping[str, str | None] | None = None, timeout: float = 90) -> Result:
        """Runs `c` to its end (an init container, or one expected to exit)."""
        name, argv = self.podman_run_args(c, env)
        try:
            out = podman(*argv, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.remove(name)
            raise AssertionError(f"{c.id} still running after {timeout} s: {e.stdout!r} {e.stderr!r}") from None
        return Result(out.returncode, out.stdout, out.stderr)

    def run_init_containers(self, c: Container) -> None:
        """The init containers of `c`'s pod, in order, as the kubelet runs them before `c`."""
        pod = next(p for p in self.layout.pods if any(x is c for x in p.containers))
        for init in pod.init_containers:
            if init is c:
                break
            res = self.run(init)
            assert res.returncode == 0, f"init container {init.id}: {res}"

    def start(self, c: Container, env: Mapping[str, str | None] | None = None) -> Started:
        """Starts `c` in the background (a container that is meant to keep running)."""
        name, argv = self.podman_run_args(c, env)
        out, err = self.root / f"{name}.out", self.root / f"{name}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(["podman", *argv], stdout=o, stderr=e, env=podman_env())
        started = Started(name, proc, out, err)
        self.started.append(started)
        return started

    def stop(self, s: Started, grace_s: int = 10) -> tuple[int, float]:
        """SIGTERM (the image's STOPSIGNAL, as the kubelet sends it), SIGKILL after `grace_s`: the
        container's exit status and how long it took."""
        t0 = time.monotonic()
        podman("stop", "-t", str(grace_s), s.name, timeout=grace_s + 30)
        rc = s.proc.wait(timeout=30)
        return rc, time.monotonic() - t0

    def remove(self, name: str) -> None:
        podman("rm", "--force", "--time", "0", name, timeout=60)

    def close(self) -> None:
        for s in self.started:
            if s.running():
                self.remove(s.name)
                try:
                    s.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
        # Anything a timed-out or failed run left (a no-op for containers --rm already removed).
        leftover = podman("ps", "--all", "--quiet", "--filter", "name=^gpl-", "--format", "{{.Names}}", timeout=60)
        for name in set(leftover.stdout.split()) & set(self.names):
            self.remove(name)


def labels(text: str) -> dict[str, str]:
    """NFD's features.d file format: one key=value a line."""
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip())


def containers_of(layouts: list[Layout], kind: str) -> Iterator[Container]:
    for pod in distinct_pods(layouts):
        for c in pod.containers:
            if job(c) == kind:
                yield c
