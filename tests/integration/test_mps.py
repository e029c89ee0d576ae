"""MPS served for real: mps-control runs the fake nvidia-cuda-mps-control (devtools/fake_mps,
put first on PATH) beside the three services and the kubelet simulator, all real processes on
real sockets. Scenarios: 8 GPUs x 4 replicas with rename, the daemon's limits, a killed daemon
(replicas Unhealthy at the kubelet, then back), a refusing daemon, a GPU fault, MPS beside
time-slicing, SIGTERM (daemon quit, pipe dir removed), no MPS (exit 0 at once), no binary, a pid
file naming a process that is not our daemon (never adopted nor killed), a daemon left by a
killed mps-control (it ends with its test's directory: nothing outlives the test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import DeviceState
from common.lifecycle import EX_CONFIG
from common.settings import SharedResource, resolve
from services.mps_control import control as mps_control
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


def start_fake_daemon(pipe_dir: Path) -> int:
    """An MPS control daemon of the fake serving `pipe_dir` (not mps-control's); its pid."""
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(pipe_dir.parent)}
    subprocess.run([str(FAKE_MPS / "nvidia-cuda-mps-control"), "-d"], env=env, check=True, timeout=30)
    return int((pipe_dir / mps_control.PID_FILE).read_text())


def execed(argv: list[str], executable: str | None = None) -> subprocess.Popen[bytes]:
    """A process that runs `argv`, returned once it does (until its exec, /proc shows its parent's
    command line, or none)."""
    p = subprocess.Popen(argv, executable=executable)
    wait_until(lambda: Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv],
               10, f"{argv} started")
    return p


def named_like_the_daemon() -> subprocess.Popen[bytes]:
    """A process whose argv[0] is nvidia-cuda-mps-control (anyone may call itself so): a renamed sleep."""
    return execed(["nvidia-cuda-mps-control", "300"], executable=shutil.which("sleep"))


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


def direct_daemon(root: Path) -> mps_control.Daemon:
    """mps-control's Daemon for one GPU with 2 replicas under `root`, driven by the test itself."""
    settings = resolve(environ={"GPU_PLUGIN_MPS_CONTAINER_ROOT": str(root)})
    gpu = DeviceState(id="GPU-0", kind="gpu", index="0", name="x", health="Healthy", reason="", since=0,
                      memory_mb=80000)
    return mps_control.Daemon("nvidia.com/gpu", SharedResource("nvidia.com/gpu", "", 2, None), [gpu], settings,
                              str(FAKE_MPS / "nvidia-cuda-mps-control"), str(FAKE_MPS / "nvidia-smi"))


