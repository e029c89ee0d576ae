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
GDRCopy, GDS, MOFED and IMEX channels get their own specs (kinds .../gdrcopy, .../gds, .../mofed,
.../imex-channel), as NVIDIA's plugin writes them.

Roots: the files are read where this container sees them (the container driver root, NVIDIA's
/driver-root, when mounted; else the driver root itself) and named in the spec by their host
path, because the runtime reads the spec on the host: under the host's driver root, device nodes
too where the driver root has a /dev (`roots` says when NVIDIA_DEV_ROOT names them).

Why atomic: runtimes watch the CDI directory and re-read a spec as soon as it changes. A
half-written file would make every CDI device of this kind unresolvable (the pod fails to
start), so the spec is written to a temporary file in the same directory (a name the
runtime ignores), fsynced, and renamed over the old one.

Why every mounted path is resolved inside the driver root and checked first (driver_root.py,
find_driver_files): the runtime bind-mounts a hostPath as root, following the host's symlinks, so a
`libescape.so.<version> -> /etc/shadow` under the driver root would put the host's /etc/shadow into
every GPU container. The spec names the resolved file, and only a regular file of the driver's.

Why refuse to start without the driver: NVIDIA's plugin fails too; a spec that points at
libraries or device nodes that are not there would only fail later, in every pod.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.bus.messages import DeviceState
from common.files import kind_of, replace_file
from common.lifecycle import PermanentError
from common.settings import Settings
from services.plugin_server.allocation import CDI_KIND, CDI_VENDOR, host_path
from services.plugin_server.driver_root import (
    Found,
    Missing,
    Refusals,
    Refused,
    TooMany,
    first_match,
    matching_names,
    resolve,
    resolve_entry,
)

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
# nvcdi's gdrcopy mode (internal/discover/gdrcopy.go): the gdrdrv module's one node, under the dev root.
GDRCOPY_NODE = "/dev/gdrdrv"
# What the driver root may offer before the spec is refused (find_driver_files says why refused): a
# driver installs some 40 to 80 versioned libraries and a handful of GSP firmware files; a node has
# tens of InfiniBand verbs devices (thousands with every SR-IOV function on the host) and 16 nvidia-fs.
MAX_LIBRARIES = 512
MAX_FIRMWARE = 64
MAX_DEVICE_NODES = 4096
_SHARED_LIBRARY = re.compile(r"\.so(\.|$)")  # libx.so, libx.so.1, libx.so.580.159.04
# GDS's mounts and what each must be (internal/discover/gds.go mounts both when present).
GDS_MOUNTS: dict[str, Callable[[int], bool]] = {"/run/udev": stat.S_ISDIR, "/etc/cufile.json": stat.S_ISREG}


# Why a resolved path is not one to name in the spec; None when it is.
Check = Callable[[Found], str | None]


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
    """NVIDIA's rules (cmd/nvidia-device-plugin root.getDevRoot, internal/cdi getRootTransformer).

    Files are read under the container driver root when it is mounted, else under the driver root itself
    (the same path here), and named in the spec under the host's driver root.

    Device nodes: where that root has a /dev, they are read there and named, as every other path found under
    the root, under the host's driver root. NVIDIA_DEV_ROOT does not name them: NVIDIA maps its dev root to
    NVIDIA_DEV_ROOT only when the dev root differs from the driver root, and getDevRoot makes them equal
    whenever the root has a /dev (the nodes it read are the driver root's, whatever NVIDIA_DEV_ROOT says).

    Where the root has no /dev, the nodes are the host's: read at this container's /dev (what the runtime
    gave it) and named under NVIDIA_DEV_ROOT when it is set apart from the driver root, else under /. Here
    NVIDIA names them under the driver root (its dev root defaults to it), a /dev it has just found missing
    there (a driver root of libraries only, such as GKE's /home/kubernetes/bin/nvidia): every container
    would fail to start."""
    driver = settings.container_driver_root if os.path.isdir(settings.container_driver_root) \
        else settings.driver_root
    if os.path.isdir(host_path(driver, "/dev")):
        return Roots(driver, settings.driver_root, driver, settings.driver_root)
    host_dev = settings.dev_root if settings.dev_root != settings.driver_root else "/"
    return Roots(driver, settings.driver_root, "/", host_dev)


