"""`nvidia-device-plugin`, the command NVIDIA's chart and the GPU Operator start the container with,
runs our whole stack: the real entry point, supervisord, the three services and the kubelet
simulator. Its flags reach the services; the operator's environment (MPS_ROOT, PASS_DEVICE_SPECS,
GDRCOPY_ENABLED) starts; a bad setting ends it before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devtools.devstack import ENTRYPOINT, SUPERVISORD_CONF, DevStack, spawn

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
# Where the image has them: /usr/local/bin/gpu-plugin-entrypoint and /etc/gpu-plugin/supervisord.conf.
CHECKOUT = {"GPU_PLUGIN_ENTRYPOINT": str(ENTRYPOINT), "GPU_PLUGIN_SUPERVISORD_CONF": str(SUPERVISORD_CONF)}


def test_nvidias_command_with_nvidias_flags_and_the_operators_environment_runs_the_stack() -> None:
    s = DevStack(fleet="dgx-h100-8-mig", env={**CHECKOUT, "MPS_ROOT": "/run/nvidia/mps",
                                              "PASS_DEVICE_SPECS": "true", "MIG_STRATEGY": "none"})
    with s.finished_after():
        s.start_kubelet()
        # The flag wins over the environment (MIG_STRATEGY=none), as in NVIDIA's plugin.
        s.supervisord = spawn([str(BIN / "nvidia-device-plugin"), "--mig-strategy", "mixed",
                               "--fail-on-init-error=true"], s.env, s.root / "supervisord.log", cwd=s.root)
        reply = s.kubelet.wait("nvidia.com/mig-1g.10gb", timeout=90, connected=True)
        assert reply["ok"], s.logs()
        # The operator always sets MPS_ROOT: without sharing.mps it is said, never an exit.
        assert "MPS_ROOT / --mps-root is set (/run/nvidia/mps) but sharing.mps is not configured" in s.logs()
        # exec: the same process is now the entry point, whose SIGTERM ends the stack with 0.
        cmdline = Path(f"/proc/{s.supervisord.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:2] == [b"/bin/sh", str(ENTRYPOINT).encode()], cmdline
        assert s.stop(timeout=60) == 0, s.logs()


def test_the_operators_gdrcopy_setting_runs_the_stack_and_reaches_allocate() -> None:
    """The GPU Operator's entrypoint sets GDRCOPY_ENABLED=true on every node where gdrdrv is loaded: it
    used to stop the container there; now every GPU container gets NVIDIA_GDRCOPY=enabled, as NVIDIA's."""
    s = DevStack(env={**CHECKOUT, "GDRCOPY_ENABLED": "true"})
    with s.finished_after():
        s.start_kubelet()
        s.supervisord = spawn([str(BIN / "nvidia-device-plugin")], s.env, s.root / "supervisord.log", cwd=s.root)
        reply = s.kubelet.wait("nvidia.com/gpu", timeout=90, connected=True)
        assert reply["ok"], s.logs()
        ids = list(s.kubelet.state()["resources"]["nvidia.com/gpu"]["devices"])
        answer = s.kubelet.allocate("nvidia.com/gpu", ids[:1])
        assert answer["ok"], answer
        assert answer["response"]["envs"] == {"NVIDIA_VISIBLE_DEVICES": ids[0], "NVIDIA_GDRCOPY": "enabled"}
        assert s.stop(timeout=60) == 0, s.logs()


def test_a_bad_flag_ends_it_before_anything_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run([str(BIN / "nvidia-device-plugin"), "--device-list-strategy", "cdi"],
                            env={"PATH": str(BIN), "GPU_PLUGIN_RUN_DIR": str(run_dir), **CHECKOUT},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last = result.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("nvidia-device-plugin: cannot start: device_list_strategy (flag --device-list-strategy)")
    assert not run_dir.exists(), "the entry point must not have run"


@pytest.mark.parametrize("flag", ["--version", "-v"])  # -v: NVIDIA's alias (urfave/cli's version flag)
def test_version(flag: str) -> None:
    from common.version import VERSION

    result = subprocess.run([str(BIN / "nvidia-device-plugin"), flag], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, f"gpu-device-plugin {VERSION}")
    assert VERSION == "0.1.0"
