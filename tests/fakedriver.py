"""Fake driver roots for the CDI tests: real character device nodes (mknod; the tests run as root),
the driver's versioned libraries, GSP firmware, binaries and IPC sockets, laid out as a driver installs
them. What nvcdi would find on a node with that driver, so that the spec can be asserted whole."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

VERSION = "580.159.04"  # the recorded H200's driver
LIB_DIR = "/usr/lib/x86_64-linux-gnu"
NVIDIA_MAJOR = 195
UVM_MAJOR = 510
CAPS_MAJOR = 511
CONTROL = {"/dev/nvidiactl": (NVIDIA_MAJOR, 255), "/dev/nvidia-modeset": (NVIDIA_MAJOR, 254),
           "/dev/nvidia-uvm": (UVM_MAJOR, 0), "/dev/nvidia-uvm-tools": (UVM_MAJOR, 1)}
LIBRARIES = ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so", "libnvidia-nvvm.so")


def node(root: Path, path: str, major: int, minor: int, mode: int = 0o666) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(target, mode | stat.S_IFCHR, os.makedev(major, minor))
    os.chmod(target, mode)  # mknod's mode is cut by the umask


def file(root: Path, path: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"")
    os.chmod(target, mode)


def make_driver_root(root: Path, minors: Iterable[int], caps: Iterable[int] = (), *, devices: bool = True,
                     libraries: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if devices:
        for path, (major, minor) in CONTROL.items():
            node(root, path, major, minor)
        for m in minors:
            node(root, f"/dev/nvidia{m}", NVIDIA_MAJOR, m)
        for c in caps:
            node(root, f"/dev/nvidia-caps/nvidia-cap{c}", CAPS_MAJOR, c, 0o444)
    if libraries:
        for lib in LIBRARIES:
            file(root, f"{LIB_DIR}/{lib}.{VERSION}")
        (root / LIB_DIR.lstrip("/") / "libcuda.so.1").symlink_to(f"libcuda.so.{VERSION}")
        file(root, f"{LIB_DIR}/vdpau/libvdpau_nvidia.so.{VERSION}")
        file(root, f"{LIB_DIR}/libnvidia-ml.so.470.1")  # another driver's leftover: not mounted
        file(root, f"/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin")
        file(root, f"/lib/firmware/nvidia/{VERSION}/gsp_tu10x.bin")
        file(root, "/usr/bin/nvidia-smi", 0o755)
        file(root, "/usr/bin/nvidia-persistenced", 0o755)
        file(root, "/var/run/nvidia-persistenced/socket")
    return root
