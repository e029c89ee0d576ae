"""What every service shares, with real processes: the run dir it trusts, how it exits on a
failure a restart cannot fix, and the operator CLI's behaviour in a pipe."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, Procs, wait_until

EX_CONFIG = 78


def sim_env(run: Path, **extra: str) -> dict[str, str]:
    return {"GPU_PLUGIN_RUN_DIR": str(run), "NVML_BACKEND": "simulated", "SIMULATED_DEVICES": "dgx-h100-8-mig",
            "KUBELET_SOCKET": "", **extra}


def test_status_into_a_closed_pipe_ends_quietly(procs: Procs, short_tmp: Path) -> None:
    # `gpu-plugin status | head -1`: head exits before status has written everything.
    run = short_tmp / "run"
    procs.start("hm", "health-monitor", env=sim_env(run))
    wait_until(lambda: (run / "health.sock").exists(), 30, "the health bus")
    p = subprocess.Popen([sys.executable, "-m", "services.cli", "status"], cwd=REPO,
                         env={**procs.env, **sim_env(run)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    p.stderr.close()
    p.wait(30)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    shell = subprocess.run(f"{sys.executable} -m services.cli status | head -1", shell=True, cwd=REPO,
                           env={**procs.env, **sim_env(run)}, capture_output=True, text=True, timeout=60)
    assert shell.stdout.startswith("driver ") and shell.stderr == "", shell.stderr
