"""`mps-control-daemon`: NVIDIA's MPS control daemon command, as its chart and the GPU Operator run
it from the device plugin's image, in a DaemonSet of its own (nodes labelled
nvidia.com/mps.capable=true; privileged; the host's MPS root at /mps, its shm at /dev/shm).

    mps-control-daemon [--config-file F] [NVIDIA's flags]   the daemons of sharing.mps, until SIGTERM
    mps-control-daemon mount-shm                            the init container: a tmpfs at /mps/shm

The daemons are mps-control's (services.mps_control.control.Daemon, one implementation for both
layouts): per resource of sharing.mps, `nvidia-cuda-mps-control -d` with its pipe and log
directories at `/mps/<resource>/pipe|log`, the GPUs in EXCLUSIVE_PROCESS mode, each client's
pinned memory and thread share set, `/mps/<resource>/.started` and `/mps/.ready` written once
configured (what NVIDIA's plugin waits for), each daemon watched and restarted, all stopped on
SIGTERM (quit, compute mode DEFAULT, pipe directory and ready files removed) with exit 0. The
plugin's pod, run by the same chart as `nvidia-device-plugin`, runs none of its own and watches
these (common.mps).

The GPUs come from NVML, read once when MPS is first configured: no health-monitor runs in this
pod, and NVIDIA's reads them once per (re)start too. Without sharing.mps it waits, as NVIDIA's
does ("Waiting indefinitely"): a DaemonSet container that exits is restarted forever. The config
file is followed (and SIGHUP re-reads it, as NVIDIA's config-manager sidecar sends it): a daemon
whose GPUs or replicas change is replaced; unlike NVIDIA's restart of all of them, the others
keep running with their clients.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from common.bus.messages import HealthState
from common.lifecycle import EX_CONFIG, FatalError, remember_args, run_service
from common.logs import configure_logging
from common.mps import shm_dir
from common.settings import SPECS, Settings, SettingsError, add_arguments, resolve
from common.version import VersionAction

log = logging.getLogger(__name__)

NAME = "mps-control-daemon"
# The setting's own environment name (not a copy of it): the init container's only input.
CONTAINER_ROOT_ENV = next(spec.env or "" for spec in SPECS if spec.name == "mps_container_root")
# NVIDIA's mount of the shm (cmd/mps-control-daemon/mount): 64 MiB, no devices, setuid or exec.
SHM_OPTIONS = "rw,nosuid,nodev,noexec,relatime,size=65536k"
MAX_UNMOUNTS = 8
MOUNT_TIMEOUT_S = 30.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=NAME, description="NVIDIA's MPS control daemon command: runs the MPS control "
                                                       "daemons of sharing.mps until SIGTERM")
    p.add_argument("--version", action=VersionAction)
    add_arguments(p)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("mount-shm", help=f"mount a tmpfs ({SHM_OPTIONS}) at <MPS root>/shm for the daemons "
                                     "(NVIDIA's init container; needs privileges)")
    return p


class NvmlDevices:
    """This node's GPUs from NVML, read when first needed (services.mps_control.control.Devices)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._read = False

    async def next(self, timeout: float, needed: bool) -> HealthState | None:
        if needed and not self._read:
            self._read = True
            return await asyncio.to_thread(self._discover)
        await asyncio.sleep(timeout)  # the caller's tick: GPUs do not come and go under a running pod
        return None

    def _discover(self) -> HealthState:
        from common.nvml.backend import NvmlError
        from common.nvml.factory import make_backend
        from services.health_monitor.discovery import discover

        backend = make_backend(self._settings)
        try:
            backend.init()
        except NvmlError as e:
            # As NVIDIA's: the container ends and the kubelet starts it again, with its backoff.
            raise FatalError(f"NVML cannot be initialised ({e}): the GPUs for sharing.mps are unknown") from None
        try:
            library, driver = backend.library(), backend.system_get_driver_version()
            inv = discover(backend, time.time(), self._settings.probe_deadline)
        finally:
            backend.shutdown()
        gpus = [d for d in inv.devices if d.kind == "gpu"]
        log.info("NVML (%s, driver %s): %d GPUs", library, driver, len(gpus))
        return HealthState(nvml_ok=True, error="; ".join(inv.unreadable), driver_version=driver, devices=inv.devices,
                           nvml_library=library)

    def close(self) -> None:
        pass  # NVML is shut down after each read


