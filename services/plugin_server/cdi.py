"""The CDI specs for the cdi-annotations and cdi-cri device-list strategies.

Why: with a CDI strategy the Allocate answer names devices only
(`k8s.device-plugin.nvidia.com/gpu=<id>`); the container runtime resolves those names
through a spec file in its CDI directory, and the spec is all the container gets: without the
driver's libraries and the toolkit's hooks in it, CUDA cannot run. So the spec holds what
NVIDIA's plugin puts there (it builds it with the container toolkit's `nvcdi`, for the same
driver root and dev root): per GPU and per MIG device its device nodes; common to all, the
control nodes, the driver's libraries of the running driver version, its GSP firmware, its
binaries, its IPC sockets, NVIDIA_VISIBLE_DEVICES=void, NVIDIA_CTK_LIBCUDA_DIR and the
createContainer hooks. Device nodes carry major, minor and mode read from the real files.
GDS, MOFED and IMEX channels get their own specs (kinds .../gds, .../mofed, .../imex-channel),
as NVIDIA's plugin writes them.

Roots: the files are read where this container sees them (the container driver root, NVIDIA's
/driver-root, when mounted; else the driver root itself) and named in the spec by their host
path (under the driver root and the dev root), because the runtime reads the spec on the host.

Why atomic: runtimes watch the CDI directory and re-read a spec as soon as it changes. A
half-written file would make every CDI device of this kind unresolvable (the pod fails to
start), so the spec is written to a temporary file in the same directory (a name the
runtime ignores), fsynced, and renamed over the old one.

Why refuse to start without the driver: NVIDIA's plugin fails too; a spec that points at
libraries or device nodes that are not there would only fail later, in every pod.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import posixpath
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.bus.messages import DeviceState
from common.lifecycle import PermanentError
from common.settings import Settings
from services.plugin_server.allocation import CDI_KIND, CDI_VENDOR, host_path

log = logging.getLogger(__name__)

CDI_VERSION = "0.5.0"
SPEC_FILE = "k8s.device-plugin.nvidia.com-gpu.json"
# nvcdi's common device nodes (pkg/nvcdi/common-nvml.go): each one that exists.
CONTROL_NODES = ("/dev/nvidia-modeset", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidiactl")
MOUNT_OPTIONS = ["ro", "nosuid", "nodev", "rbind", "rprivate"]
# Where nvcdi's library locator looks for libcuda.so.<version> under the root (internal/lookup/library.go).
LIBRARY_DIRS = (
    "/", "/usr/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu/nvidia/current", "/usr/lib/aarch64-linux-gnu/nvidia/current", "/lib64",
    "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/lib/x86_64-linux-gnu/nvidia/current",
    "/lib/aarch64-linux-gnu/nvidia/current", "/glibc/lib",
)
# nvcdi's driver binaries (pkg/nvcdi/driver-nvml.go) and the executable locator's default PATH.
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server", "nvidia-imex", "nvidia-imex-ctl")
BINARY_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# nvcdi's IPC sockets (internal/discover/ipc.go).
IPC_PATHS = ("/var/run/nvidia-persistenced/socket", "/var/run/nvidia-fabricmanager/socket", "/tmp/nvidia-mps")
FIRMWARE_DIRS = ("/lib/firmware/updates/{release}", "/lib/firmware/updates", "/lib/firmware/{release}",
                 "/lib/firmware")
IMEX_CHANNEL_DIR = "/dev/nvidia-caps-imex-channels"


class CdiError(PermanentError):
    """The CDI spec cannot be made or written: a CDI strategy cannot be served."""


@dataclass(frozen=True)
class Roots:
    """Where files are read (this container's view) and how the host names them."""

    driver: str  # the driver root as seen here
    host_driver: str  # the driver root on the host
    dev: str  # the dev root as seen here
    host_dev: str  # the dev root on the host


def roots(settings: Settings) -> Roots:
    """NVIDIA's rules: the container driver root when mounted, else the driver root (same path here);
    the dev root defaults to the driver root, or "/" where that root has no /dev (root.getDevRoot)."""
    driver = settings.container_driver_root if os.path.isdir(settings.container_driver_root) \
        else settings.driver_root
    if settings.dev_root != settings.driver_root:
        return Roots(driver, settings.driver_root, settings.dev_root, settings.dev_root)
    if os.path.isdir(host_path(driver, "/dev")):
        return Roots(driver, settings.driver_root, driver, settings.driver_root)
    return Roots(driver, settings.driver_root, "/", "/")


def _here(root: str, path: str) -> str:
    return host_path(root, path)


def _relative(root: str, found: str) -> str:
    rel = "/" + os.path.relpath(found, root).lstrip("/") if root not in ("", "/") else found
    return posixpath.normpath(rel)


def device_node(path: str, r: Roots, *, dev_root: str | None = None, host_dev: str | None = None) -> dict[str, Any]:
    """A CDI deviceNode for `path` (container path), read from the real file; CdiError when it is not one."""
    seen = _here(r.dev if dev_root is None else dev_root, path)
    try:
        st = os.stat(seen)
    except OSError as e:
        raise CdiError(f"CDI spec: device node {path} not found at {seen}: {e.strerror}") from e
    if not stat.S_ISCHR(st.st_mode):
        raise CdiError(f"CDI spec: {seen} is not a character device")
    return {
        "path": path,
        "hostPath": host_path(r.host_dev if host_dev is None else host_dev, path),
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "permissions": "rwm",
    }


def _mount(r: Roots, container_path: str) -> dict[str, Any]:
    return {"hostPath": host_path(r.host_driver, container_path), "containerPath": container_path,
            "options": list(MOUNT_OPTIONS)}


@dataclass(frozen=True)
class DriverFiles:
    """The driver's files nvcdi mounts, as container paths (the same path as under the driver root)."""

    version: str
    lib_dir: str
    libraries: tuple[str, ...]
    firmware: tuple[str, ...]
    binaries: tuple[str, ...]
    ipc: tuple[str, ...]


def find_driver_files(r: Roots, version: str) -> DriverFiles:
    """Locates the driver's files of `version` under the driver root; CdiError names what is missing and
    where it looked (NVIDIA's plugin cannot start a CDI strategy without them either)."""
    if not version:
        raise CdiError("CDI spec: the driver version is unknown (NVML has not answered yet)")
    lib_dir = ""
    looked: list[str] = []
    for name in (f"libcuda.so.{version}", f"libnvidia-ml.so.{version}"):
        for d in LIBRARY_DIRS:
            candidate = _here(r.driver, posixpath.join(d, name))
            looked.append(candidate)
            if os.path.isfile(candidate):
                lib_dir = posixpath.normpath(d)
                break
        if lib_dir:
            break
    if not lib_dir:
        raise CdiError(
            f"CDI spec: the driver's libraries for driver {version} are missing: no libcuda.so.{version} or "
            f"libnvidia-ml.so.{version} under the driver root {r.driver!r} (looked at {', '.join(looked)}); "
            "mount the host's driver root there (DRIVER_ROOT_CTR_PATH) or use the envvar strategy")
    libs: dict[str, None] = {}
    for pattern in (f"*.so.{version}", f"vdpau/*.so.{version}", "libnvidia-nvvm70.so.*"):
        for found in sorted(glob.glob(posixpath.join(_here(r.driver, lib_dir), pattern))):
            if os.path.isfile(found):
                libs[_relative(r.driver, found)] = None
    release = os.uname().release
    firmware: dict[str, None] = {}
    for d in FIRMWARE_DIRS:
        base = _here(r.driver, posixpath.join(d.format(release=release), "nvidia", version))
        for found in sorted(glob.glob(posixpath.join(base, "gsp*.bin"))):
            firmware[_relative(r.driver, found)] = None
    binaries = []
    for name in BINARIES:
        for d in BINARY_DIRS:
            found = _here(r.driver, posixpath.join(d, name))
            if os.path.isfile(found) and os.access(found, os.X_OK):
                binaries.append(posixpath.join(d, name))
                break
    ipc = tuple(p for p in IPC_PATHS if os.path.exists(_here(r.driver, p)))
    return DriverFiles(version, lib_dir, tuple(libs), tuple(firmware), tuple(binaries), ipc)


def _hook(settings: Settings, name: str, *args: str) -> dict[str, Any]:
    # nvidia-ctk implements the hooks under its `hook` subcommand; nvidia-cdi-hook at the top level.
    base = posixpath.basename(settings.cdi_hook_path)
    fixed = [base, "hook"] if base == "nvidia-ctk" else [base]
    return {"hookName": "createContainer", "path": settings.cdi_hook_path, "args": [*fixed, name, *args],
            "env": ["NVIDIA_CTK_DEBUG=false"]}


def common_edits(settings: Settings, r: Roots, files: DriverFiles) -> dict[str, Any]:
    nodes = [device_node(p, r) for p in CONTROL_NODES if os.path.exists(_here(r.dev, p))]
    mounts = [_mount(r, p) for p in (*files.libraries, *files.firmware, *files.binaries, *files.ipc)]
    mounts.sort(key=lambda m: str(m["containerPath"]))
    hooks = []
    cuda = posixpath.join(files.lib_dir, f"libcuda.so.{files.version}")
    if cuda in files.libraries:
        hooks.append(_hook(settings, "create-symlinks", "--link",
                           f"libcuda.so.1::{posixpath.join(files.lib_dir, 'libcuda.so')}"))
    hooks.append(_hook(settings, "enable-cuda-compat", f"--host-driver-version={files.version}"))
    folders = dict.fromkeys(posixpath.dirname(p) for p in files.libraries)
    hooks.append(_hook(settings, "update-ldcache", *[a for f in folders for a in ("--folder", f)]))
    hooks.append(_hook(settings, "disable-device-node-modification"))
    hooks.append(_hook(settings, "update-application-profile"))
    return {
        "env": [f"NVIDIA_CTK_LIBCUDA_DIR={files.lib_dir}", "NVIDIA_VISIBLE_DEVICES=void"],
        "deviceNodes": nodes,
        "hooks": hooks,
        "mounts": mounts,
    }


def build_spec(devices: list[DeviceState], settings: Settings, driver_version: str) -> dict[str, Any]:
    """The spec NVIDIA's plugin writes for every GPU and MIG device in `devices` (reads the driver's files)."""
    r = roots(settings)
    files = find_driver_files(r, driver_version)
    gpus = {d.id: d for d in devices if d.kind == "gpu"}
    out: list[dict[str, Any]] = []
    for d in devices:
        name = d.id if settings.device_id_strategy == "uuid" else d.index
        if d.kind == "mig":
            gpu = gpus.get(d.parent)
            if gpu is None:
                raise CdiError(f"CDI spec: MIG device {d.id} ({d.index}): its GPU {d.parent or '(none)'} is not known")
            paths = [f"/dev/nvidia{gpu.minor}"] + [f"/dev/nvidia-caps/nvidia-cap{c}" for c in d.caps]
        else:
            paths = [f"/dev/nvidia{d.minor}"]
        out.append({"name": name, "containerEdits": {"deviceNodes": [device_node(p, r) for p in paths]}})
    return {"cdiVersion": CDI_VERSION, "kind": CDI_KIND, "devices": out,
            "containerEdits": common_edits(settings, r, files)}


def spec_key(devices: list[DeviceState], driver_version: str) -> tuple[Any, ...]:
    """What the spec depends on besides the files: unchanged key, unchanged spec (health flips are free)."""
    return (driver_version, tuple((d.id, d.kind, d.index, d.minor, d.parent, tuple(d.caps)) for d in devices))


def check_driver_files(settings: Settings) -> None:
    """At start, before NVML has answered: the control node and some driver library must be there."""
    r = roots(settings)
    problems = []
    ctl = _here(r.dev, "/dev/nvidiactl")
    if not os.path.exists(ctl):
        problems.append(f"missing {ctl}")
    libs = [_here(r.driver, posixpath.join(d, f"{n}.so.*")) for d in LIBRARY_DIRS for n in ("libcuda", "libnvidia-ml")]
    if not any(glob.glob(p) for p in libs):
        problems.append(f"no libcuda.so.* or libnvidia-ml.so.* under {r.driver} (looked in "
                        f"{', '.join(sorted({posixpath.dirname(p) for p in libs}))})")
    if problems:
        raise CdiError(
            f"device-list strategy {','.join(settings.device_list_strategy)} needs the NVIDIA driver under "
            f"the driver root {settings.driver_root!r} (seen here at {r.driver!r}, dev root {r.dev!r}): "
            + "; ".join(problems))


# -- GDS, MOFED, IMEX: NVIDIA's additional CDI classes -----------------------------------------

def _class_spec(cls: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cdiVersion": CDI_VERSION, "kind": f"{CDI_VENDOR}/{cls}", "devices": devices}


def imex_channels(settings: Settings) -> tuple[str, ...]:
    """The IMEX channel IDs to hand out: those whose node exists; a required one that does not is fatal."""
    r = roots(settings)
    out = []
    for cid in settings.imex_channel_ids:
        path = f"{IMEX_CHANNEL_DIR}/channel{cid}"
        candidates = dict.fromkeys((_here(r.dev, path), path))
        if any(os.path.exists(c) and stat.S_ISCHR(os.stat(c).st_mode) for c in candidates):
            log.info("IMEX channel channel%d selected", cid)
            out.append(str(cid))
        elif settings.imex_required:
            raise CdiError(f"requested IMEX channel channel{cid} does not exist (looked at {', '.join(candidates)}; "
                           "imex.required / IMEX_REQUIRED is true)")
        else:
            log.warning("ignoring requested IMEX channel channel%d: no device node at %s", cid, ", ".join(candidates))
    return tuple(out)


def extra_specs(settings: Settings, channels: tuple[str, ...], gds_root: str = "/") -> dict[str, dict[str, Any]]:
    """Spec file name -> spec for the enabled GDS, MOFED and IMEX classes; CdiError when one has no devices.

    `gds_root`: nvidia-fs nodes are always created at the host's /dev (internal/discover/gds.go)."""
    r = roots(settings)
    specs: dict[str, dict[str, Any]] = {}
    if settings.gds_enabled:
        found = sorted(glob.glob(_here(gds_root, "/dev/nvidia-fs*")))
        if not found:
            raise CdiError(f"gdsEnabled with a CDI strategy: no {_here(gds_root, '/dev/nvidia-fs*')} device nodes "
                           "(is nvidia-fs loaded?)")
        edits: dict[str, Any] = {"deviceNodes": [
            device_node(_relative(gds_root, p), r, dev_root=gds_root, host_dev=gds_root) for p in found]}
        mounts = [_mount(r, p) for p in ("/run/udev", "/etc/cufile.json") if os.path.exists(_here(r.driver, p))]
        if mounts:
            edits["mounts"] = mounts
        specs["gds"] = _class_spec("gds", [{"name": "all", "containerEdits": edits}])
    if settings.mofed_enabled:
        found = sorted(glob.glob(_here(r.dev, "/dev/infiniband/uverbs*")))
        found += [p for p in (_here(r.dev, "/dev/infiniband/rdma_cm"),) if os.path.exists(p)]
        if not found:
            raise CdiError(f"mofedEnabled with a CDI strategy: no {_here(r.dev, '/dev/infiniband')}/uverbs* or "
                           "rdma_cm device nodes")
        nodes = [device_node(_relative(r.dev, p), r) for p in found]
        specs["mofed"] = _class_spec("mofed", [{"name": "all", "containerEdits": {"deviceNodes": nodes}}])
    if channels:
        paths = {c: f"{IMEX_CHANNEL_DIR}/channel{c}" for c in channels}
        devs = [{"name": c, "containerEdits": {"deviceNodes": [{"path": p, "hostPath": host_path(r.host_dev, p)}]}}
                for c, p in paths.items()]
        specs["imex-channel"] = _class_spec("imex-channel", devs)
    return {f"{CDI_VENDOR}-{cls}.json": spec for cls, spec in specs.items()}


def write_spec(spec_dir: Path, spec: dict[str, Any], name: str = SPEC_FILE) -> Path:
    """Writes `spec` to <spec_dir>/<name> (default k8s.device-plugin.nvidia.com-gpu.json) atomically, mode 0644.

    Raises CdiError (naming the path and the reason) when the directory cannot be written.
    """
    target = spec_dir / name
    data = json.dumps(spec, indent=2).encode() + b"\n"
    try:
        spec_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=spec_dir, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(spec_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise CdiError(f"CDI spec {target}: cannot write: {e.strerror or e}") from e
    return target


def remove_spec(spec_dir: Path, name: str = SPEC_FILE) -> None:
    """Removes the spec written by `write_spec`; nothing to do if it is not there."""
    with contextlib.suppress(FileNotFoundError):
        (spec_dir / name).unlink()
