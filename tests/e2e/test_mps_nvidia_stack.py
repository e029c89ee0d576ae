"""End to end, NVIDIA's layout of MPS: the image run as `nvidia-device-plugin` (the real entry point,
supervisord and the shipped supervisord.conf) beside `mps-control-daemon`, as NVIDIA's chart and
the GPU Operator run them in two pods sharing the host's MPS root. The stack runs no MPS daemon of
its own: it offers the replicas while mps-control-daemon's are ready, and only then."""

from __future__ import annotations

import os
import subprocess

import pytest

from devtools.devstack import ENTRYPOINT, SUPERVISORD_CONF, DevStack, spawn, terminate
from tests.conftest import BIN, REPO

pytestmark = pytest.mark.e2e

FAKE_MPS = REPO / "devtools" / "fake_mps"
RES = "nvidia.com/gpu-mps"
CHECKOUT = {"GPU_PLUGIN_ENTRYPOINT": str(ENTRYPOINT), "GPU_PLUGIN_SUPERVISORD_CONF": str(SUPERVISORD_CONF)}


def test_run_as_nvidia_device_plugin_the_stack_watches_mps_control_daemon() -> None:
    s = DevStack(fleet="dgx-h100-8", env=CHECKOUT)
    root = s.root / "mps"  # the host's MPS root, mounted at the same path in both pods
    config = s.root / "config.yaml"
    config.write_text("version: v1\nsharing:\n  mps:\n    resources:\n"
                      f"    - {{name: nvidia.com/gpu, rename: {RES}, replicas: 2}}\n")
    s.env.update({"CONFIG_FILE": str(config), "GPU_PLUGIN_MPS_CONTAINER_ROOT": str(root), "MPS_ROOT": str(root),
                  "PATH": f"{FAKE_MPS}{os.pathsep}{s.env['PATH']}", "FAKE_NVIDIA_SMI_LOG": str(s.root / "smi.log")})
    daemon_env = {**s.env, "GPU_PLUGIN_RUN_DIR": str(s.root / "daemon-run")}  # its own pod
    daemons: list[subprocess.Popen[bytes]] = []

    def daemon_pod() -> None:
        daemons.append(spawn([str(BIN / "mps-control-daemon")], daemon_env, s.root / "daemon.log", cwd=s.root))

    with s.finished_after():
        try:
            s.start_kubelet()
            s.supervisord = spawn([str(BIN / "nvidia-device-plugin")], s.env, s.root / "supervisord.log", cwd=s.root)
            daemon_pod()
            reply = s.kubelet.wait(RES, timeout=90, allocatable=16, capacity=16, connected=True)
            assert reply["ok"], s.logs()
            assert "(its daemon is run by mps-control-daemon: watched here)" in s.logs()
            # Its pod goes: the replicas stay, Unhealthy; it comes back: Healthy again.
            assert terminate(daemons[-1], 30) == 0
            reply = s.kubelet.wait(RES, timeout=60, allocatable=0, capacity=16, connected=True)
            assert reply["ok"], s.logs()
            daemon_pod()
            reply = s.kubelet.wait(RES, timeout=90, allocatable=16, capacity=16, connected=True)
            assert reply["ok"], s.logs()
            log = (root / RES / "log" / "control.log").read_text()
            assert log.count("starting control daemon") == 2, "only mps-control-daemon starts daemons"
            # The stack stops with 0 and leaves the daemon, not its own, serving.
            assert s.stop(timeout=60) == 0, s.logs()
            assert (root / RES / "pipe" / "control").exists() and (root / RES / ".started").exists()
            assert terminate(daemons[-1], 30) == 0
            assert not (root / RES / "pipe").exists()
        finally:
            for p in daemons:
                terminate(p, 30)