async def _main(settings: Settings, stop: asyncio.Event) -> None:
    from services.mps_control.service import serve

    if settings.sharing.mps is None:
        log.info("sharing.mps is not configured: waiting for a config with it (or SIGTERM), as NVIDIA's does")
    await serve(settings, stop, NvmlDevices(settings), external=False)


# -- mount-shm ------------------------------------------------------------------------------

class MountError(RuntimeError):
    pass


Runner = Callable[[list[str]], None]


def run_tool(argv: list[str]) -> None:
    """Runs mount or umount; MountError with what it said when it fails."""
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MountError(f"{' '.join(argv)}: {e}") from None
    if out.returncode != 0:
        said = (out.stderr or out.stdout).strip() or f"exit status {out.returncode}"
        raise MountError(f"{' '.join(argv)}: {said}")


def _unescape(field: str) -> str:
    # mountinfo writes a space, tab, newline and backslash in a path as octal escapes (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mount_point(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether something is mounted at `path`, from the mount table: os.path.ismount compares
    devices, and so misses a bind mount of the same filesystem (k8s mount-utils' extensive check)."""
    try:
        target = os.path.realpath(path, strict=True)
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            return any(len(fields) > 4 and _unescape(fields[4]) == target for fields in map(str.split, f))
    except OSError:
        return False


def mount_shm(root: str, run: Runner = run_tool, mounted: Callable[[str], bool] = is_mount_point) -> str:
    """NVIDIA's `mount-shm`: a fresh tmpfs at `<root>/shm`, where the daemons and their clients share
    memory (the daemon's container and every MPS workload have it as /dev/shm). Returns the path.

    What an earlier run of the init container mounted there is unmounted first: a pod re-created on
    the node would otherwise stack one tmpfs more on the host each time. A plain directory found
    there is kept and mounted over (NVIDIA's removes it, and fails when it is not empty)."""
    shm = shm_dir(root)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None:
        raise MountError("cannot find the 'mount' executable on PATH")
    for _ in range(MAX_UNMOUNTS):
        if not mounted(shm):
            break
        if umount is None:
            raise MountError(f"{shm} is mounted and the 'umount' executable is not on PATH")
        log.info("unmounting the earlier %s", shm)
        run([umount, shm])
    if mounted(shm):
        raise MountError(f"{shm} is still mounted after {MAX_UNMOUNTS} unmounts")
    os.makedirs(shm, 0o755, exist_ok=True)
    run([mount, "-t", "tmpfs", "-o", SHM_OPTIONS, "shm", shm])
    return shm


def _mount_shm_command() -> int:
    configure_logging(NAME, "info", f"{NAME} mount-shm: %(message)s")
    # Only where the MPS root is: the init container has no config (nor needs one) and NVIDIA's is /mps.
    given = {CONTAINER_ROOT_ENV: os.environ[CONTAINER_ROOT_ENV]} if CONTAINER_ROOT_ENV in os.environ else {}
    try:
        root = resolve(environ=given).mps_container_root
        shm = mount_shm(root)
    except (SettingsError, MountError, OSError) as e:
        print(f"{NAME} mount-shm: error: {e}", file=sys.stderr)
        return 1
    log.info("tmpfs (%s) mounted at %s", SHM_OPTIONS, shm)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "mount-shm":
        return _mount_shm_command()
    try:
        settings = resolve(args)
    except SettingsError as e:
        print(f"{NAME}: cannot start: {e}", file=sys.stderr)
        return 1
    remember_args(args)
    from common.watchdog import watched

    rc = run_service(NAME, watched(NAME, _main), settings)
    # A container of its own, not a program of our supervisord: NVIDIA's exits 1 on any error (the
    # cause is the last line either way), and 78 means nothing to the kubelet.
    return 1 if rc == EX_CONFIG else rc


if __name__ == "__main__":
    sys.exit(main())
