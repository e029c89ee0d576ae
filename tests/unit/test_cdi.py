"""The CDI spec: its content per device-ID strategy and dev root, the atomic write, removal,
and the driver-files check at start."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HEALTHY, DeviceState
from common.lifecycle import FatalError
from common.settings import Settings, resolve
from services.plugin_server import cdi
from services.plugin_server.cdi import CdiError, build_spec, check_driver_files, remove_spec, write_spec

G0 = "GPU-aaaaaaaa-0000-4000-8000-000000000000"
G1 = "GPU-bbbbbbbb-1111-4111-8111-111111111111"
M10 = "MIG-dddddddd-1010-4010-8010-101010101010"
M11 = "MIG-eeeeeeee-1111-4111-8111-111111111111"
SPEC_FILE = "k8s.device-plugin.nvidia.com-gpu.json"


def _gpu(uuid: str, index: int, minor: int, mig: bool = False) -> DeviceState:
    return DeviceState(id=uuid, kind="gpu", index=str(index), name="NVIDIA H100 80GB HBM3", health=HEALTHY,
                       reason="", since=0.0, minor=minor, mig_enabled=mig)


def _mig(uuid: str, gpu: str, index: str, caps: list[int]) -> DeviceState:
    return DeviceState(id=uuid, kind="mig", index=index, name="MIG 1g.10gb", health=HEALTHY, reason="", since=0.0,
                       parent=gpu, profile="1g.10gb", caps=caps)


# GPU 1 has MIG on; its MIG devices follow it, as the health-monitor lists them.
DEVICES = [_gpu(G0, 0, 3), _gpu(G1, 1, 7, mig=True), _mig(M10, G1, "1:0", [12, 13]), _mig(M11, G1, "1:1", [21, 22])]


def _settings(**environ: str) -> Settings:
    return resolve(environ=environ)


def _nodes(root: str, *paths: str) -> dict[str, Any]:
    return {"deviceNodes": [{"path": p, "hostPath": root + p} for p in paths]}


def _expected(names: list[str], root: str) -> dict[str, Any]:
    return {
        "cdiVersion": "0.5.0",
        "kind": "k8s.device-plugin.nvidia.com/gpu",
        "devices": [
            {"name": names[0], "containerEdits": _nodes(root, "/dev/nvidia3")},
            {"name": names[1], "containerEdits": _nodes(root, "/dev/nvidia7")},
            {"name": names[2], "containerEdits": _nodes(root, "/dev/nvidia7", "/dev/nvidia-caps/nvidia-cap12",
                                                         "/dev/nvidia-caps/nvidia-cap13")},
            {"name": names[3], "containerEdits": _nodes(root, "/dev/nvidia7", "/dev/nvidia-caps/nvidia-cap21",
                                                         "/dev/nvidia-caps/nvidia-cap22")},
        ],
        "containerEdits": _nodes(root, "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"),
    }


SPECS: list[tuple[str, dict[str, str], dict[str, Any]]] = [
    ("uuid-root", {}, _expected([G0, G1, M10, M11], "")),
    ("index-root", {"DEVICE_ID_STRATEGY": "index"}, _expected(["0", "1", "1:0", "1:1"], "")),
    ("uuid-driver-root", {"NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"},
     _expected([G0, G1, M10, M11], "/run/nvidia/driver")),
    ("index-dev-root-over-driver-root", {"DEVICE_ID_STRATEGY": "index", "NVIDIA_DRIVER_ROOT": "/driver",
                                         "NVIDIA_DEV_ROOT": "/host/"},
     _expected(["0", "1", "1:0", "1:1"], "/host")),
]


@pytest.mark.parametrize(("environ", "expected"), [s[1:] for s in SPECS], ids=[s[0] for s in SPECS])
def test_build_spec(environ: dict[str, str], expected: dict[str, Any]) -> None:
    spec = build_spec(DEVICES, _settings(**environ))
    assert spec == expected
    assert json.loads(json.dumps(spec)) == expected


def test_build_spec_no_devices_keeps_the_control_nodes() -> None:
    assert build_spec([], _settings()) == {
        "cdiVersion": "0.5.0",
        "kind": "k8s.device-plugin.nvidia.com/gpu",
        "devices": [],
        "containerEdits": _nodes("", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"),
    }


def test_build_spec_mig_device_without_its_gpu_is_an_error() -> None:
    with pytest.raises(CdiError, match=f"MIG device {M10} \\(1:0\\): its GPU {G1} is not known"):
        build_spec([DEVICES[0], DEVICES[2]], _settings())


def test_cdi_error_is_fatal() -> None:
    assert issubclass(CdiError, FatalError)


# ---- write, replace, remove ----

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_spec_creates_the_directory_and_a_valid_file(tmp_path: Path) -> None:
    spec_dir = tmp_path / "var" / "run" / "cdi"
    spec = build_spec(DEVICES, _settings())
    old_umask = os.umask(0o077)  # the file mode must not depend on the umask
    try:
        path = write_spec(spec_dir, spec)
    finally:
        os.umask(old_umask)
    assert path == spec_dir / SPEC_FILE
    assert json.loads(path.read_text(encoding="utf-8")) == spec
    assert _mode(path) == 0o644
    assert os.listdir(spec_dir) == [SPEC_FILE]


def test_write_spec_replaces_the_file_atomically(tmp_path: Path) -> None:
    first = build_spec(DEVICES[:1], _settings())
    second = build_spec(DEVICES, _settings(DEVICE_ID_STRATEGY="index"))
    path = write_spec(tmp_path, first)
    inode = path.stat().st_ino
    with open(path, encoding="utf-8") as reader:  # a reader holding the old file keeps reading it whole
        assert write_spec(tmp_path, second) == path
        assert json.load(reader) == first
    assert path.stat().st_ino != inode  # a new file renamed over, not the old one rewritten in place
    assert json.loads(path.read_text(encoding="utf-8")) == second
    assert _mode(path) == 0o644
    assert os.listdir(tmp_path) == [SPEC_FILE]


def test_write_spec_failure_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_spec(DEVICES[:1], _settings())
    path = write_spec(tmp_path, first)

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cdi.os, "replace", refuse)
    with pytest.raises(CdiError, match=f"CDI spec {path}: cannot write: No space left on device"):
        write_spec(tmp_path, build_spec(DEVICES, _settings()))
    assert json.loads(path.read_text(encoding="utf-8")) == first
    assert os.listdir(tmp_path) == [SPEC_FILE]


def test_write_spec_into_a_file_is_a_cdi_error(tmp_path: Path) -> None:
    blocker = tmp_path / "cdi"
    blocker.write_text("not a directory", encoding="utf-8")
    with pytest.raises(CdiError, match=f"CDI spec {blocker / SPEC_FILE}: cannot write"):
        write_spec(blocker, build_spec([], _settings()))


def test_remove_spec(tmp_path: Path) -> None:
    other = tmp_path / "other-vendor.json"
    other.write_text("{}", encoding="utf-8")
    path = write_spec(tmp_path, build_spec(DEVICES, _settings()))
    assert path.exists()
    remove_spec(tmp_path)
    assert not path.exists()
    assert other.read_text(encoding="utf-8") == "{}"
    remove_spec(tmp_path)  # nothing to remove: no error
    remove_spec(tmp_path / "missing-dir")
    assert sorted(os.listdir(tmp_path)) == ["other-vendor.json"]


# ---- driver files ----

def _fake_root(tmp_path: Path, *files: str) -> Path:
    root = tmp_path / "driver"
    for f in files:
        (root / f.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / f.lstrip("/")).write_bytes(b"")
    root.mkdir(exist_ok=True)
    return root


@pytest.mark.parametrize("via", ["NVIDIA_DRIVER_ROOT", "NVIDIA_DEV_ROOT"])
def test_check_driver_files_present(tmp_path: Path, via: str) -> None:
    root = _fake_root(tmp_path, "/dev/nvidiactl")
    check_driver_files(_settings(**{via: str(root)}))


@pytest.mark.parametrize("via", ["NVIDIA_DRIVER_ROOT", "NVIDIA_DEV_ROOT"])
def test_check_driver_files_missing(tmp_path: Path, via: str) -> None:
    root = _fake_root(tmp_path, "/dev/nvidia0", "/dev/nvidia-uvm")
    settings = _settings(**{via: str(root) + "/", "DEVICE_LIST_STRATEGY": "cdi-cri"})
    with pytest.raises(CdiError) as err:
        check_driver_files(settings)
    message = str(err.value)
    assert message.endswith(f"missing {root}/dev/nvidiactl")
    assert message.startswith("device-list strategy cdi-cri needs the NVIDIA driver under the dev root")


def test_check_driver_files_dev_root_wins_over_driver_root(tmp_path: Path) -> None:
    driver = _fake_root(tmp_path, "/dev/nvidiactl")
    empty = tmp_path / "dev-root"
    empty.mkdir()
    with pytest.raises(CdiError, match=f"missing {empty}/dev/nvidiactl"):
        check_driver_files(_settings(NVIDIA_DRIVER_ROOT=str(driver), NVIDIA_DEV_ROOT=str(empty)))
