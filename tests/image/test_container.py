"""`make image-test`: the built image, run by podman as Kubernetes would run it. Not part of
`make test` (it needs podman and `make image`); `.ci/run` runs both."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from devtools.devstack import RESOURCE, spawn, terminate
from devtools.kubelet_simulator.control import KubeletSimClient
from scripts.image import DEFAULT_IMAGE, podman_env
from tests.conftest import wait_until
from tests.fakenvml import build_gpu_driver_root

XID_EVENTS = 0x8  # nvmlEventTypeXidCriticalError: what the monitor registers for on every GPU

IMAGE = os.environ.get("IMAGE", DEFAULT_IMAGE)
# Every command NVIDIA's chart and the GPU Operator start containers of this image with, and ours.
COMMANDS = ("nvidia-device-plugin", "config-manager", "gpu-feature-discovery", "mps-control-daemon",
            "gpu-plugin", "gpu-plugin-supervisord", "gpu-plugin-entrypoint")


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\n", 1)[-1]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_in_the_image_and_starts(command: str) -> None:
    found = podman("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", IMAGE, "-c", f"command -v {command}")
    assert found.returncode == 0 and found.stdout.strip(), found.stderr
    # --help: each says how it is used (config-manager, whose interface is the environment, refuses
    # arguments with exit 2, the sh entry point has one option: 64); what matters is that its code is
    # there and imports.
    out = podman("run", "--rm", "--network", "none", "--entrypoint", command, IMAGE, "--help")
    assert out.returncode in (0, 2, 64) and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert (out.stdout + out.stderr).strip(), "nothing said"


@pytest.mark.parametrize("entry", [[], ["--entrypoint", "nvidia-device-plugin"]], ids=["ours", "nvidia-command"])
def test_without_a_driver_the_container_exits_1_with_the_cause_last(entry: list[str]) -> None:
    """Our entry point, and NVIDIA's command as its chart starts it: no libnvidia-ml anywhere."""
    out = podman("run", "--rm", "--network", "none", *entry, IMAGE, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "libnvidia-ml.so.1" in last_line(out.stderr) and "health-monitor" in last_line(out.stderr), out.stderr


def test_with_a_driver_root_it_registers_allocates_reports_a_fault_and_stops_with_0(tmp_path: Path) -> None:
    """The image as the chart runs it: the host's driver root at /driver-root (here a stand-in
    libnvidia-ml with 8 H100s, which the image's real NVML backend loads), the kubelet's
    device-plugins directory shared with the kubelet (the simulator, on this host)."""
    driver = build_gpu_driver_root(tmp_path / "driver-root", gpus=8)
    root = Path(tempfile.mkdtemp(prefix="gp-img-"))  # short: AF_UNIX paths are at most 107 bytes
    dp, control = root / "dp", root / "kubelet.ctl"
    dp.mkdir()
    kubelet = spawn([sys.executable, "-m", "devtools.cli", "kubelet-sim", "--dir", str(dp), "--control",
                     str(control)], dict(os.environ), root / "kubelet.log")
    name = f"gp-image-test-{os.getpid()}"
    client: KubeletSimClient | None = None
    try:
        started = podman("run", "-d", "--name", name, "--network", "none",
                         "-v", f"{driver.root}:/driver-root", "-v", f"{dp}:/var/lib/kubelet/device-plugins",
                         "-e", "NVIDIA_DRIVER_ROOT=/", IMAGE)
        assert started.returncode == 0, started.stderr
        wait_until(control.exists, 30, "the kubelet simulator's control socket")
        client = KubeletSimClient(control)
        held = client.wait(RESOURCE, timeout=60, allocatable=8, capacity=8, connected=True)
        assert held["ok"], podman("logs", name).stderr
        assert set(held["state"]["resources"][RESOURCE]["devices"]) == set(driver.uuids)
        reply = client.allocate(RESOURCE, [driver.uuids[0]])
        assert reply["ok"], reply
        assert reply["response"]["envs"] == {"NVIDIA_VISIBLE_DEVICES": driver.uuids[0]}, reply
        wait_until(lambda: driver.registered(XID_EVENTS) >= set(range(8)), 30, "XID events registered")
        driver.inject_xid(3, 79)
        faulted = client.wait(RESOURCE, timeout=30, allocatable=7, capacity=8, connected=True)
        assert faulted["ok"], podman("logs", name).stderr
        assert faulted["state"]["resources"][RESOURCE]["devices"][driver.uuids[3]] == "Unhealthy"
        stopped = podman("stop", "-t", "30", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name)
        logs = podman("logs", name)
        assert code.stdout.strip() == "0", logs.stdout + logs.stderr
        assert "Traceback" not in logs.stdout + logs.stderr
    finally:
        if client is not None:
            client.close()
        podman("rm", "-f", "-t", "0", name)
        terminate(kubelet)
        shutil.rmtree(root, ignore_errors=True)


def test_gpu_feature_discovery_labels_the_stand_in_drivers_gpus(tmp_path: Path) -> None:
    """NVIDIA's GFD command from this image, as its chart runs it (--oneshot here, and the features.d
    file: no API server here, and NVIDIA's default since v0.19 is the NodeFeature object), with the
    image's real NVML backend on the stand-in driver: NVIDIA's label names and values for 8 H100s."""
    driver = build_gpu_driver_root(tmp_path / "driver-root", gpus=8)
    out = tmp_path / "features.d"
    out.mkdir()
    ran = podman("run", "--rm", "--network", "none", "-v", f"{driver.root}:/driver-root", "-v",
                 f"{out}:/etc/kubernetes/node-feature-discovery/features.d", "-e", "NVIDIA_DRIVER_ROOT=/",
                 "--entrypoint", "gpu-feature-discovery", IMAGE, "--oneshot", "--no-timestamp",
                 "--use-node-feature-api=false", timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    labels = dict(line.split("=", 1) for line in (out / "gfd").read_text().splitlines())
    # NVIDIA's internal/lm: the product name with spaces as dashes, memory in MiB, CUDA 13.0 from
    # the driver's 13000, compute capability 9.0 (Hopper).
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.family"] == "hopper"
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == ("9", "0")
    assert (labels["nvidia.com/cuda.driver-version.major"], labels["nvidia.com/cuda.runtime-version.full"]) == (
        "580", "13.0")
    assert "nvidia.com/gfd.timestamp" not in labels