def _here(root: str, path: str) -> str:
    return host_path(root, path)


def _not_device(found: Found, name: str) -> str | None:
    """Why `found` (what `name` resolved to) is not the device node `name`; None when it is.

    Why the name: a node's major and minor go into the spec and the container's device cgroup, so
    `uverbs0 -> /dev/mem` under the dev root (inside it) would hand out /dev/mem; a link may move a node
    (udev's do), not rename it."""
    if not stat.S_ISCHR(found.st.st_mode):
        return f"resolves to {found.path}, which is {kind_of(found.st.st_mode)}, not a character device"
    if found.name != name:
        return f"resolves to {found.path}, another name"
    return None


def _device_check(name: str) -> Check:
    return lambda found: _not_device(found, name)


def _node(found: Found, path: str, host_dev: str) -> dict[str, Any]:
    return {
        "path": path,
        "hostPath": host_path(host_dev, found.path),  # no link left for the runtime to follow
        "major": os.major(found.st.st_rdev),
        "minor": os.minor(found.st.st_rdev),
        "fileMode": stat.S_IMODE(found.st.st_mode),
        "permissions": "rwm",
    }


def device_node(path: str, r: Roots, *, dev_root: str | None = None, host_dev: str | None = None) -> dict[str, Any]:
    """A CDI deviceNode for `path` (container path), read from the real file resolved inside the dev root;
    CdiError when it is missing, leaves the dev root or is not a character device of that name."""
    root = r.dev if dev_root is None else dev_root
    seen = _here(root, path)
    try:
        found = resolve(root, path)
    except Missing as e:
        raise CdiError(f"CDI spec: device node {path} not found at {seen}: {e}") from e
    except Refused as e:
        raise CdiError(f"CDI spec: device node {path} at {seen}: {e}") from e
    why = _not_device(found, posixpath.basename(path))
    if why is not None:
        raise CdiError(f"CDI spec: {seen} is not a character device: {why}")
    return _node(found, path, r.host_dev if host_dev is None else host_dev)


def _present(root: str, path: str) -> bool:
    """Something is at `path` under `root`: a missing file is skipped, anything else is looked at."""
    try:
        resolve(root, path)
    except Missing:
        return False
    except Refused:
        return True
    return True


def _mount(r: Roots, container_path: str, source: str | None = None) -> dict[str, Any]:
    """`source`: the resolved path under the driver root (no symlink in it), mounted at `container_path`."""
    return {"hostPath": host_path(r.host_driver, source or container_path), "containerPath": container_path,
            "options": list(MOUNT_OPTIONS)}


def _accept(refused: Refusals, root: str, path: str, check: Check, *, within: Found | None = None,
            quiet_missing: bool = True) -> Found | None:
    """`path` resolved inside `root` (from `within`, already resolved, when given: `path` is then a name)
    when `check` finds nothing wrong with it; else None, and the reason recorded in `refused`.

    `quiet_missing`: a file that is simply not there is not worth a warning (nvcdi looks in many places);
    a name that a scan found but that leads nowhere is."""
    shown = _here(root, posixpath.join(within.path, path) if within is not None else path)
    try:
        found = resolve_entry(root, within, path) if within is not None else resolve(root, path)
    except Missing as e:
        # A link to nothing in the root's terms may well lead somewhere in the host's (an absolute target):
        # worth the warning even where absence is not. (The lstat is a diagnosis only: nothing is mounted.)
        dangling = os.path.islink(shown)
        if dangling or not quiet_missing:
            refused.add(shown, f"a symlink to nothing in the root ({e})" if dangling else str(e))
        return None
    except Refused as e:
        refused.add(shown, str(e))
        return None
    why = check(found)
    if why is not None:
        refused.add(shown, why)
        return None
    return found


