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
from tests.fakedriver import VERSION, make_driver_root

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
    return resolve(environ={"DRIVER_ROOT_CTR_PATH": "/nonexistent-driver-root", **environ})


SAMPLE: dict[str, Any] = {"cdiVersion": "0.5.0", "kind": "k8s.device-plugin.nvidia.com/gpu",
                          "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}]}
H200 = _gpu("GPU-1f62f3ea-d20c-f470-47b7-8f5c74880cbb", 0, 0)  # the recorded H200 (common/nvml/fleets/h200.json)
OPTS = ["ro", "nosuid", "nodev", "rbind", "rprivate"]


def _node(host: str, path: str, major: int, minor: int, mode: int = 0o666) -> dict[str, Any]:
    return {"path": path, "hostPath": host + path, "major": major, "minor": minor, "fileMode": mode,
            "permissions": "rwm"}


def _hook(*args: str, path: str = "/usr/bin/nvidia-ctk") -> dict[str, Any]:
    fixed = ["nvidia-ctk", "hook"] if path.endswith("/nvidia-ctk") else [path.rsplit("/", 1)[1]]
    return {"hookName": "createContainer", "path": path, "args": [*fixed, *args], "env": ["NVIDIA_CTK_DEBUG=false"]}


def _common(host: str, hook: str = "/usr/bin/nvidia-ctk") -> dict[str, Any]:
    """What NVIDIA's nvcdi puts in the common edits for the fake driver root (tests/fakedriver.py)."""
    lib = "/usr/lib/x86_64-linux-gnu"
    mounted = [f"/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin", f"/lib/firmware/nvidia/{VERSION}/gsp_tu10x.bin",
               "/usr/bin/nvidia-persistenced", "/usr/bin/nvidia-smi", f"{lib}/libcuda.so.{VERSION}",
               f"{lib}/libnvidia-ml.so.{VERSION}", f"{lib}/libnvidia-nvvm.so.{VERSION}",
               f"{lib}/libnvidia-ptxjitcompiler.so.{VERSION}", f"{lib}/vdpau/libvdpau_nvidia.so.{VERSION}",
               "/var/run/nvidia-persistenced/socket"]
    return {
        "env": [f"NVIDIA_CTK_LIBCUDA_DIR={lib}", "NVIDIA_VISIBLE_DEVICES=void"],
        "deviceNodes": [_node(host, "/dev/nvidia-modeset", 195, 254), _node(host, "/dev/nvidia-uvm", 510, 0),
                        _node(host, "/dev/nvidia-uvm-tools", 510, 1), _node(host, "/dev/nvidiactl", 195, 255)],
        "hooks": [
            _hook("create-symlinks", "--link", f"libcuda.so.1::{lib}/libcuda.so", path=hook),
            _hook("enable-cuda-compat", f"--host-driver-version={VERSION}", path=hook),
            _hook("update-ldcache", "--folder", lib, "--folder", f"{lib}/vdpau", path=hook),
            _hook("disable-device-node-modification", path=hook),
            _hook("update-application-profile", path=hook),
        ],
        "mounts": [{"hostPath": host + p, "containerPath": p, "options": OPTS} for p in mounted],
    }


def _spec(devices: list[dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    return {"cdiVersion": "0.5.0", "kind": "k8s.device-plugin.nvidia.com/gpu", "devices": devices,
            "containerEdits": common}


def test_h200_plain_node(tmp_path: Path) -> None:
    root = make_driver_root(tmp_path / "driver", [0])
    spec = build_spec([H200], _settings(NVIDIA_DRIVER_ROOT=str(root)), VERSION)
    host = str(root)
    assert spec == _spec([{"name": H200.id, "containerEdits": {"deviceNodes": [_node(host, "/dev/nvidia0", 195, 0)]}}],
                         _common(host))
    assert json.loads(json.dumps(spec)) == spec


def test_h200_containerized_driver(tmp_path: Path) -> None:
    # The GPU Operator: the host's /run/nvidia/driver is mounted here at DRIVER_ROOT_CTR_PATH; files are read
    # here, named in the spec by their host paths.
    root = make_driver_root(tmp_path / "driver-root", [0])
    settings = _settings(NVIDIA_DRIVER_ROOT="/run/nvidia/driver", DRIVER_ROOT_CTR_PATH=str(root),
                         DEVICE_ID_STRATEGY="index", NVIDIA_CDI_HOOK_PATH="/usr/local/bin/nvidia-cdi-hook")
    host = "/run/nvidia/driver"
    assert build_spec([H200], settings, VERSION) == _spec(
        [{"name": "0", "containerEdits": {"deviceNodes": [_node(host, "/dev/nvidia0", 195, 0)]}}],
        _common(host, hook="/usr/local/bin/nvidia-cdi-hook"))


def test_driver_root_without_dev_uses_the_host_dev_root(tmp_path: Path) -> None:
    # NVIDIA's getDevRoot: a driver root without /dev means the device nodes are the host's (/).
    root = make_driver_root(tmp_path / "driver", [0], devices=False)
    with pytest.raises(CdiError, match=r"device node /dev/nvidia-modeset|device node /dev/nvidia0") as err:
        build_spec([H200], _settings(NVIDIA_DRIVER_ROOT=str(root)), VERSION)
    assert "at /dev/" in str(err.value)


def test_mig_and_replicas(tmp_path: Path) -> None:
    root = make_driver_root(tmp_path / "driver", [3, 7], [12, 13, 21, 22])
    spec = build_spec(DEVICES, _settings(NVIDIA_DRIVER_ROOT=str(root), DEVICE_ID_STRATEGY="index"), VERSION)
    host = str(root)
    gpu7 = _node(host, "/dev/nvidia7", 195, 7)
    caps = {c: _node(host, f"/dev/nvidia-caps/nvidia-cap{c}", 511, c, 0o444) for c in (12, 13, 21, 22)}
    # MIG strategy none: GPU 1 is served whole, so it is named (NVIDIA's nvcdi leaves it out even here).
    assert spec == _spec([
        {"name": "0", "containerEdits": {"deviceNodes": [_node(host, "/dev/nvidia3", 195, 3)]}},
        {"name": "1", "containerEdits": {"deviceNodes": [gpu7]}},
        {"name": "1:0", "containerEdits": {"deviceNodes": [gpu7, caps[12], caps[13]]}},
        {"name": "1:1", "containerEdits": {"deviceNodes": [gpu7, caps[21], caps[22]]}},
    ], _common(host))
    # Time-sliced replicas are named by their GPU (runtime_ids collapses them): the same spec serves them.
    config = tmp_path / "c.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
                      "      replicas: 4\n")
    replicated = build_spec(DEVICES, _settings(NVIDIA_DRIVER_ROOT=str(root), DEVICE_ID_STRATEGY="index",
                                               CONFIG_FILE=str(config)), VERSION)
    assert replicated == spec


@pytest.mark.parametrize("strategy", ["mixed", "single"])
def test_mig_enabled_gpus_are_left_out_where_only_their_mig_devices_are_served(tmp_path: Path, strategy: str) -> None:
    """nvcdi's "all" names a MIG-enabled GPU only through its MIG devices: with the mixed (and single) strategy
    the whole GPU is not served, and NVIDIA's spec does not list it. Its MIG devices keep its node."""
    root = make_driver_root(tmp_path / "driver", [3, 7], [12, 13, 21, 22])
    devices = DEVICES if strategy == "mixed" else DEVICES[1:]  # single: every GPU has MIG on
    spec = build_spec(devices, _settings(NVIDIA_DRIVER_ROOT=str(root), DEVICE_ID_STRATEGY="index",
                                         MIG_STRATEGY=strategy), VERSION)
    host = str(root)
    gpu7 = _node(host, "/dev/nvidia7", 195, 7)
    caps = {c: _node(host, f"/dev/nvidia-caps/nvidia-cap{c}", 511, c, 0o444) for c in (12, 13, 21, 22)}
    expected = [{"name": "0", "containerEdits": {"deviceNodes": [_node(host, "/dev/nvidia3", 195, 3)]}}] \
        if strategy == "mixed" else []
    expected += [{"name": "1:0", "containerEdits": {"deviceNodes": [gpu7, caps[12], caps[13]]}},
                 {"name": "1:1", "containerEdits": {"deviceNodes": [gpu7, caps[21], caps[22]]}}]
    assert spec == _spec(expected, _common(host))


def test_a_gpu_turning_mig_on_changes_the_spec_key() -> None:
    """Even before its first MIG device exists: the whole GPU leaves the spec (mixed, single)."""
    on = _gpu(G1, 1, 7, mig=True)
    assert cdi.spec_key([_gpu(G1, 1, 7)], VERSION) != cdi.spec_key([on], VERSION)


def test_missing_libraries_name_what_and_where(tmp_path: Path) -> None:
    root = make_driver_root(tmp_path / "driver", [0], libraries=False)
    with pytest.raises(CdiError) as err:
        build_spec([H200], _settings(NVIDIA_DRIVER_ROOT=str(root)), VERSION)
    message = str(err.value)
    assert f"no libcuda.so.{VERSION} or libnvidia-ml.so.{VERSION} under the driver root {str(root)!r}" in message
    assert f"{root}/usr/lib/x86_64-linux-gnu/libcuda.so.{VERSION}" in message


def test_library_of_another_driver_version_is_not_taken(tmp_path: Path) -> None:
    root = make_driver_root(tmp_path / "driver", [0])
    # libnvidia-ml.so.470.1 is a leftover (not in the expected mounts above); a version nothing has is missing
    with pytest.raises(CdiError, match=r"no libcuda\.so\.999\.1 or libnvidia-ml\.so\.999\.1"):
        build_spec([H200], _settings(NVIDIA_DRIVER_ROOT=str(root)), "999.1")
    assert build_spec([], _settings(NVIDIA_DRIVER_ROOT=str(root)), VERSION)["devices"] == []


def test_build_spec_mig_device_without_its_gpu_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CdiError, match=f"MIG device {M10} \\(1:0\\): its GPU {G1} is not known"):
        build_spec([DEVICES[0], DEVICES[2]], _settings(NVIDIA_DRIVER_ROOT=str(make_driver_root(
            tmp_path / "d", [3, 7], [12, 13]))), VERSION)


def test_cdi_error_is_fatal() -> None:
    assert issubclass(CdiError, FatalError)


# ---- write, replace, remove ----

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_spec_creates_the_directory_and_a_valid_file(tmp_path: Path) -> None:
    spec_dir = tmp_path / "var" / "run" / "cdi"
    spec = SAMPLE
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
    first = SAMPLE
    second = {**SAMPLE, "devices": []}
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
    first = SAMPLE
    path = write_spec(tmp_path, first)

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cdi.os, "replace", refuse)
    with pytest.raises(CdiError, match=f"CDI spec {path}: cannot write: No space left on device"):
        write_spec(tmp_path, SAMPLE)
    assert json.loads(path.read_text(encoding="utf-8")) == first
    assert os.listdir(tmp_path) == [SPEC_FILE]


