"""The CDI spec for the cdi-annotations and cdi-cri device-list strategies.

Why: with a CDI strategy the Allocate answer names devices only
(`k8s.device-plugin.nvidia.com/gpu=<id>`); the container runtime resolves those names
through a spec file in its CDI directory. NVIDIA's plugin writes that file at start
(`/var/run/cdi/k8s.device-plugin.nvidia.com-gpu.json`, cdiVersion 0.5.0), one device per
GPU and per MIG device named by its ID under the device-ID strategy, and removes it when
it exits; we write the same names so pods and runtimes configured for NVIDIA's plugin
keep working.

Why atomic: runtimes watch the CDI directory and re-read a spec as soon as it changes. A
half-written file would make every CDI device of this kind unresolvable (the pod fails to
start), so the spec is written to a temporary file in the same directory (a name the
runtime ignores), fsynced, and renamed over the old one.

Why check the driver files: NVIDIA's plugin refuses to start a CDI strategy without the
driver under the driver root; a spec pointing at device nodes that do not exist would
only fail later, in every pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from common.bus.messages import DeviceState
from common.lifecycle import PermanentError
from common.settings import Settings
from services.plugin_server.allocation import CDI_KIND, host_path

CDI_VERSION = "0.5.0"
SPEC_FILE = "k8s.device-plugin.nvidia.com-gpu.json"
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
REQUIRED_DRIVER_FILES = ("/dev/nvidiactl",)


class CdiError(PermanentError):
    """The CDI spec cannot be made or written: a CDI strategy cannot be served."""


def _node(path: str, dev_root: str) -> dict[str, str]:
    return {"path": path, "hostPath": host_path(dev_root, path)}


def build_spec(devices: list[DeviceState], settings: Settings) -> dict[str, Any]:
    """The spec NVIDIA's plugin writes, reduced to device nodes: every GPU and MIG device in `devices`."""
    dev_root = settings.dev_root
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
        out.append({"name": name, "containerEdits": {"deviceNodes": [_node(p, dev_root) for p in paths]}})
    return {
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": out,
        "containerEdits": {"deviceNodes": [_node(p, dev_root) for p in CONTROL_NODES]},
    }


def check_driver_files(settings: Settings) -> None:
    """Raises CdiError naming the driver files missing under the dev root."""
    missing = [host_path(settings.dev_root, p) for p in REQUIRED_DRIVER_FILES]
    missing = [p for p in missing if not os.path.exists(p)]
    if missing:
        raise CdiError(
            f"device-list strategy {','.join(settings.device_list_strategy)} needs the NVIDIA driver under "
            f"the dev root {settings.dev_root!r} (driver root {settings.driver_root!r}): missing {', '.join(missing)}"
        )


def write_spec(spec_dir: Path, spec: dict[str, Any]) -> Path:
    """Writes `spec` to <spec_dir>/k8s.device-plugin.nvidia.com-gpu.json atomically, mode 0644.

    Raises CdiError (naming the path and the reason) when the directory cannot be written.
    """
    target = spec_dir / SPEC_FILE
    data = json.dumps(spec, indent=2).encode() + b"\n"
    try:
        spec_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=spec_dir, prefix=f".{SPEC_FILE}.", suffix=".tmp")
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


def remove_spec(spec_dir: Path) -> None:
    """Removes the spec written by `write_spec`; nothing to do if it is not there."""
    with contextlib.suppress(FileNotFoundError):
        (spec_dir / SPEC_FILE).unlink()