def _not_regular(found: Found) -> str | None:
    if not stat.S_ISREG(found.st.st_mode):
        return f"resolves to {found.path}, which is {kind_of(found.st.st_mode)}"
    return None


def _is_dir(found: Found) -> str | None:
    return None if stat.S_ISDIR(found.st.st_mode) else f"resolves to {found.path}, not a directory"


def _library_check(lib_dirs: frozenset[str]) -> Check:
    """A driver library: a regular file named like a shared library in one of the library directories
    searched (or a vdpau/ in one).

    Why both rules: with the driver root `/` everything is inside the root, so `libescape.so.<version>
    -> /etc/shadow` is stopped only by where its target lives and what it is called. A driver's
    libraries live where the loader and nvcdi look, under shared-library names (on real installs the
    versioned files are regular files there; a link, e.g. Debian's into nvidia/current, stays there)."""
    def check(found: Found) -> str | None:
        parent = found.parent
        if (why := _not_regular(found)) is not None:
            return why
        if parent not in lib_dirs and not (posixpath.basename(parent) == "vdpau"
                                           and posixpath.dirname(parent) in lib_dirs):
            return f"resolves to {found.path}, outside the library directories"
        if not _SHARED_LIBRARY.search(found.name):
            return f"resolves to {found.path}, not named like a shared library"
        return None
    return check


def _firmware_check(firmware_dirs: Iterable[str]) -> Check:
    """GSP firmware: a regular *.bin under one of the firmware directories (where the driver puts its
    blobs; a link elsewhere is not firmware, whatever its name)."""
    prefixes = tuple(d.rstrip("/") + "/" for d in firmware_dirs)

    def check(found: Found) -> str | None:
        if (why := _not_regular(found)) is not None:
            return why
        if not found.path.startswith(prefixes):
            return f"resolves to {found.path}, outside the firmware directories"
        if not found.name.endswith(".bin"):
            return f"resolves to {found.path}, not named like firmware (*.bin)"
        return None
    return check


def _binary_check(name: str) -> Check:
    """A driver binary: a regular, executable file of the binary's own name. Why the name and not a
    directory: Debian's /usr/bin/nvidia-smi -> /etc/alternatives/... -> /usr/lib/nvidia/current/nvidia-smi
    keeps it; a link to /bin/sh, or to a file holding a secret, does not."""
    def check(found: Found) -> str | None:
        if (why := _not_regular(found)) is not None:
            return why
        if not found.st.st_mode & 0o111:
            return f"resolves to {found.path}, not executable"
        if found.name != name:
            return f"resolves to {found.path}, another name"
        return None
    return check


def _same_name_check(name: str, kind: Callable[[int], bool] | None = None) -> Check:
    """An IPC socket or directory (any kind: a socket is not a file to leak) or one of GDS's files
    (`kind`): a link may move it inside the root, not rename it (`socket -> /etc/shadow`)."""
    def check(found: Found) -> str | None:
        if found.name != name:
            return f"resolves to {found.path}, another name"
        if kind is not None and not kind(found.st.st_mode):
            return f"resolves to {found.path}, which is {kind_of(found.st.st_mode)}"
        return None
    return check


def _dirs(refused: Refusals, root: str, paths: Iterable[str]) -> dict[str, Found]:
    """Each of `paths` that resolves to a directory inside `root`, by its (normalised) container path."""
    out: dict[str, Found] = {}
    for p in paths:
        found = _accept(refused, root, p, _is_dir)
        if found is not None:
            out[posixpath.normpath(p)] = found
    return out


@dataclass(frozen=True)
class DriverFiles:
    """The driver's files nvcdi mounts, as container paths (the same path as under the driver root)."""

    version: str
    lib_dir: str
    libraries: tuple[str, ...]
    firmware: tuple[str, ...]
    binaries: tuple[str, ...]
    ipc: tuple[str, ...]
    # container path -> the path under the driver root it resolved to (no symlink left): what is mounted
    sources: Mapping[str, str]


