"""End to end: the shipped supervisord.conf with MPS (the fake nvidia-cuda-mps-control first on
PATH) and without it, as in the container."""

from __future__ import annotations

import os
import subprocess

import pytest

from devtools.devstack import BIN, DevStack
from tests.conftest import REPO
from tests.e2e.conftest import held

pytestmark = pytest.mark.e2e

FAKE_MPS = REPO / "devtools" / "fake_mps"
RES = "nvidia.com/gpu-mps"


def test_mps_under_supervisord_serves_and_stops_cleanly() -> None:
    stack = DevStack(fleet="dgx-h100-8")
    config = stack.root / "config.yaml"
    config.write_text("version: v1\nsharing:\n  mps:\n    resources:\n"
                      f"    - {{name: nvidia.com/gpu, rename: {RES}, replicas: 2}}\n")
    stack.env.update({"CONFIG_FILE": str(config), "GPU_PLUGIN_MPS_CONTAINER_ROOT": str(stack.root / "mps"),
                      "MPS_ROOT": str(stack.root / "mps"),
                      "PATH": f"{FAKE_MPS}{os.pathsep}{stack.env['PATH']}"})
    try:
        stack.start()
        reply = stack.kubelet.wait(RES, timeout=90, allocatable=16, capacity=16, connected=True)
        assert reply["ok"], f"{reply['state']}\n{stack.logs()}"
        pipe = stack.root / "mps" / RES / "pipe"
        assert (pipe / "control").exists()
        assert stack.stop(timeout=60) == 0
        log = (stack.root / "supervisord.log").read_text(errors="replace")
        assert "stopped: mps-control (exit status 0)" in log, log
        assert not pipe.exists(), "SIGTERM stops the daemon and removes its pipe dir"
    finally:
        stack.stop()
        stack.cleanup()


def test_without_mps_the_program_exits_0_and_stays_exited(stack: DevStack) -> None:
    held(stack)
    out = subprocess.run([str(BIN / "supervisorctl"), "-c", str(REPO / "supervisord.conf"), "status",
                          "gpu-plugin:mps-control"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert "EXITED" in out.stdout, out.stdout
    log = (stack.root / "supervisord.log").read_text(errors="replace")
    assert "exited: mps-control (exit status 0; expected)" in log, log
    assert stack.supervisord is not None and stack.supervisord.poll() is None, "the stack runs on without it"