@pytest.fixture
def bystander(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[int]:
    """The pid of a process that is not this resource's daemon, SIGKILLed at teardown."""
    if request.param == "another MPS daemon":
        # A real control daemon, of another pipe directory (another resource's, or the host's own MPS).
        pid = start_fake_daemon(short_tmp / "other" / "pipe")
        yield pid
        with contextlib.suppress(ProcessLookupError):  # already gone (reaped) if a test killed it
            os.kill(pid, signal.SIGKILL)
        return
    p = execed(["sleep", "300"]) if request.param == "a sleep" else named_like_the_daemon()
    yield p.pid
    p.kill()
    p.wait()


BYSTANDERS = ["a sleep", "named like the daemon", "another MPS daemon"]


@pytest.mark.parametrize("bystander", BYSTANDERS, indirect=True)
def test_a_stale_pid_file_never_adopts_or_kills_another_process(short_tmp: Path, bystander: int) -> None:
    """The pid file lies on the host and outlives the container: its pid may be anyone's now."""
    daemon = direct_daemon(short_tmp)
    pipe_dir = Path(daemon.pipe_dir)
    pipe_dir.mkdir(parents=True)
    (pipe_dir / mps_control.PID_FILE).write_text(f"{bystander}\n")  # left by a killed container
    asyncio.run(daemon.check())
    try:
        assert daemon.state.ready and daemon.state.pid != bystander, "a daemon of its own was started"
    finally:
        asyncio.run(daemon.stop())
    assert alive(bystander), "the process that got the stale pid must be left alone"


@pytest.mark.parametrize("bystander", BYSTANDERS[1:], indirect=True)
def test_stop_never_kills_a_process_the_pid_file_names_that_is_not_our_daemon(short_tmp: Path,
                                                                                bystander: int) -> None:
    """The daemon crashed (its pid file stays) and its pid went to another process before the pod stops."""
    daemon = direct_daemon(short_tmp)
    asyncio.run(daemon.check())
    ours = daemon.state.pid
    assert daemon.state.ready and alive(ours)
    os.kill(ours, signal.SIGKILL)
    wait_until(lambda: not alive(ours), 10, "the daemon dead")
    (Path(daemon.pipe_dir) / mps_control.PID_FILE).write_text(f"{bystander}\n")
    asyncio.run(daemon.stop())
    assert alive(bystander), "only our daemon is ever sent quit or SIGKILL"
    assert not Path(daemon.pipe_dir).exists()


def test_the_pid_file_is_read_as_a_file_we_do_not_own(short_tmp: Path) -> None:
    """A FIFO does not block the read, a symlink is not followed (even to our daemon's pid), a large
    file or one without a pid names nobody; each says why."""
    daemon = direct_daemon(short_tmp)
    pipe_dir = Path(daemon.pipe_dir)
    ours = start_fake_daemon(pipe_dir)
    pid_file = pipe_dir / mps_control.PID_FILE
    assert daemon.pid() == ours
    moved = short_tmp / "elsewhere.pid"
    pid_file.rename(moved)
    pid_file.symlink_to(moved)
    assert daemon.pid() == 0
    assert daemon.who() == (0, f"{pid_file}: not a regular file (a symlink)")
    pid_file.unlink()
    pid_file.write_text(f"{ours}".ljust(64))
    assert daemon.pid() == 0
    assert daemon.who() == (0, f"{pid_file}: larger than 32 bytes (64)")
    pid_file.write_text("\uff11\uff12")  # digits (fullwidth), but not ASCII ones: int() would take them
    assert daemon.who()[0] == 0 and "holds no pid" in daemon.who()[1]
    pid_file.unlink()
    os.mkfifo(pid_file)
    answer: list[int] = []
    reader = threading.Thread(target=lambda: answer.append(daemon.pid()), daemon=True)
    reader.start()
    try:
        reader.join(10)
        assert answer == [0], "the read must not block"
        assert daemon.who() == (0, f"{pid_file}: not a regular file (a FIFO)")
    finally:
        if reader.is_alive():  # unblocks a read that waits for a writer (the old read_text did)
            os.close(os.open(pid_file, os.O_WRONLY | os.O_NONBLOCK))
    pid_file.unlink()
    pid_file.write_text(str(ours))
    asyncio.run(daemon.stop())
    wait_until(lambda: not alive(ours), 10, "our daemon quit")


def test_what_the_daemon_check_says_of_each_process(short_tmp: Path) -> None:
    pipe_dir = short_tmp / "mps" / "r" / "pipe"
    ours = start_fake_daemon(pipe_dir)
    other = start_fake_daemon(short_tmp / "other" / "pipe")
    look_alike = named_like_the_daemon()
    sleeper = execed(["sleep", "300"])
    try:
        assert mps_control.not_our_daemon(ours, str(pipe_dir)) == ""
        assert mps_control.not_our_daemon(other, str(pipe_dir)) == (
            f"pid {other} is the nvidia-cuda-mps-control of another pipe directory ({short_tmp}/other/pipe)")
        assert mps_control.not_our_daemon(look_alike.pid, str(pipe_dir)) == (
            f"pid {look_alike.pid} is called nvidia-cuda-mps-control but was not started with a "
            "CUDA_MPS_PIPE_DIRECTORY")
        assert mps_control.not_our_daemon(sleeper.pid, str(pipe_dir)) == (
            f"pid {sleeper.pid} is not nvidia-cuda-mps-control ('sleep 300')")
        sleeper.kill()
        sleeper.wait()
        assert mps_control.not_our_daemon(sleeper.pid, str(pipe_dir)) == f"pid {sleeper.pid} is not running"
    finally:
        for p in (look_alike, sleeper):
            p.kill()
            p.wait()
        for pid in (ours, other):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_daemon_pid_taken_over_by_a_look_alike_is_a_gone_daemon(make_node: Any, short_tmp: Path) -> None:
    """The daemon dies and its pid goes to a process called nvidia-cuda-mps-control: the replicas turn
    Unhealthy (no daemon serves them), a new daemon is started, and the look-alike is left alone."""
    node = mps_node(make_node, short_tmp)
    node.wait_devices(MPS_RES, count=32, timeout=60)
    first = daemon_pid(node)
    impostor = named_like_the_daemon()
    try:
        os.kill(first, signal.SIGKILL)
        # The crash leaves the pid file; pid reuse, simulated, puts the look-alike's pid in it.
        (pipe(node) / mps_control.PID_FILE).write_text(f"{impostor.pid}\n")
        node.wait_devices(MPS_RES, count=32, healthy=0, timeout=30)
        node.wait_devices(MPS_RES, count=32, timeout=60)
        assert daemon_pid(node) not in (0, first, impostor.pid)
        assert "is gone" in node.procs.log("mps-control")
        assert node.procs.stop(node.services["mps-control"], timeout=30) == 0
        assert impostor.poll() is None, "neither the restart nor the stop may kill a process that is not the daemon"
    finally:
        impostor.kill()
        impostor.wait()


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