def _scan(refused: Refusals, root: str, directory: Found, patterns: tuple[str, ...], budget: int, what: str,
          bound: int) -> list[str]:
    try:
        return matching_names(root, directory, patterns, budget)
    except OSError as e:  # the directory went away or became unreadable since it was resolved
        refused.add(_here(root, directory.path), e.strerror or str(e))
        return []
    except TooMany as e:
        raise CdiError(
            f"CDI spec: more than {bound} {what} ({', '.join(patterns)}) under the driver root {root!r}, the "
            f"last in {e.directory}: a driver installs far fewer, so this is not (only) a driver install; "
            "point the driver root at the driver (NVIDIA_DRIVER_ROOT, DRIVER_ROOT_CTR_PATH)") from e


def find_driver_files(r: Roots, version: str) -> DriverFiles:
    """Locates the driver's files of `version` under the driver root; CdiError names what is missing and
    where it looked (NVIDIA's plugin cannot start a CDI strategy without them either).

    Every file is resolved inside the driver root (driver_root.py: chroot semantics) and checked before
    it is named: libraries by _library_check, firmware by _firmware_check, binaries by _binary_check,
    IPC sockets by _same_name_check. One that fails is left out of the spec, with one warning line for
    all of them (a count and the first few): one stray link must not stop a node's GPUs being served,
    and CUDA does not need a file that is not the driver's.

    Bounds: more than MAX_LIBRARIES names matching the library patterns, or MAX_FIRMWARE firmware names,
    is a CdiError naming the bound (it stops the plugin-server, exit 78 with the cause recorded). Why not
    keep the first N with a warning: a directory is read in no particular order, so the first N would be
    an arbitrary part of the driver, perhaps without libcuda, and every GPU pod would fail in its own way
    later; a root with that many is a wrong driver root (or a hostile one), which the operator is better
    told at once, in one line."""
    if not version:
        raise CdiError("CDI spec: the driver version is unknown (NVML has not answered yet)")
    refused = Refusals()
    try:
        return _find_driver_files(r, version, refused)
    finally:
        if refused.count:
            log.warning("CDI spec: %d files under the driver root %s left out (not safe to mount): %s",
                        refused.count, r.driver, refused.summary())