def test_write_spec_into_a_file_is_a_cdi_error(tmp_path: Path) -> None:
    blocker = tmp_path / "cdi"
    blocker.write_text("not a directory", encoding="utf-8")
    with pytest.raises(CdiError, match=f"CDI spec {blocker / SPEC_FILE}: cannot write"):
        write_spec(blocker, SAMPLE)


def test_remove_spec(tmp_path: Path) -> None:
    other = tmp_path / "other-vendor.json"
    other.write_text("{}", encoding="utf-8")
    path = write_spec(tmp_path, SAMPLE)
    assert path.exists()
    remove_spec(tmp_path)
    assert not path.exists()
    assert other.read_text(encoding="utf-8") == "{}"
    remove_spec(tmp_path)  # nothing to remove: no error
    remove_spec(tmp_path / "missing-dir")
    assert sorted(os.listdir(tmp_path)) == ["other-vendor.json"]


# ---- driver files at start ----

@pytest.mark.parametrize("via", ["NVIDIA_DRIVER_ROOT", "DRIVER_ROOT_CTR_PATH"])
def test_check_driver_files_present(tmp_path: Path, via: str) -> None:
    root = make_driver_root(tmp_path / "driver", [0])
    check_driver_files(_settings(**{via: str(root)}))


def test_check_driver_files_missing_names_both(tmp_path: Path) -> None:
    root = tmp_path / "driver"
    (root / "dev").mkdir(parents=True)
    with pytest.raises(CdiError) as err:
        check_driver_files(_settings(NVIDIA_DRIVER_ROOT=str(root) + "/", DEVICE_LIST_STRATEGY="cdi-cri"))
    message = str(err.value)
    assert message.startswith("device-list strategy cdi-cri needs the NVIDIA driver under the driver root")
    assert f"missing {root}/dev/nvidiactl" in message
    assert f"no libcuda.so.* or libnvidia-ml.so.* under {root}" in message


def test_check_driver_files_looks_in_the_driver_roots_dev_whatever_the_dev_root(tmp_path: Path) -> None:
    # NVIDIA's getDevRoot: a driver root with a /dev holds the nodes; NVIDIA_DEV_ROOT does not move them
    # (it was read here before, against NVIDIA: tests/unit/test_cdi_roots.py has the scenarios).
    driver = make_driver_root(tmp_path / "driver", [0])
    empty = tmp_path / "dev-root"
    empty.mkdir()
    check_driver_files(_settings(NVIDIA_DRIVER_ROOT=str(driver), NVIDIA_DEV_ROOT=str(empty)))
    bare = make_driver_root(tmp_path / "bare", [0], devices=False)
    (bare / "dev").mkdir()
    with pytest.raises(CdiError, match=f"missing {bare}/dev/nvidiactl"):
        check_driver_files(_settings(NVIDIA_DRIVER_ROOT=str(bare), NVIDIA_DEV_ROOT=str(driver)))
