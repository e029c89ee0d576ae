"""What every service shares, with real processes: the run dir it trusts, how it exits on a
failure a restart cannot fix, and the operator CLI's behaviour in a pipe."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from common.version import VERSION
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
    assert shell.stdout.rstrip("\n").endswith(f"plugin {VERSION}"), shell.stdout


def test_status_into_a_full_disk_is_one_line_not_a_traceback(procs: Procs, short_tmp: Path) -> None:
    run = short_tmp / "run"
    procs.start("hm", "health-monitor", env=sim_env(run))
    wait_until(lambda: (run / "health.sock").exists(), 30, "the health bus")
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--timeout", "20"], cwd=REPO,
                             env={**procs.env, **sim_env(run)}, stdout=full, stderr=subprocess.PIPE, text=True,
                             timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr == "gpu-plugin: error: cannot write the output: No space left on device\n", out.stderr


def test_status_names_each_service_by_its_heartbeat(procs: Procs, short_tmp: Path) -> None:
    """A frozen service (here: a heartbeat file whose process lives but has not answered for a
    minute) is named, not left out."""
    run = short_tmp / "run"
    procs.start("hm", "health-monitor", env=sim_env(run))
    wait_until(lambda: (run / "health-monitor.alive").exists(), 30, "the monitor's heartbeat")
    # A process that answers to the name and never beats: what a stopped kube-agent looks like here.
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "kube-agent"])
    try:
        alive = run / "kube-agent.alive"
        alive.write_text(f"{frozen.pid} 30\n")
        os.utime(alive, (1, 1))
        out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--timeout", "20"], cwd=REPO,
                             env={**procs.env, **sim_env(run)}, capture_output=True, text=True, timeout=60)
    finally:
        frozen.kill()
        frozen.wait()
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("services: "))
    assert "health-monitor ok" in line and "plugin-server not running" in line, line
    assert f"kube-agent STALE (pid {frozen.pid}: loop last answered" in line, line


def run_service_until_exit(procs: Procs, name: str, service: str, env: dict[str, str]) -> int:
    p = procs.start(name, service, env=env)
    wait_until(lambda: p.poll() is not None, 60, f"{service} exiting")
    return p.returncode


def test_a_symlinked_run_dir_is_refused_and_its_target_left_alone(procs: Procs, short_tmp: Path) -> None:
    target = short_tmp / "elsewhere"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    run = short_tmp / "run"
    run.symlink_to(target)
    for service in ("health-monitor", "plugin-server", "registrar"):
        code = run_service_until_exit(procs, service, service, sim_env(run))
        assert code == EX_CONFIG, procs.log(service)
        assert f"run dir {run} is a symlink" in procs.log(service)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755, "the symlink's target was chmodded"
    assert list(target.iterdir()) == [], "nothing was created through the symlink"


def test_a_run_dir_of_another_user_is_refused(procs: Procs, short_tmp: Path) -> None:
    run = short_tmp / "run"
    run.mkdir(mode=0o777)
    os.chmod(run, 0o777)
    os.chown(run, 65534, 65534)  # nobody; the tests run as root, as the container does
    code = run_service_until_exit(procs, "hm", "health-monitor", sim_env(run))
    assert code == EX_CONFIG, procs.log("hm")
    assert f"run dir {run} is owned by uid 65534" in procs.log("hm")
    assert stat.S_IMODE(run.stat().st_mode) == 0o777 and list(run.iterdir()) == []


def test_a_missing_run_dir_is_created_owner_only(procs: Procs, short_tmp: Path) -> None:
    run = short_tmp / "a" / "run"
    procs.start("hm", "health-monitor", env=sim_env(run))
    wait_until(lambda: (run / "health.sock").exists(), 30, "the health bus in the new run dir")
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
