"""Which libnvidia-ml the real backend loads: under the driver root first, as NVIDIA's plugin does
(cmd/nvidia-device-plugin/root.go, tryResolveLibrary), else the container loader's choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack

from common.bus.codec import decode, encode
from common.bus.messages import HealthState
from common.nvml.real import LIBRARY, LibraryChoice, loaded_library_path, resolve_library
from tests.fakenvml import FAKE_DRIVER_VERSION, build_driver_root


def _lib(root: Path, directory: str) -> Path:
    d = root / directory.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "libnvidia-ml.so.580.1").write_bytes(b"")
    (d / "libnvidia-ml.so.1").symlink_to("libnvidia-ml.so.580.1")
    return d / "libnvidia-ml.so.580.1"


def test_found_under_the_root_with_the_symlink_resolved(tmp_path: Path) -> None:
    target = _lib(tmp_path / "driver", "/usr/lib64")
    choice = resolve_library([str(tmp_path / "driver")])
    assert choice.path == str(target)
    assert choice.searched == (str(tmp_path / "driver/usr/lib64/libnvidia-ml.so.1"),)


def test_search_order_is_nvidias(tmp_path: Path) -> None:
    root = tmp_path / "driver"
    _lib(root, "/lib64")
    wanted = _lib(root, "/usr/lib/aarch64-linux-gnu")
    assert resolve_library([str(root)]).path == str(wanted)


def test_container_root_before_driver_root(tmp_path: Path) -> None:
    ctr = _lib(tmp_path / "driver-root", "/usr/lib/x86_64-linux-gnu")
    _lib(tmp_path / "host", "/usr/lib/x86_64-linux-gnu")
    assert resolve_library([str(tmp_path / "driver-root"), str(tmp_path / "host")]).path == str(ctr)


def test_missing_container_root_falls_back_to_the_driver_root(tmp_path: Path) -> None:
    host = _lib(tmp_path / "host", "/glibc/lib")
    assert resolve_library([str(tmp_path / "absent"), str(tmp_path / "host")]).path == str(host)


def test_root_slash_or_nothing_found_leaves_it_to_the_loader(tmp_path: Path) -> None:
    assert resolve_library(["/"]) == LibraryChoice(LIBRARY, ())
    (tmp_path / "empty").mkdir()
    choice = resolve_library([str(tmp_path / "empty"), "/"])
    assert choice.path == LIBRARY
    assert len(choice.searched) == 7 and all(p.startswith(str(tmp_path / "empty")) for p in choice.searched)


def test_loaded_library_path_reads_the_mapping(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self/maps").write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /run/nvidia/driver/usr/lib64/libnvidia-ml.so.580.1\n")
    assert loaded_library_path(tmp_path) == "/run/nvidia/driver/usr/lib64/libnvidia-ml.so.580.1"
    (tmp_path / "self/maps").write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n")
    assert loaded_library_path(tmp_path) == ""


def _in_child(code: str, **env: str) -> dict[str, str]:
    # pynvml keeps the loaded library in a module global: each load gets a fresh interpreter.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, check=True)
    result: dict[str, str] = json.loads(out.stdout)
    return result


LOAD = """
import json
from common.nvml.factory import make_backend
from common.settings import resolve
nvml = make_backend(resolve(environ={"NVIDIA_DRIVER_ROOT": %r, "DRIVER_ROOT_CTR_PATH": %r}))
try:
    nvml.init()
    print(json.dumps({"library": nvml.library(), "version": nvml.system_get_driver_version(), "error": ""}))
except Exception as e:
    print(json.dumps({"library": nvml.library(), "version": "", "error": str(e)}))
"""


def test_real_backend_loads_the_driver_roots_library(tmp_path: Path) -> None:
    target = build_driver_root(tmp_path / "driver")
    got = _in_child(LOAD % (str(tmp_path / "driver"), "/nonexistent-driver-root"))
    assert got == {"library": str(target), "version": FAKE_DRIVER_VERSION, "error": ""}


def test_real_backend_loads_from_the_container_path_of_the_root(tmp_path: Path) -> None:
    # The GPU Operator's host root (/run/nvidia/driver) is mounted at NVIDIA's /driver-root here.
    target = build_driver_root(tmp_path / "driver-root", "usr/lib64")
    got = _in_child(LOAD % ("/run/nvidia/driver", str(tmp_path / "driver-root")))
    assert got == {"library": str(target), "version": FAKE_DRIVER_VERSION, "error": ""}


def test_not_found_names_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "driver").mkdir()
    got = _in_child(LOAD % (str(tmp_path / "driver"), "/nonexistent-driver-root"))
    if got["error"]:  # this machine has no driver: the message must say where we looked
        assert f"searched {tmp_path}/driver/usr/lib64/libnvidia-ml.so.1" in got["error"]
        assert "then the loader's path" in got["error"]
    else:  # a real driver on the loader's path: that is the fallback, and it says so
        assert got["library"].rsplit("/", 1)[-1].startswith("libnvidia-ml.so")


def test_health_state_without_the_library_field_still_decodes() -> None:
    topic, payload = encode(HealthState(incarnation="i", seq=1, sent_at=0.0, nvml_ok=True, error="",
                                        driver_version="580", nvml_library="/x/libnvidia-ml.so.580"))
    old = msgpack.unpackb(payload)
    del old["nvml_library"]  # what a monitor from before this field sends
    msg = decode(topic, msgpack.packb(old))
    assert isinstance(msg, HealthState) and msg.nvml_library == ""
    assert decode(topic, payload) == HealthState(incarnation="i", seq=1, sent_at=0.0, nvml_ok=True, error="",
                                                 driver_version="580", nvml_library="/x/libnvidia-ml.so.580")