def _find_driver_files(r: Roots, version: str, refused: Refusals) -> DriverFiles:
    root = r.driver
    lib_dirs = _dirs(refused, root, LIBRARY_DIRS)
    is_library = _library_check(frozenset(f.path for f in lib_dirs.values()))
    lib_dir = ""
    looked: list[str] = []
    for name in (f"libcuda.so.{version}", f"libnvidia-ml.so.{version}"):
        for d in LIBRARY_DIRS:
            looked.append(_here(root, posixpath.join(d, name)))
            where = lib_dirs.get(posixpath.normpath(d))
            if where is not None and _accept(refused, root, name, is_library, within=where) is not None:
                lib_dir = posixpath.normpath(d)
                break
        if lib_dir:
            break
    if not lib_dir:
        raise CdiError(
            f"CDI spec: the driver's libraries for driver {version} are missing: no libcuda.so.{version} or "
            f"libnvidia-ml.so.{version} under the driver root {root!r} (looked at {', '.join(looked)}); "
            "mount the host's driver root there (DRIVER_ROOT_CTR_PATH) or use the envvar strategy")
    sources: dict[str, str] = {}
    libs: list[str] = []
    scans: list[tuple[str, Found, tuple[str, ...]]] = [
        (lib_dir, lib_dirs[lib_dir], (f"*.so.{version}", "libnvidia-nvvm70.so.*"))]
    vdpau = _accept(refused, root, "vdpau", _is_dir, within=lib_dirs[lib_dir])
    if vdpau is not None:
        scans.append((posixpath.join(lib_dir, "vdpau"), vdpau, (f"*.so.{version}",)))
    budget = MAX_LIBRARIES
    for container_dir, directory, patterns in scans:
        names = _scan(refused, root, directory, patterns, budget, "files named like the driver's libraries",
                      MAX_LIBRARIES)
        budget -= len(names)
        for name in names:
            found = _accept(refused, root, name, is_library, within=directory, quiet_missing=False)
            if found is not None:
                libs.append(posixpath.join(container_dir, name))
                sources[libs[-1]] = found.path
    release = os.uname().release
    bases = [d.format(release=release) for d in FIRMWARE_DIRS]
    is_firmware = _firmware_check(f.path for f in _dirs(refused, root, bases).values())
    firmware: list[str] = []
    budget = MAX_FIRMWARE
    for base in bases:
        container_dir = posixpath.join(base, "nvidia", version)
        fw_dir = _accept(refused, root, container_dir, _is_dir)
        if fw_dir is None:
            continue
        names = _scan(refused, root, fw_dir, ("gsp*.bin",), budget, "GSP firmware files", MAX_FIRMWARE)
        budget -= len(names)
        for name in names:
            path = posixpath.join(container_dir, name)
            found = _accept(refused, root, name, is_firmware, within=fw_dir, quiet_missing=False)
            if found is not None and path not in sources:
                firmware.append(path)
                sources[path] = found.path
    binaries = []
    for name in BINARIES:
        is_binary = _binary_check(name)
        for d in BINARY_DIRS:
            found = _accept(refused, root, posixpath.join(d, name), is_binary)
            if found is not None:
                binaries.append(posixpath.join(d, name))
                sources[binaries[-1]] = found.path
                break
    ipc = []
    for p in IPC_PATHS:
        found = _accept(refused, root, p, _same_name_check(posixpath.basename(p)))
        if found is not None:
            ipc.append(p)
            sources[p] = found.path
    return DriverFiles(version, lib_dir, tuple(libs), tuple(firmware), tuple(binaries), tuple(ipc), sources)


def _hook(settings: Settings, name: str, *args: str) -> dict[str, Any]:
    # nvidia-ctk implements the hooks under its `hook` subcommand; nvidia-cdi-hook at the top level.
    base = posixpath.basename(settings.cdi_hook_path)
    fixed = [base, "hook"] if base == "nvidia-ctk" else [base]
    return {"hookName": "createContainer", "path": settings.cdi_hook_path, "args": [*fixed, name, *args],
            "env": ["NVIDIA_CTK_DEBUG=false"]}


def common_edits(settings: Settings, r: Roots, files: DriverFiles) -> dict[str, Any]:
    nodes = [device_node(p, r) for p in CONTROL_NODES if _present(r.dev, p)]
    mounts = [_mount(r, p, files.sources.get(p)) for p in (*files.libraries, *files.firmware, *files.binaries,
                                                             *files.ipc)]
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
    # nvcdi's "all" leaves MIG-enabled GPUs out (only their MIG devices are named): with the single and mixed
    # strategies nothing serves them whole. With none they are served whole, so they stay (NVIDIA's spec
    # lacks them there too, and a CDI allocation of one does not resolve).
    whole_mig_gpus = settings.mig_strategy == "none"
    out: list[dict[str, Any]] = []
    for d in devices:
        if d.kind == "gpu" and d.mig_enabled and not whole_mig_gpus:
            continue
        name = d.id if settings.device_id_strategy == "uuid" else d.index
        out.append({"name": name, "containerEdits": device_edits(d, gpus, r)})
    return {"cdiVersion": CDI_VERSION, "kind": CDI_KIND, "devices": out,
            "containerEdits": common_edits(settings, r, files)}


