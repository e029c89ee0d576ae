"""The CDI spec against a hostile or broken driver root (issue 18): what the spec mounts is resolved
inside the driver root, is a regular file of the driver's (libraries, firmware, binaries), leaves out
what is not with one warning line, and the counts are bounded. Real files in tmp_path, no mocks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HEALTHY, DeviceState
from common.settings import Settings, resolve
from services.plugin_server.cdi import (
    MAX_DEVICE_NODES,
    MAX_FIRMWARE,
    MAX_LIBRARIES,
    CdiError,
    build_spec,
    check_driver_files,
    extra_specs,
)
from services.plugin_server.driver_root import Missing, Refused
from services.plugin_server.driver_root import resolve as resolve_in_root
from tests.fakedriver import LIB_DIR, VERSION, file, make_driver_root, node

GPU = DeviceState(id="GPU-1f62f3ea-d20c-f470-47b7-8f5c74880cbb", kind="gpu", index="0", name="NVIDIA H200",
                  health=HEALTHY, reason="", since=0.0, minor=0)
FIRMWARE_DIR = f"/lib/firmware/nvidia/{VERSION}"
SECRET = b"root:$6$not-for-containers:19000:0:99999:7:::\n"


def _settings(root: Path, **environ: str) -> Settings:
    return resolve(environ={"NVIDIA_DRIVER_ROOT": str(root), "DRIVER_ROOT_CTR_PATH": "/nonexistent-driver-root",
                            **environ})


def _spec(root: Path) -> dict[str, Any]:
    return build_spec([GPU], _settings(root), VERSION)


def _mounts(spec: dict[str, Any]) -> dict[str, str]:
    return {m["containerPath"]: m["hostPath"] for m in spec["containerEdits"]["mounts"]}


def _secret(tmp_path: Path) -> Path:
    """A file outside the driver root, as /etc/shadow is outside a containerized driver's root."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "shadow").write_bytes(SECRET)
    (outside / "shadow").chmod(0o755)  # executable too: being a "binary" must not be enough
    return outside / "shadow"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_driver_root(tmp_path / "driver", [0])


def _text(spec: dict[str, Any], root: Path) -> str:
    """The spec with its root's path as <root>: two driver roots' specs compare."""
    return json.dumps(spec, sort_keys=True).replace(str(root), "<root>")


@pytest.fixture
def clean(tmp_path: Path) -> str:
    """The spec of an untouched fake driver root (test_cdi.py holds it equal to NVIDIA's), as _text."""
    root = make_driver_root(tmp_path / "clean" / "driver", [0])
    return _text(_spec(root), root)


