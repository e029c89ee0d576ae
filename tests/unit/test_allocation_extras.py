"""GDRCopy, GDS, MOFED and IMEX channels in Allocate, as NVIDIA's plugin adds them per strategy
(internal/plugin/server.go getAllocateResponse / updateResponseForCDI), and their CDI specs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HEALTHY, DeviceState
from common.lifecycle import FatalError
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import resolve
from services.plugin_server.allocation import Extras, container_response
from services.plugin_server.cdi import CdiError, extra_specs, imex_channels
from services.plugin_server.device_table import PluginDevice
from tests.fakedriver import node

G0 = "GPU-0b5c1d2e-0000-4000-8000-000000000000"
DEV = DeviceState(id=G0, kind="gpu", index="0", name="H200", health=HEALTHY, reason="", since=0.0, minor=0)
DEVICES = {G0: PluginDevice(G0, HEALTHY, None, DEV)}
ALL = Extras(gds=True, mofed=True, imex_channels=("0",))


def _answer(extras: Extras, **environ: str) -> pb.ContainerAllocateResponse:
    return container_response("nvidia.com/gpu", [G0], DEVICES, resolve(environ=environ),
                              annotation_id=lambda: "u", extras=extras)


def test_envvar() -> None:
    resp = _answer(ALL)
    assert dict(resp.envs) == {"NVIDIA_VISIBLE_DEVICES": G0, "NVIDIA_IMEX_CHANNELS": "0",
                               "NVIDIA_GDS": "enabled", "NVIDIA_MOFED": "enabled"}


def test_volume_mounts_and_device_specs() -> None:
    resp = _answer(ALL, DEVICE_LIST_STRATEGY="volume-mounts", PASS_DEVICE_SPECS="true",
                   NVIDIA_DRIVER_ROOT="/run/nvidia/driver")
    assert dict(resp.envs) == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices",
                               "NVIDIA_GDS": "enabled", "NVIDIA_MOFED": "enabled"}
    assert [(m.container_path, m.host_path) for m in resp.mounts] == [
        (f"/var/run/nvidia-container-devices/{G0}", "/dev/null"),
        ("/var/run/nvidia-container-devices/imex/0", "/dev/null")]
    assert [(d.container_path, d.host_path, d.permissions) for d in resp.devices] == [
        ("/dev/nvidia0", "/run/nvidia/driver/dev/nvidia0", "rw"),
        ("/dev/nvidia-caps-imex-channels/channel0", "/run/nvidia/driver/dev/nvidia-caps-imex-channels/channel0", "rw")]


def test_cdi_names_the_extra_classes_and_nothing_else() -> None:
    resp = _answer(ALL, DEVICE_LIST_STRATEGY="cdi-annotations,cdi-cri")
    names = [f"k8s.device-plugin.nvidia.com/gpu={G0}", "k8s.device-plugin.nvidia.com/imex-channel=0",
             "k8s.device-plugin.nvidia.com/gds=all", "k8s.device-plugin.nvidia.com/mofed=all"]
    assert [c.name for c in resp.cdi_devices] == names
    assert dict(resp.annotations) == {"cdi.k8s.io/nvidia-device-plugin_u": ",".join(names)}
    assert not resp.envs and not resp.mounts and not resp.devices


def test_no_extras_no_change() -> None:
    assert dict(_answer(Extras()).envs) == {"NVIDIA_VISIBLE_DEVICES": G0}


def test_imex_channel_found_missing_or_required(tmp_path: Path) -> None:
    root = tmp_path / "driver"
    (root / "dev").mkdir(parents=True)
    env = {"NVIDIA_DRIVER_ROOT": str(root), "DRIVER_ROOT_CTR_PATH": "/nonexistent", "IMEX_CHANNEL_IDS": "0"}
    assert imex_channels(resolve(environ=env)) == ()  # not there, not required: skipped
    with pytest.raises(CdiError, match="requested IMEX channel channel0 does not exist") as err:
        imex_channels(resolve(environ={**env, "IMEX_REQUIRED": "true"}))
    assert isinstance(err.value, FatalError)
    node(root, "/dev/nvidia-caps-imex-channels/channel0", 234, 0)
    assert imex_channels(resolve(environ={**env, "IMEX_REQUIRED": "true"})) == ("0",)


def test_an_imex_channel_that_is_a_symlink_is_not_handed_out(tmp_path: Path) -> None:
    """The runtime reads a node's numbers from hostPath, following a link: channel0 -> /dev/null
    (or /dev/mem) would have given every GPU container that device."""
    root = tmp_path / "driver"
    (root / "dev/nvidia-caps-imex-channels").mkdir(parents=True)
    (root / "dev/nvidia-caps-imex-channels/channel0").symlink_to("/dev/null")
    env = {"NVIDIA_DRIVER_ROOT": str(root), "DRIVER_ROOT_CTR_PATH": "/nonexistent", "IMEX_CHANNEL_IDS": "0"}
    assert imex_channels(resolve(environ=env)) == ()
    with pytest.raises(CdiError, match="requested IMEX channel channel0 does not exist"):
        imex_channels(resolve(environ={**env, "IMEX_REQUIRED": "true"}))


def test_extra_specs(tmp_path: Path) -> None:
    root = tmp_path / "driver"
    node(root, "/dev/infiniband/uverbs0", 231, 192)
    node(root, "/dev/infiniband/rdma_cm", 10, 58)
    gds_root = tmp_path / "host"
    node(gds_root, "/dev/nvidia-fs0", 240, 0)
    (root / "etc").mkdir()
    (root / "etc/cufile.json").write_text("{}")
    env = {"NVIDIA_DRIVER_ROOT": str(root), "DRIVER_ROOT_CTR_PATH": "/nonexistent", "GDS_ENABLED": "true",
           "MOFED_ENABLED": "true"}
    specs = extra_specs(resolve(environ=env), ("0",), gds_root=str(gds_root))

    def n(host: str, path: str, major: int, minor: int) -> dict[str, Any]:
        return {"path": path, "hostPath": host + path, "major": major, "minor": minor, "fileMode": 0o666,
                "permissions": "rwm"}

    assert specs == {
        "k8s.device-plugin.nvidia.com-gds.json": {
            "cdiVersion": "0.5.0", "kind": "k8s.device-plugin.nvidia.com/gds", "devices": [{"name": "all",
            "containerEdits": {"deviceNodes": [n(str(gds_root), "/dev/nvidia-fs0", 240, 0)],
                               "mounts": [{"hostPath": f"{root}/etc/cufile.json", "containerPath": "/etc/cufile.json",
                                           "options": ["ro", "nosuid", "nodev", "rbind", "rprivate"]}]}}]},
        "k8s.device-plugin.nvidia.com-mofed.json": {
            "cdiVersion": "0.5.0", "kind": "k8s.device-plugin.nvidia.com/mofed", "devices": [{"name": "all",
            "containerEdits": {"deviceNodes": [n(str(root), "/dev/infiniband/uverbs0", 231, 192),
                                               n(str(root), "/dev/infiniband/rdma_cm", 10, 58)]}}]},
        "k8s.device-plugin.nvidia.com-imex-channel.json": {
            "cdiVersion": "0.5.0", "kind": "k8s.device-plugin.nvidia.com/imex-channel", "devices": [{"name": "0",
            "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia-caps-imex-channels/channel0",
                                                "hostPath": f"{root}/dev/nvidia-caps-imex-channels/channel0"}]}}]},
    }


def test_extra_specs_without_devices_refuse(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    env = {"NVIDIA_DRIVER_ROOT": str(tmp_path), "DRIVER_ROOT_CTR_PATH": "/nonexistent"}
    with pytest.raises(CdiError, match=r"gdsEnabled with a CDI strategy: no .*/dev/nvidia-fs\* device nodes"):
        extra_specs(resolve(environ={**env, "GDS_ENABLED": "true"}), (), gds_root=str(tmp_path))
    with pytest.raises(CdiError, match="mofedEnabled with a CDI strategy: no"):
        extra_specs(resolve(environ={**env, "MOFED_ENABLED": "true"}), ())
    assert extra_specs(resolve(environ=env), ()) == {}


# ---- GDRCopy: what the GPU Operator turns on wherever the gdrdrv module is loaded ----

def test_gdrcopy_envvar_and_volume_mounts() -> None:
    for strategy in ("envvar", "volume-mounts", "envvar,cdi-cri"):
        resp = _answer(Extras(gdrcopy=True), DEVICE_LIST_STRATEGY=strategy)
        assert resp.envs["NVIDIA_GDRCOPY"] == "enabled", strategy
    assert "NVIDIA_GDRCOPY" not in _answer(Extras()).envs


def test_gdrcopy_cdi_name_in_nvidias_order() -> None:
    """NVIDIA's AdditionalDevices: the IMEX channels, then gdrcopy, gds, mofed (modes in that order)."""
    resp = _answer(dataclasses.replace(ALL, gdrcopy=True), DEVICE_LIST_STRATEGY="cdi-annotations,cdi-cri")
    names = [f"k8s.device-plugin.nvidia.com/gpu={G0}", "k8s.device-plugin.nvidia.com/imex-channel=0",
             "k8s.device-plugin.nvidia.com/gdrcopy=all", "k8s.device-plugin.nvidia.com/gds=all",
             "k8s.device-plugin.nvidia.com/mofed=all"]
    assert [c.name for c in resp.cdi_devices] == names
    assert dict(resp.annotations) == {"cdi.k8s.io/nvidia-device-plugin_u": ",".join(names)}
    assert not resp.envs and not resp.mounts and not resp.devices