def device_edits(d: DeviceState, gpus: Mapping[str, DeviceState], r: Roots) -> dict[str, Any]:
    """One device's own containerEdits (the device plugin's spec and the dra-plugin's claim specs alike): a
    GPU's node; a MIG device's GPU node and its GPU and compute instance capability nodes. CdiError when a
    node is not there, or a MIG device's GPU is not known."""
    if d.kind == "mig":
        gpu = gpus.get(d.parent)
        if gpu is None:
            raise CdiError(f"CDI spec: MIG device {d.id} ({d.index}): its GPU {d.parent or '(none)'} is not known")
        paths = [f"/dev/nvidia{gpu.minor}"] + [f"/dev/nvidia-caps/nvidia-cap{c}" for c in d.caps]
    else:
        paths = [f"/dev/nvidia{d.minor}"]
    return {"deviceNodes": [device_node(p, r) for p in paths]}


def spec_key(devices: list[DeviceState], driver_version: str) -> tuple[Any, ...]:
    """What the spec depends on besides the files: unchanged key, unchanged spec (health flips are free)."""
    return (driver_version,
            tuple((d.id, d.kind, d.index, d.minor, d.parent, tuple(d.caps), d.mig_enabled) for d in devices))


def check_driver_files(settings: Settings) -> None:
    """At start, before NVML has answered: the control node and some driver library must be there."""
    r = roots(settings)
    problems = []
    ctl = _here(r.dev, "/dev/nvidiactl")
    if not os.path.exists(ctl):
        problems.append(f"missing {ctl}")
    libs = [_here(r.driver, posixpath.join(d, f"{n}.so.*")) for d in LIBRARY_DIRS for n in ("libcuda", "libnvidia-ml")]
    # A presence check: the first name found ends each directory's scan (find_driver_files checks the files).
    dirs = _dirs(Refusals(), r.driver, LIBRARY_DIRS).values()
    if not any(first_match(r.driver, d, ("libcuda.so.*", "libnvidia-ml.so.*")) for d in dirs):
        problems.append(f"no libcuda.so.* or libnvidia-ml.so.* under {r.driver} (looked in "
                        f"{', '.join(sorted({posixpath.dirname(p) for p in libs}))})")
    if problems:
        raise CdiError(
            f"device-list strategy {','.join(settings.device_list_strategy)} needs the NVIDIA driver under "
            f"the driver root {settings.driver_root!r} (seen here at {r.driver!r}, dev root {r.dev!r}): "
            + "; ".join(problems))


# -- GDRCopy, GDS, MOFED, IMEX: NVIDIA's additional CDI classes ---------------------------------

def _class_spec(cls: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cdiVersion": CDI_VERSION, "kind": f"{CDI_VENDOR}/{cls}", "devices": devices}


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.lstat(path).st_mode)
    except OSError:
        return False


def imex_channels(settings: Settings) -> tuple[str, ...]:
    """The IMEX channel IDs to hand out: those whose node exists; a required one that does not is fatal."""
    r = roots(settings)
    out = []
    for cid in settings.imex_channel_ids:
        path = f"{IMEX_CHANNEL_DIR}/channel{cid}"
        candidates = dict.fromkeys((_here(r.dev, path), path))
        # lstat: the runtime reads the node's numbers from hostPath, following a link there
        # (channel0 -> /dev/mem); the driver creates channels with mknod, never as links.
        if any(_is_char_device(c) for c in candidates):
            log.info("IMEX channel channel%d selected", cid)
            out.append(str(cid))
        elif settings.imex_required:
            raise CdiError(f"requested IMEX channel channel{cid} does not exist (looked at {', '.join(candidates)}; "
                           "imex.required / IMEX_REQUIRED is true)")
        else:
            log.warning("ignoring requested IMEX channel channel%d: no device node at %s", cid, ", ".join(candidates))
    return tuple(out)


def extra_specs(settings: Settings, channels: tuple[str, ...], gds_root: str = "/") -> dict[str, dict[str, Any]]:
    """Spec file name -> spec for the enabled GDRCopy, GDS, MOFED and IMEX classes; CdiError when one has no
    devices.

    `gds_root`: nvidia-fs nodes are always created at the host's /dev (internal/discover/gds.go)."""
    r = roots(settings)
    refused = Refusals()
    try:
        return _extra_specs(settings, r, channels, gds_root, refused)
    finally:
        if refused.count:
            log.warning("CDI spec: %d device nodes or files for GDRCopy/GDS/MOFED left out (not safe to use): %s",
                        refused.count, refused.summary())


