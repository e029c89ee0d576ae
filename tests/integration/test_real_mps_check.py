"""scripts/real_mps_check.py against the fake nvidia-cuda-mps-control on the recorded H200."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

FAKE_MPS = REPO / "devtools" / "fake_mps"


def run(short_tmp: Path, fault: str = "") -> subprocess.CompletedProcess[str]:
    (short_tmp / "fault").write_text(fault)
    env = {**os.environ, "PATH": f"{FAKE_MPS}{os.pathsep}{os.environ.get('PATH', '')}",
           "FAKE_MPS_FAULT_FILE": str(short_tmp / "fault"), "FAKE_NVIDIA_SMI_LOG": str(short_tmp / "smi.log")}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "real_mps_check.py"), "--nvml-backend", "simulated",
                           "--root", str(short_tmp / "mps"), "--json", str(short_tmp / "rec.json")],
                          env=env, capture_output=True, text=True, timeout=120)


def test_mps_check_on_the_recorded_h200(short_tmp: Path) -> None:
    p = run(short_tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    rec = json.loads((short_tmp / "rec.json").read_text())
    assert (rec["active_thread_percentage"], rec["pipe_dir_removed"]) == ("50.0", True)
    assert rec["pinned_mem_limit"].endswith("M") and "MPS check: OK" in p.stdout
    gpu = rec["gpu"]
    assert (short_tmp / "smi.log").read_text().split("\n")[:2] == [f"{gpu} EXCLUSIVE_PROCESS", f"{gpu} DEFAULT"]


def test_mps_check_fails_when_the_daemon_refuses(short_tmp: Path) -> None:
    p = run(short_tmp, fault="refuse")
    assert p.returncode == 1 and "MPS check: FAILED" in p.stdout and "refused" in p.stdout, p.stdout
    assert not (short_tmp / "mps" / "nvidia.com" / "gpu" / "pipe").exists()
