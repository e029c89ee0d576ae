"""MPS served for real: mps-control runs the fake nvidia-cuda-mps-control (devtools/fake_mps,
put first on PATH) beside the three services and the kubelet simulator, all real processes on
real sockets. Scenarios: 8 GPUs x 4 replicas with rename, the daemon's limits, a killed daemon
(replicas Unhealthy at the kubelet, then back), a refusing daemon, a GPU fault, MPS beside
time-slicing, SIGTERM (daemon quit, pipe dir removed), no MPS (exit 0 at once), no binary, a
daemon left by a killed mps-control (it ends with its test's directory: nothing outlives the test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from common.lifecycle import EX_CONFIG
from tests.conftest import BIN, REPO, wait_until
from tests.integration.node import Node

FAKE_MPS = REPO / "devtools" / "fake_mps"
G0 = "GPU-f039c560-d7cc-5c7c-54f1-dd371541d642"  # index 0 of dgx-h100-8
MPS_RENAMED = ("version: v1\nsharing:\n  mps:\n    resources:\n"
               "    - {name: nvidia.com/gpu, rename: nvidia.com/gpu-mps, replicas: 4}\n")
MPS_RES = "nvidia.com/gpu-mps"


def mps_env(root: Path, fake: bool = True) -> dict[str, str]:
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        "PATH": f"{FAKE_MPS}{os.pathsep}{path}" if fake else path,
        "GPU_PLUGIN_MPS_CONTAINER_ROOT": str(root / "mps"),
        "MPS_ROOT": str(root / "mps"),  # the same directory as seen from the host: no mount needed
        "FAKE_MPS_FAULT_FILE": str(root / "mps-fault"),
        "FAKE_NVIDIA_SMI_LOG": str(root / "smi.log"),
    }


def mps_node(make_node: Any, short_tmp: Path, config: str = MPS_RENAMED, fault: str = "") -> Node:
    (short_tmp / "mps-fault").write_text(fault)
    node: Node = make_node(config=config, **mps_env(short_tmp))
    node.start("mps-control")
    return node


def pipe(node: Node, resource: str = MPS_RES) -> Path:
    return node.root / "mps" / resource / "pipe"


def control(node: Node, commands: str, resource: str = MPS_RES) -> subprocess.CompletedProcess[str]:
    env = {**node.env, "CUDA_MPS_PIPE_DIRECTORY": str(pipe(node, resource))}
    return subprocess.run([str(FAKE_MPS / "nvidia-cuda-mps-control")], input=commands, env=env, capture_output=True,
                          text=True, timeout=30)


def daemon_pid(node: Node, resource: str = MPS_RES) -> int:
    try:
        return int((pipe(node, resource) / "nvidia-cuda-mps-control.pid").read_text())
    except (OSError, ValueError):
        return 0


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: a daemon that exited waits there for init to reap it)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def mps_state(node: Node) -> dict[str, Any]:
    out = node.cli("bus", "tail", "--topic", "mps.state", "--count", "1", "--timeout", "20")
    assert out.returncode == 0, out.stderr
    state: dict[str, Any] = json.loads(out.stdout.split(" ", 1)[1])
    return state


def test_mps_on_8_gpus_with_4_replicas_renamed(make_node: Any, short_tmp: Path) -> None:
    node = mps_node(make_node, short_tmp)
    devices = node.wait_devices(MPS_RES, count=32, timeout=60)
    assert f"{G0}::3" in devices and not node.devices("nvidia.com/gpu")
    # The daemon's defaults, as NVIDIA's sets them: 100/4 % of the SMs, memory/4 per GPU (80 GiB H100).
    answers = control(node, "get_default_active_thread_percentage\nget_default_device_pinned_mem_limit 0\n"
                            "get_default_device_pinned_mem_limit 7\n")
    assert answers.stdout.split() == ["25.0", "20389M", "20389M"], answers
    daemon = mps_state(node)["daemons"][0]
    assert (daemon["resource"], daemon["up"], daemon["ready"], daemon["active_thread_percentage"]) == (
        MPS_RES, True, True, 25)
    assert daemon["pinned_mem_limits"] == [f"{i}=20389M" for i in range(8)]
    smi = (short_tmp / "smi.log").read_text().splitlines()
    assert len(smi) == 8 and all(line.endswith(" EXCLUSIVE_PROCESS") for line in smi)
    answer = node.lt.run(node.sim.allocate(MPS_RES, [f"{G0}::1"]))
    assert dict(answer.envs) == {"CUDA_MPS_PIPE_DIRECTORY": f"{short_tmp}/mps/{MPS_RES}/pipe",
                                 "NVIDIA_VISIBLE_DEVICES": G0}
    assert [(m.container_path, m.host_path) for m in answer.mounts] == [
        (f"{short_tmp}/mps/{MPS_RES}/pipe", f"{short_tmp}/mps/{MPS_RES}/pipe"), ("/dev/shm", f"{short_tmp}/mps/shm")]


def test_a_killed_daemon_makes_its_replicas_unhealthy_until_it_is_back(make_node: Any, short_tmp: Path) -> None:
    node = mps_node(make_node, short_tmp)
    node.wait_devices(MPS_RES, count=32, timeout=60)
    first = daemon_pid(node)
    os.kill(first, signal.SIGKILL)
    node.wait_devices(MPS_RES, count=32, healthy=0, timeout=30)
    node.wait_devices(MPS_RES, count=32, timeout=60)
    assert daemon_pid(node) not in (0, first)
    daemon = mps_state(node)["daemons"][0]
    assert (daemon["ready"], daemon["restarts"], daemon["last_error"]) == (True, 1, "")
    assert "is gone" in node.procs.log("mps-control")


def test_a_refusing_daemon_is_never_offered_and_is_retried(make_node: Any, short_tmp: Path) -> None:
    node = mps_node(make_node, short_tmp, fault="refuse")

    def refused() -> dict[str, Any] | None:
        daemons = mps_state(node)["daemons"]
        return daemons[0] if daemons and "refused" in daemons[0]["last_error"] else None

    daemon = wait_until(refused, 60, "mps.state saying the daemon refused its limits")
    assert not daemon["ready"] and not node.devices(MPS_RES)
    (short_tmp / "mps-fault").write_text("")
    node.wait_devices(MPS_RES, count=32, timeout=90)


def test_a_daemon_that_crashes_while_configured_is_retried(make_node: Any, short_tmp: Path) -> None:
    node = mps_node(make_node, short_tmp, fault="crash")

    def lost() -> dict[str, Any] | None:
        daemons = mps_state(node)["daemons"]
        return daemons[0] if daemons and "Lost connection" in daemons[0]["last_error"] else None

    daemon = wait_until(lost, 60, "mps.state saying the daemon was lost while being configured")
    assert not daemon["ready"] and not daemon["up"] and not node.devices(MPS_RES)
    # A crashed daemon's leftovers are removed (a retry may already have made new ones, hence a
    # wait: without the clean-up the dead daemon's control socket would stay for good).
    wait_until(lambda: not (pipe(node) / "control").exists(), 30, "the crashed daemon's control socket removed")
    (short_tmp / "mps-fault").write_text("")
    node.wait_devices(MPS_RES, count=32, timeout=90)


def test_a_gpu_fault_marks_its_mps_replicas(make_node: Any, short_tmp: Path) -> None:
    node = mps_node(make_node, short_tmp)
    node.wait_devices(MPS_RES, count=32, timeout=60)
    node.inject("xid", G0, "79")
    wait_until(lambda: {h for d, h in node.devices(MPS_RES).items() if d.startswith(G0)} == {"Unhealthy"}, 30,
               "the replicas of the faulty GPU Unhealthy")
    assert sum(h == "Healthy" for h in node.devices(MPS_RES).values()) == 28


def test_mps_beside_time_slicing_on_other_gpus(make_node: Any, short_tmp: Path) -> None:
    config = ("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 2, "
              "devices: [4, 5, 6, 7]}\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, rename: "
              "nvidia.com/gpu-mps, replicas: 3, devices: [0, 1, 2, 3]}\n")
    node = mps_node(make_node, short_tmp, config=config)
    node.wait_devices(MPS_RES, count=12, timeout=60)
    node.wait_devices("nvidia.com/gpu", count=8)
    assert control(node, "get_default_active_thread_percentage\n").stdout.split() == ["33.0"]
    assert len((short_tmp / "smi.log").read_text().splitlines()) == 4  # only the MPS GPUs change compute mode
    sliced = node.lt.run(node.sim.allocate("nvidia.com/gpu", [next(iter(node.devices("nvidia.com/gpu")))]))
    assert "CUDA_MPS_PIPE_DIRECTORY" not in sliced.envs and not sliced.mounts


def test_sigterm_quits_the_daemon_and_removes_its_pipe_dir(make_node: Any, short_tmp: Path) -> None:
    node = mps_node(make_node, short_tmp)
    node.wait_devices(MPS_RES, count=32, timeout=60)
    pid = daemon_pid(node)
    assert node.procs.stop(node.services["mps-control"], timeout=30) == 0
    assert not pipe(node).exists()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert [line.split()[1] for line in (short_tmp / "smi.log").read_text().splitlines()[8:]] == ["DEFAULT"] * 8
    # Its replicas stay listed, Unhealthy: the last mps.state said the daemon is down.
    node.wait_devices(MPS_RES, count=32, healthy=0, timeout=30)


def test_without_mps_the_program_exits_0_at_once(procs: Any, short_tmp: Path) -> None:
    p = procs.start("mps-control", "mps-control", env={"GPU_PLUGIN_RUN_DIR": str(short_tmp / "r")})
    assert p.wait(60) == 0
    assert "sharing.mps is not configured: nothing to do" in procs.log("mps-control")
    assert not (short_tmp / "r").exists()  # not even the run dir: nothing was started


def test_mps_without_the_mps_binary_ends_permanently(procs: Any, short_tmp: Path) -> None:
    config = short_tmp / "config.yaml"
    config.write_text(MPS_RENAMED)
    env = {**mps_env(short_tmp, fake=False), "CONFIG_FILE": str(config), "GPU_PLUGIN_RUN_DIR": str(short_tmp / "r"),
           "DRIVER_ROOT_CTR_PATH": str(short_tmp / "no-driver")}
    p = procs.start("mps-control", "mps-control", env=env)
    assert p.wait(60) == EX_CONFIG
    last = procs.log("mps-control").strip().splitlines()[-1]
    assert "nvidia-cuda-mps-control is not on PATH" in last, last


def test_quick_failures_become_permanent_on_the_third(procs: Any, short_tmp: Path) -> None:
    # supervisord restarts mps-control without end (startsecs=0): it gives up itself, as FATAL would.
    config = short_tmp / "config.yaml"
    config.write_text(MPS_RENAMED)
    run_dir = short_tmp / "r"
    (run_dir / "mps.sock" / "blocked").mkdir(parents=True)  # its bus socket cannot be bound
    env = {**mps_env(short_tmp), "CONFIG_FILE": str(config), "GPU_PLUGIN_RUN_DIR": str(run_dir)}
    codes = [procs.start(f"mps-control-{i}", "mps-control", env=env).wait(60) for i in range(3)]
    assert codes == [1, 1, EX_CONFIG], codes
    last = procs.log("mps-control-2").strip().splitlines()[-1]
    assert "failed 3 times in a row within 10 s of its start" in last, last


def test_a_stale_pid_file_never_adopts_or_kills_another_process(tmp_path: Path) -> None:
    """The pid file lies on the host and outlives the container: its pid may be anyone's now."""
    import asyncio

    from common.bus.messages import DeviceState
    from common.settings import SharedResource, resolve
    from services.mps_control import control

    env = {"GPU_PLUGIN_MPS_CONTAINER_ROOT": str(tmp_path), "FAKE_MPS_FAULT_FILE": str(tmp_path / "fault")}
    settings = resolve(environ=env)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        pipe_dir = Path(control.pipe_dir(str(tmp_path), "nvidia.com/gpu"))
        pipe_dir.mkdir(parents=True)
        (pipe_dir / control.PID_FILE).write_text(f"{bystander.pid}\n")  # left by a killed container
        gpu = DeviceState(id="GPU-0", kind="gpu", index="0", name="x", health="Healthy", reason="", since=0,
                          memory_mb=80000)
        fake = REPO / "devtools" / "fake_mps"
        daemon = control.Daemon("nvidia.com/gpu", SharedResource("nvidia.com/gpu", "", 2, None), [gpu], settings,
                                str(fake / "nvidia-cuda-mps-control"), str(fake / "nvidia-smi"))
        old = dict(os.environ)
        os.environ.update(env)
        try:
            asyncio.run(daemon.check())
            assert daemon.state.ready and daemon.state.pid != bystander.pid, "a daemon of its own was started"
            asyncio.run(daemon.stop())
        finally:
            os.environ.clear()
            os.environ.update(old)
        assert bystander.poll() is None, "the process that got the stale pid must be left alone"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_daemon_left_by_a_killed_mps_control_ends_with_its_directory(make_node: Any, short_tmp: Path) -> None:
    """The daemon outlives mps-control (a real one keeps its clients running and is adopted later), but
    the fake's must not outlive its test: it ends once its pipe directory is removed."""
    node = mps_node(make_node, short_tmp)
    node.wait_devices(MPS_RES, count=32, timeout=60)
    pid = daemon_pid(node)
    node.services["mps-control"].kill()
    node.services["mps-control"].wait()
    assert alive(pid) and control(node, "get_default_active_thread_percentage\n").stdout.split() == ["25.0"]
    shutil.rmtree(short_tmp / "mps")
    wait_until(lambda: not alive(pid), 10, "the orphaned daemon gone with its directory")


def test_an_mps_root_that_is_not_the_hosts_is_refused(procs: Any, short_tmp: Path) -> None:
    """Without the host's MPS root mounted, the pipes would stay in the container: refused at start."""
    config = short_tmp / "config.yaml"
    config.write_text(MPS_RENAMED)
    env = {**mps_env(short_tmp), "MPS_ROOT": "/run/nvidia/mps", "CONFIG_FILE": str(config),
           "GPU_PLUGIN_RUN_DIR": str(short_tmp / "run")}
    p = procs.start("mps-control", "mps-control", env=env)
    assert p.wait(30) == EX_CONFIG
    assert "is not a mount of the host's MPS root /run/nvidia/mps" in procs.log("mps-control")