def _device_nodes(refused: Refusals, root: str, directory: str, pattern: str, host_dev: str) -> list[dict[str, Any]]:
    """The device nodes in `directory` under the dev `root` whose names match `pattern`, each resolved inside
    the root and a character device of its own name; one that is not is left out (a glob catches what is
    there, not what NVIDIA's names promise). More than MAX_DEVICE_NODES matches is a CdiError, for the
    reason find_driver_files gives."""
    where = _accept(refused, root, directory, _is_dir)
    if where is None:
        return []
    try:
        names = matching_names(root, where, (pattern,), MAX_DEVICE_NODES)
    except OSError as e:
        refused.add(_here(root, directory), e.strerror or str(e))
        return []
    except TooMany as e:
        raise CdiError(f"CDI spec: more than {MAX_DEVICE_NODES} {pattern} device nodes in {e.directory}: "
                       "not a node's devices; check the dev root (NVIDIA_DEV_ROOT)") from e
    nodes = []
    for name in names:
        found = _accept(refused, root, name, _device_check(name), within=where, quiet_missing=False)
        if found is not None:
            nodes.append(_node(found, posixpath.join(directory, name), host_dev))
    return nodes


def _extra_specs(settings: Settings, r: Roots, channels: tuple[str, ...], gds_root: str,
                 refused: Refusals) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    if settings.gdrcopy_enabled:
        # The Operator sets GDRCOPY_ENABLED only where gdrdrv is loaded: a missing node is a broken node, as
        # for GDS and MOFED, not a class to leave out quietly (every GPU container names gdrcopy=all).
        found = _accept(refused, r.dev, GDRCOPY_NODE, _device_check(posixpath.basename(GDRCOPY_NODE)))
        if found is None:
            raise CdiError(f"gdrcopyEnabled with a CDI strategy: no {_here(r.dev, GDRCOPY_NODE)} character device "
                           "(is the gdrdrv module loaded?)")
        specs["gdrcopy"] = _class_spec("gdrcopy", [{"name": "all", "containerEdits": {
            "deviceNodes": [_node(found, GDRCOPY_NODE, r.host_dev)]}}])
    if settings.gds_enabled:
        gds = _device_nodes(refused, gds_root, "/dev", "nvidia-fs*", gds_root)
        if not gds:
            raise CdiError(f"gdsEnabled with a CDI strategy: no {_here(gds_root, '/dev/nvidia-fs*')} device nodes "
                           "(is nvidia-fs loaded?)")
        edits: dict[str, Any] = {"deviceNodes": gds}
        mounts = []
        for p, kind in GDS_MOUNTS.items():
            found = _accept(refused, r.driver, p, _same_name_check(posixpath.basename(p), kind))
            if found is not None:
                mounts.append(_mount(r, p, found.path))
        if mounts:
            edits["mounts"] = mounts
        specs["gds"] = _class_spec("gds", [{"name": "all", "containerEdits": edits}])
    if settings.mofed_enabled:
        nodes = _device_nodes(refused, r.dev, "/dev/infiniband", "uverbs*", r.host_dev)
        nodes += _device_nodes(refused, r.dev, "/dev/infiniband", "rdma_cm", r.host_dev)
        if not nodes:
            raise CdiError(f"mofedEnabled with a CDI strategy: no {_here(r.dev, '/dev/infiniband')}/uverbs* or "
                           "rdma_cm device nodes")
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
        replace_file(target, data, 0o644, sync_dir=True)  # the runtime reads it at any moment
    except OSError as e:
        raise CdiError(f"CDI spec {target}: cannot write: {e.strerror or e}") from e
    return target


def remove_spec(spec_dir: Path, name: str = SPEC_FILE) -> None:
    """Removes the spec written by `write_spec`; nothing to do if it is not there."""
    with contextlib.suppress(FileNotFoundError):
        (spec_dir / name).unlink()
