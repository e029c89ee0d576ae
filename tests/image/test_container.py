"""`make image-test`: the built image, run by podman as Kubernetes would run it. Not part of
`make test` (it needs podman and `make image`); `.ci/run` runs both."""

from __future__ import annotations

import os
import subprocess

import pytest

from scripts.image import DEFAULT_IMAGE, podman_env

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
