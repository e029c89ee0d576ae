"""A fake libnvidia-ml.so.1 (no GPUs), compiled into a temporary driver root for the library-path tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("fakenvml.c")
FAKE_DRIVER_VERSION = "580.159.04"


def build_driver_root(root: Path, lib_dir: str = "usr/lib/x86_64-linux-gnu") -> Path:
    """<root>/<lib_dir>/libnvidia-ml.so.<version> plus the .so.1 symlink, as a driver installs it.

    Returns the versioned file (what the symlink resolves to)."""
    directory = root / lib_dir
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"libnvidia-ml.so.{FAKE_DRIVER_VERSION}"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(target), f'-DFAKE_DRIVER_VERSION="{FAKE_DRIVER_VERSION}"',
                    str(SOURCE)], check=True)
    (directory / "libnvidia-ml.so.1").symlink_to(target.name)
    return target