def _one_warning(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "CDI spec" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


# ---- symlinks that leave the driver root ----

@pytest.mark.parametrize(("target", "why"), [
    ("../../../../outside/shadow", "climbs above the root"),  # relative, out through the root's parent
    ("<abs>", "does not exist under the root"),  # absolute: in the root's terms, not the host's
    (f"../../../../driver/{LIB_DIR.lstrip('/')}/libcuda.so.{VERSION}", "climbs above the root"),  # out and in
])
def test_library_symlink_out_of_the_root_is_left_out(tmp_path: Path, root: Path, clean: str,
                                                     caplog: pytest.LogCaptureFixture, target: str, why: str) -> None:
    secret = _secret(tmp_path)
    link = root / LIB_DIR.lstrip("/") / f"libescape.so.{VERSION}"
    link.symlink_to(str(secret) if target == "<abs>" else target)
    assert link.is_file()  # what the host, and so the runtime's bind mount, would follow it to
    with caplog.at_level(logging.WARNING):
        spec = _spec(root)
    assert f"{LIB_DIR}/libescape.so.{VERSION}" not in _mounts(spec)
    assert _text(spec, root) == clean
    warning = _one_warning(caplog)
    assert f"{link}: " in warning and why in warning


def test_binaries_ipc_and_firmware_out_of_the_root_are_left_out(tmp_path: Path, root: Path, clean: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    secret = _secret(tmp_path)
    (root / "usr/bin/nvidia-debugdump").symlink_to(secret)  # absolute host path: nothing there in the root
    (root / "usr/bin/nvidia-cuda-mps-control").symlink_to("../../../outside/shadow")
    (root / "var/run/nvidia-fabricmanager").mkdir(parents=True)
    (root / "var/run/nvidia-fabricmanager/socket").symlink_to("../../../../outside/shadow")
    (root / "tmp").mkdir()
    (root / "tmp/nvidia-mps").symlink_to("../../outside")
    (root / FIRMWARE_DIR.lstrip("/") / "gsp_escape.bin").symlink_to("../../../../../outside/shadow")
    with caplog.at_level(logging.WARNING):
        spec = _spec(root)
    assert _text(spec, root) == clean
    warning = _one_warning(caplog)
    assert warning.startswith(f"CDI spec: 5 files under the driver root {root} left out")
    assert "and 2 more" in warning  # three examples, not five lines


def test_control_node_out_of_the_dev_root_is_refused(tmp_path: Path, root: Path) -> None:
    node(tmp_path / "outside", "/mem", 1, 1)  # what /dev/mem is, outside the dev root
    (root / "dev/nvidia-modeset").unlink()
    (root / "dev/nvidia-modeset").symlink_to("../../outside/mem")
    # A device node's major and minor go into the container's device cgroup: no node rather than the wrong one.
    with pytest.raises(CdiError, match=r"device node /dev/nvidia-modeset at .*/dev/nvidia-modeset: a symlink climbs"):
        _spec(root)


# ---- symlinks that stay inside the root but name what is not the driver's ----

def test_library_symlink_to_a_file_that_is_not_a_library(root: Path, clean: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    file(root, "/etc/shadow", 0o640)
    (root / "etc/shadow").write_bytes(SECRET)
    file(root, "/opt/evil/libx.so.1")
    file(root, f"{LIB_DIR}/libnvidia.conf")
    lib = root / LIB_DIR.lstrip("/")
    # As with the driver root `/`, where /etc/shadow is inside the root: where the target lives, and its
    # name, are what stop it.
    (lib / f"libescape.so.{VERSION}").symlink_to("/etc/shadow")
    (lib / f"libescape2.so.{VERSION}").symlink_to("../../../etc/shadow")
    (lib / f"libopt.so.{VERSION}").symlink_to("/opt/evil/libx.so.1")
    (lib / f"libconf.so.{VERSION}").symlink_to("libnvidia.conf")
    (root / "usr/bin/nvidia-debugdump").symlink_to("/etc/shadow")
    file(root, "/usr/bin/sh", 0o755)
    (root / "usr/bin/nvidia-cuda-mps-server").symlink_to("sh")  # executable, but not the binary named
    (root / "var/run/nvidia-fabricmanager").mkdir(parents=True)
    (root / "var/run/nvidia-fabricmanager/socket").symlink_to("/etc/shadow")
    with caplog.at_level(logging.WARNING):
        spec = _spec(root)
    assert _text(spec, root) == clean
    warning = _one_warning(caplog)
    assert " 7 files " in warning
    assert "/etc/shadow, outside the library directories" in warning


def test_directories_named_like_driver_files(root: Path, clean: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (root / LIB_DIR.lstrip("/") / f"libdir.so.{VERSION}").mkdir()
    (root / LIB_DIR.lstrip("/") / f"libetc.so.{VERSION}").symlink_to("/etc")
    (root / "etc").mkdir()
    (root / FIRMWARE_DIR.lstrip("/") / "gsp_dir.bin").mkdir()
    (root / "usr/bin/nvidia-imex").mkdir()
    with caplog.at_level(logging.WARNING):
        spec = _spec(root)
    assert _text(spec, root) == clean
    assert "which is a directory" in _one_warning(caplog)


@pytest.mark.parametrize("links", [["gsp_loop.bin"], ["gsp_a.bin", "gsp_b.bin"]])
def test_looping_firmware_symlink(root: Path, clean: str, caplog: pytest.LogCaptureFixture,
                                  links: list[str]) -> None:
    fw = root / FIRMWARE_DIR.lstrip("/")
    for name, target in zip(links, [*links[1:], links[0]], strict=True):
        (fw / name).symlink_to(target)
    with caplog.at_level(logging.WARNING):
        spec = _spec(root)
    assert _text(spec, root) == clean
    assert "symlinks on the way (a loop)" in _one_warning(caplog)


def test_a_hundred_bad_entries_are_one_warning_line(tmp_path: Path, root: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    secret = _secret(tmp_path)
    lib = root / LIB_DIR.lstrip("/")
    for i in range(100):
        (lib / f"libbad{i:03}.so.{VERSION}").symlink_to(secret)
    with caplog.at_level(logging.WARNING):
        spec = _spec(root)
    assert not [m for m in _mounts(spec) if "libbad" in m]
    warning = _one_warning(caplog)
    assert " 100 files " in warning and "and 97 more" in warning
    assert warning.count("does not exist under the root") == 3


# ---- bounds ----

def _many(directory: Path, names: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.close(os.open(directory / name, os.O_CREAT | os.O_WRONLY, 0o644))


def test_thirty_thousand_libraries_are_refused_in_bounded_memory(root: Path) -> None:
    # 30 000 (the case was 100 000): enough for a collected list of names (~3.5 MB of
    # paths) to show past the bound below, at a third of the files to create.
    lib = root / LIB_DIR.lstrip("/")
    _many(lib, [f"libmany{i:06}.so.{VERSION}" for i in range(30_000)])
    try:
        tracemalloc.start()
        try:
            with pytest.raises(CdiError, match=rf"more than {MAX_LIBRARIES} files named like the driver's libraries"):
                _spec(root)
            check_driver_files(_settings(root))  # a presence check: the first name found is enough
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 * 1024 * 1024, f"{peak} bytes: the names were collected, not scanned"
    finally:
        shutil.rmtree(lib)  # 30 000 files: not left for pytest's own cleanup, runs later


def test_library_bound_is_inclusive(root: Path) -> None:
    # The fake driver has 5 names that match (4 libraries, 1 in vdpau/): up to the bound, all are mounted.
    lib = root / LIB_DIR.lstrip("/")
    _many(lib, [f"libfill{i:03}.so.{VERSION}" for i in range(MAX_LIBRARIES - 5)])
    assert len([m for m in _mounts(_spec(root)) if ".so." in m]) == MAX_LIBRARIES
    _many(lib, [f"libover.so.{VERSION}"])
    with pytest.raises(CdiError, match=rf"more than {MAX_LIBRARIES} .* under the driver root '{root}'"):
        _spec(root)


def test_firmware_bound(root: Path) -> None:
    fw = root / FIRMWARE_DIR.lstrip("/")
    _many(fw, [f"gsp_x{i:02}.bin" for i in range(MAX_FIRMWARE - 2)])  # the fake has two
    assert len([m for m in _mounts(_spec(root)) if m.startswith(FIRMWARE_DIR)]) == MAX_FIRMWARE
    _many(fw, ["gsp_over.bin"])
    with pytest.raises(CdiError, match=rf"more than {MAX_FIRMWARE} GSP firmware files"):
        _spec(root)


# ---- GDS and MOFED device nodes ----

def _extras_env(root: Path) -> dict[str, str]:
    return {"NVIDIA_DRIVER_ROOT": str(root), "DRIVER_ROOT_CTR_PATH": "/nonexistent", "GDS_ENABLED": "true",
            "MOFED_ENABLED": "true"}


def test_extra_device_nodes_through_symlinks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "driver"
    node(root, "/dev/infiniband/uverbs0", 231, 192)
    node(root, "/dev/mem", 1, 1)
    node(tmp_path / "outside", "/uverbs2", 1, 2)
    (root / "dev/infiniband/uverbs1").symlink_to("../mem")  # inside the dev root, but /dev/mem
    (root / "dev/infiniband/uverbs2").symlink_to("../../../outside/uverbs2")
    gds_root = tmp_path / "host"
    node(gds_root, "/dev/nvidia-fs0", 240, 0)
    node(gds_root, "/dev/nvidia-fs1", 240, 1)
    (gds_root / "dev/nvidia-fs2").symlink_to("nvidia-fs1")  # the same device under another name
    (root / "etc").mkdir()
    (root / "etc/cufile.json").symlink_to("/etc/shadow")
    file(root, "/etc/shadow", 0o640)
    with caplog.at_level(logging.WARNING):
        specs = extra_specs(resolve(environ=_extras_env(root)), (), gds_root=str(gds_root))
    mofed = specs["k8s.device-plugin.nvidia.com-mofed.json"]["devices"][0]["containerEdits"]
    assert [n["path"] for n in mofed["deviceNodes"]] == ["/dev/infiniband/uverbs0"]
    gds = specs["k8s.device-plugin.nvidia.com-gds.json"]["devices"][0]["containerEdits"]
    assert [n["path"] for n in gds["deviceNodes"]] == ["/dev/nvidia-fs0", "/dev/nvidia-fs1"]
    assert "mounts" not in gds
    warning = _one_warning(caplog)
    assert " 4 device nodes or files " in warning and "another name" in warning


def test_a_looping_device_node_is_left_out_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "driver"
    node(root, "/dev/infiniband/uverbs0", 231, 192)
    (root / "dev/infiniband/uverbs1").symlink_to("uverbs1")
    env = {**_extras_env(root), "GDS_ENABLED": "false"}
    with caplog.at_level(logging.WARNING):
        specs = extra_specs(resolve(environ=env), ())
    mofed = specs["k8s.device-plugin.nvidia.com-mofed.json"]["devices"][0]["containerEdits"]
    assert [n["path"] for n in mofed["deviceNodes"]] == ["/dev/infiniband/uverbs0"]
    assert "(a loop)" in _one_warning(caplog)


def test_extra_device_nodes_bound(tmp_path: Path) -> None:
    root = tmp_path / "driver"
    _many(root / "dev/infiniband", [f"uverbs{i}" for i in range(MAX_DEVICE_NODES + 1)])
    env = {**_extras_env(root), "GDS_ENABLED": "false"}
    with pytest.raises(CdiError, match=rf"more than {MAX_DEVICE_NODES} uverbs\* device nodes"):
        extra_specs(resolve(environ=env), ())


# ---- a normal tree is unchanged ----

def test_ordinary_symlinks_give_the_same_spec(root: Path, clean: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    lib = root / LIB_DIR.lstrip("/")
    # The driver's own chains (libcuda.so.1 -> libcuda.so.<version> is already in the fake):
    (lib / "libcuda.so").symlink_to("libcuda.so.1")
    (lib / "libnvidia-ml.so.1").symlink_to(f"libnvidia-ml.so.{VERSION}")
    (lib / "libnvidia-ml.so").symlink_to(f"{LIB_DIR}/libnvidia-ml.so.1")  # absolute: the root's own /usr
    with caplog.at_level(logging.WARNING):
        spec = _spec(root)
    assert _text(spec, root) == clean
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_merged_usr_mounts_the_resolved_files(root: Path, clean: str) -> None:
    # /lib -> usr/lib and /var/run -> /run, as on current distributions; a versioned library that is a
    # link (absolute, in the root's terms) into nvidia/current, as Debian's alternatives make them.
    shutil.copytree(root / "lib", root / "usr/lib", dirs_exist_ok=True, symlinks=True)
    shutil.rmtree(root / "lib")
    (root / "lib").symlink_to("usr/lib")
    (root / "run").mkdir()
    (root / "var/run").rename(root / "run/var-run")
    (root / "var/run").symlink_to("/run/var-run")
    file(root, f"{LIB_DIR}/nvidia/current/libnvidia-cfg.so.{VERSION}")
    (root / LIB_DIR.lstrip("/") / f"libnvidia-cfg.so.{VERSION}").symlink_to(
        f"{LIB_DIR}/nvidia/current/libnvidia-cfg.so.{VERSION}")
    mounts = _mounts(_spec(root))
    expected = _mounts(json.loads(clean.replace("<root>", str(root))))
    expected[f"{FIRMWARE_DIR}/gsp_ga10x.bin"] = f"{root}/usr{FIRMWARE_DIR}/gsp_ga10x.bin"
    expected[f"{FIRMWARE_DIR}/gsp_tu10x.bin"] = f"{root}/usr{FIRMWARE_DIR}/gsp_tu10x.bin"
    expected["/var/run/nvidia-persistenced/socket"] = f"{root}/run/var-run/nvidia-persistenced/socket"
    expected[f"{LIB_DIR}/libnvidia-cfg.so.{VERSION}"] = f"{root}{LIB_DIR}/nvidia/current/libnvidia-cfg.so.{VERSION}"
    assert mounts == expected


def test_device_nodes_are_still_read_from_the_files(root: Path) -> None:
    spec = _spec(root)
    ctl = next(n for n in spec["containerEdits"]["deviceNodes"] if n["path"] == "/dev/nvidiactl")
    assert (ctl["major"], ctl["minor"], ctl["hostPath"]) == (195, 255, f"{root}/dev/nvidiactl")
    assert stat.S_ISCHR(os.stat(ctl["hostPath"]).st_mode)


# ---- the resolver itself ----

def test_resolver_reads_links_as_a_chroot(tmp_path: Path) -> None:
    root = tmp_path / "root"
    file(root, "/x/y/f")
    (root / "abs").symlink_to("/x/y")  # the root's /x/y, not the host's
    (root / "rel").symlink_to("x/y/../y")
    (root / "up").symlink_to("../../..")
    (root / "x/loop").symlink_to("loop")
    assert resolve_in_root(str(root), "/abs/f").path == "/x/y/f"
    assert resolve_in_root(str(root), "/abs/../y/f").path == "/x/y/f"  # `..` from the link's target, as the kernel
    assert resolve_in_root(str(root), "/rel/f").path == "/x/y/f"
    assert resolve_in_root(str(root), "/").path == "/"
    with pytest.raises(Refused, match="climbs above the root"):
        resolve_in_root(str(root), "/up")
    with pytest.raises(Refused, match="climbs above the root"):
        resolve_in_root(str(root), "/../x")
    with pytest.raises(Refused, match="more than 40 symlinks"):
        resolve_in_root(str(root), "/x/loop")
    with pytest.raises(Missing, match="/x/y/f is not a directory"):
        resolve_in_root(str(root), "/abs/f/g")
    with pytest.raises(Missing, match="/nothing does not exist"):
        resolve_in_root(str(root), "/nothing/f")
