"""Which root the CDI specs read device nodes from and which host path names them, for each layout of
NVIDIA_DRIVER_ROOT, NVIDIA_DEV_ROOT and the container driver root, as NVIDIA's plugin decides it
(cmd/nvidia-device-plugin root.getDevRoot, then internal/cdi getRootTransformer).

Where the driver root has a /dev, NVIDIA reads the nodes there and names them under the host's driver
root, whatever NVIDIA_DEV_ROOT says: its dev-root transform applies only when the dev root differs from
the driver root, and getDevRoot makes them equal. We named them under NVIDIA_DEV_ROOT (read there too)
in the three layouts marked "NVIDIA_DEV_ROOT set" below; NVIDIA's naming is the consistent one (the
nodes named are the nodes read). Where the driver root has no /dev, the nodes are the host's own: read
at this container's /dev, named under NVIDIA_DEV_ROOT when set apart from the driver root, else under /
(NVIDIA names them under the driver root, the /dev it has just found missing: see cdi.roots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HEALTHY, DeviceState
from common.settings import Settings, resolve
from services.plugin_server.cdi import Roots, build_spec, extra_specs, imex_channels, roots
from tests.fakedriver import LIB_DIR, VERSION, make_driver_root, node

GPU = DeviceState(id="GPU-1f62f3ea-d20c-f470-47b7-8f5c74880cbb", kind="gpu", index="0", name="NVIDIA H200",
                  health=HEALTHY, reason="", since=0.0, minor=0)
OPERATOR = "/run/nvidia/driver"

# id, NVIDIA_DRIVER_ROOT, NVIDIA_DEV_ROOT (None: not set), the host root naming nodes and files. The
# host's driver root is mounted here (DRIVER_ROOT_CTR_PATH) and has a /dev.
MOUNTED: list[tuple[str, str, str | None, str]] = [
    ("host-driver", "/", None, "/"),
    ("host-driver, NVIDIA_DEV_ROOT set", "/", "/custom/dev-root", "/"),
    ("operator", OPERATOR, None, OPERATOR),
    ("operator, NVIDIA_DEV_ROOT set to /", OPERATOR, "/", OPERATOR),
    ("operator, NVIDIA_DEV_ROOT set elsewhere", OPERATOR, "/run/nvidia/dev-root", OPERATOR),
    ("operator, NVIDIA_DEV_ROOT the driver root", OPERATOR, OPERATOR, OPERATOR),
]


def _settings(**environ: str) -> Settings:
    return resolve(environ=environ)


def _host(root: str, path: str) -> str:
    return root.rstrip("/") + path


def _layout(tmp_path: Path) -> Path:
    ctr = make_driver_root(tmp_path / "driver-root", [0])
    node(ctr, "/dev/gdrdrv", 235, 0)
    node(ctr, "/dev/infiniband/uverbs0", 231, 192)
    node(ctr, "/dev/nvidia-caps-imex-channels/channel0", 234, 0)
    return ctr


def _named(spec: dict[str, Any]) -> dict[str, str]:
    """container path -> hostPath of every device node and mount of a spec."""
    out: dict[str, str] = {}
    for edits in [spec.get("containerEdits", {})] + [d["containerEdits"] for d in spec["devices"]]:
        out.update({n["path"]: n["hostPath"] for n in edits.get("deviceNodes", [])})
        out.update({m["containerPath"]: m["hostPath"] for m in edits.get("mounts", [])})
    return out


@pytest.mark.parametrize(("driver_root", "dev_root", "host"), [c[1:] for c in MOUNTED], ids=[c[0] for c in MOUNTED])
def test_nodes_found_under_the_driver_root_are_named_under_the_hosts_driver_root(
        tmp_path: Path, driver_root: str, dev_root: str | None, host: str) -> None:
    ctr = _layout(tmp_path)
    env = {"NVIDIA_DRIVER_ROOT": driver_root, "DRIVER_ROOT_CTR_PATH": str(ctr), "DEVICE_LIST_STRATEGY": "cdi-cri",
           "GDRCOPY_ENABLED": "true", "MOFED_ENABLED": "true", "IMEX_CHANNEL_IDS": "0"}
    if dev_root is not None:
        env["NVIDIA_DEV_ROOT"] = dev_root
    settings = _settings(**env)
    assert roots(settings) == Roots(str(ctr), driver_root, str(ctr), driver_root)
    named = _named(build_spec([GPU], settings, VERSION))
    for path in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", f"{LIB_DIR}/libcuda.so.{VERSION}",
                 "/usr/bin/nvidia-smi"):
        assert named[path] == _host(host, path), path
    channels = imex_channels(settings)
    assert channels == ("0",)
    extras: dict[str, str] = {}
    for spec in extra_specs(settings, channels).values():
        extras.update(_named(spec))
    assert extras == {p: _host(host, p) for p in ("/dev/gdrdrv", "/dev/infiniband/uverbs0",
                                                  "/dev/nvidia-caps-imex-channels/channel0")}


def test_an_unmounted_driver_root_is_read_and_named_in_place(tmp_path: Path) -> None:
    """No container driver root: the driver root is read where it is (this process sees the host's paths);
    its /dev holds the nodes, NVIDIA_DEV_ROOT or not."""
    root = _layout(tmp_path)
    elsewhere = tmp_path / "dev-root"
    (elsewhere / "dev").mkdir(parents=True)
    settings = _settings(NVIDIA_DRIVER_ROOT=str(root), NVIDIA_DEV_ROOT=str(elsewhere),
                         DRIVER_ROOT_CTR_PATH=str(tmp_path / "not-mounted"))
    assert roots(settings) == Roots(str(root), str(root), str(root), str(root))
    assert _named(build_spec([GPU], settings, VERSION))["/dev/nvidia0"] == f"{root}/dev/nvidia0"


# id, NVIDIA_DRIVER_ROOT, NVIDIA_DEV_ROOT (None: not set), the host root naming the nodes; the driver root
# (mounted here) has no /dev: a driver of libraries and binaries only, its nodes in the host's /dev.
WITHOUT_DEV: list[tuple[str, str, str | None, str]] = [
    ("libraries only", "/home/kubernetes/bin/nvidia", None, "/"),
    ("libraries only, NVIDIA_DEV_ROOT set to /", "/home/kubernetes/bin/nvidia", "/", "/"),
    ("libraries only, NVIDIA_DEV_ROOT set elsewhere", "/home/kubernetes/bin/nvidia", "/host-dev", "/host-dev"),
]


@pytest.mark.parametrize(("driver_root", "dev_root", "host_dev"), [c[1:] for c in WITHOUT_DEV],
                         ids=[c[0] for c in WITHOUT_DEV])
def test_a_driver_root_without_dev_reads_this_containers_dev(
        tmp_path: Path, driver_root: str, dev_root: str | None, host_dev: str) -> None:
    ctr = make_driver_root(tmp_path / "driver-root", [0], devices=False)
    env = {"NVIDIA_DRIVER_ROOT": driver_root, "DRIVER_ROOT_CTR_PATH": str(ctr)}
    if dev_root is not None:
        env["NVIDIA_DEV_ROOT"] = dev_root
    assert roots(_settings(**env)) == Roots(str(ctr), driver_root, "/", host_dev)