def _gdrcopy_spec(host: str) -> dict[str, Any]:
    return {"cdiVersion": "0.5.0", "kind": "k8s.device-plugin.nvidia.com/gdrcopy", "devices": [{"name": "all",
            "containerEdits": {"deviceNodes": [{"path": "/dev/gdrdrv", "hostPath": f"{host}/dev/gdrdrv",
                                                "major": 235, "minor": 0, "fileMode": 0o666,
                                                "permissions": "rwm"}]}}]}


def test_gdrcopy_spec_is_the_gdrdrv_node(tmp_path: Path) -> None:
    root = tmp_path / "driver"
    node(root, "/dev/gdrdrv", 235, 0)
    env = {"NVIDIA_DRIVER_ROOT": str(root), "DRIVER_ROOT_CTR_PATH": "/nonexistent", "GDRCOPY_ENABLED": "true"}
    assert extra_specs(resolve(environ=env), ()) == {
        "k8s.device-plugin.nvidia.com-gdrcopy.json": _gdrcopy_spec(str(root))}
    # The GPU Operator: read where the host's driver root is mounted here, named by its host path.
    operator = {**env, "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver", "DRIVER_ROOT_CTR_PATH": str(root)}
    assert extra_specs(resolve(environ=operator), ()) == {
        "k8s.device-plugin.nvidia.com-gdrcopy.json": _gdrcopy_spec("/run/nvidia/driver")}


def test_gdrcopy_without_its_node_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "driver"
    (root / "dev").mkdir(parents=True)
    env = {"NVIDIA_DRIVER_ROOT": str(root), "DRIVER_ROOT_CTR_PATH": "/nonexistent", "GDRCOPY_ENABLED": "true"}
    refusal = re.escape(f"gdrcopyEnabled with a CDI strategy: no {root}/dev/gdrdrv character device")
    with pytest.raises(CdiError, match=refusal):
        extra_specs(resolve(environ=env), ())
    # A link to another node (the runtime would hand its numbers to every GPU container) is no gdrdrv either.
    node(root, "/dev/mem", 1, 1)
    (root / "dev/gdrdrv").symlink_to("mem")
    with pytest.raises(CdiError, match=refusal):
        extra_specs(resolve(environ=env), ())
    assert f"{root}/dev/gdrdrv: resolves to /dev/mem, another name" in caplog.text
    (root / "dev/gdrdrv").unlink()
    (root / "dev/gdrdrv").write_text("")
    with pytest.raises(CdiError, match=refusal):
        extra_specs(resolve(environ=env), ())
