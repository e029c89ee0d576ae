"""MPS in NVIDIA's layout: `mps-control-daemon` (its own pod under NVIDIA's chart and the GPU
Operator) runs the daemons, and the plugin's mps-control (GPU_PLUGIN_MPS_DAEMON=external, what
`nvidia-device-plugin` sets) only watches them. Real processes: the daemon program on the
simulated NVML with the fake nvidia-cuda-mps-control and nvidia-smi (devtools/fake_mps) first on
PATH, and beside it the three services, mps-control and the kubelet simulator, sharing one MPS
root as the two pods share the host's. `mount-shm` with a recording `mount` first on PATH (a
real mount needs privileges) and, for the unmount of an earlier mount, with its mount call and
mount table given to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.mps import DAEMON_ENV, EXTERNAL
from devtools.devstack import spawn, stack_env
from services.mps_control.nvidia_daemon import SHM_OPTIONS, MountError, is_mount_point, mount_shm
from tests.conftest import BIN, Procs, wait_until
from tests.integration.node import Node
from tests.integration.test_mps import (
    FAKE_MPS,
    G0,
    MPS_RENAMED,
    MPS_RES,
    alive,
    control,
    mps_env,
    mps_state,
    start_fake_daemon,
)

MPS_2 = MPS_RENAMED.replace("replicas: 4", "replicas: 2")
NO_MPS = "version: v1\n"


def root(tmp: Path) -> Path:
    return tmp / "mps"


def started(tmp: Path, resource: str = MPS_RES) -> Path:
    return root(tmp) / resource / ".started"


def pipe_of(tmp: Path, resource: str = MPS_RES) -> Path:
    return root(tmp) / resource / "pipe"


def fake_daemon_pid(tmp: Path) -> int:
    try:
        return int((pipe_of(tmp) / "nvidia-cuda-mps-control.pid").read_text())
    except (OSError, ValueError):
        return 0


def daemon_starts(tmp: Path) -> int:
    """How many fake control daemons were started on the resource's pipe (their log outlives them)."""
    log = root(tmp) / MPS_RES / "log" / "control.log"
    return log.read_text().count("starting control daemon") if log.exists() else 0


def smi_calls(tmp: Path) -> list[str]:
    log = tmp / "smi.log"
    return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


class DaemonPod:
    """`mps-control-daemon` as its DaemonSet runs it: its own run dir, the MPS root shared with the
    plugin's pod, the config file of its config-manager (rewritten to change it)."""

    def __init__(self, procs: Procs, tmp: Path, config: str | None = MPS_RENAMED) -> None:
        self.procs, self.tmp = procs, tmp
        self.config = tmp / "daemon-config.yaml"
        (tmp / "mps-fault").touch()
        env = {**mps_env(tmp), "GPU_PLUGIN_RUN_DIR": str(tmp / "daemon-run")}
        if config is not None:
            self.config.write_text(config)
            env["CONFIG_FILE"] = str(self.config)
        # NVIDIA's pod has neither the health-monitor nor our run dir: only NVML (simulated here).
        self.env = stack_env(tmp, **env)
        self.runs = 0
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        # The console script, as the pod's command runs it.
        self.p = spawn([str(BIN / "mps-control-daemon")], self.env, self.tmp / f"daemon-{self.runs}.log")
        self.procs.procs.append((f"daemon-{self.runs}", self.p))
        self.runs += 1
        return self.p

    def log(self) -> str:
        return "".join(self.procs.log(f"daemon-{i}") for i in range(self.runs))

    def configure(self, text: str) -> None:
        """What its config-manager does: the file replaced by a complete one."""
        tmp = self.config.with_suffix(".new")
        tmp.write_text(text)
        tmp.replace(self.config)

    def stop(self) -> int:
        assert self.p is not None
        return self.procs.stop(self.p, timeout=30)


def read_started(tmp: Path) -> dict[str, Any] | None:
    """What `.started` says; None while there is none (a daemon being replaced removes it: between
    a look and a read, too)."""
    try:
        record: dict[str, Any] = json.loads(started(tmp).read_text())
    except FileNotFoundError:
        return None
    return record


def wait_ready(tmp: Path) -> dict[str, Any]:
    record: dict[str, Any] = wait_until(lambda: (root(tmp) / ".ready").exists() and read_started(tmp), 60,
                                        ".ready and .started written")
    return record


def test_mps_control_daemon_runs_the_daemons_where_nvidias_do_and_stops_them_on_sigterm(procs: Procs,
                                                                                       short_tmp: Path) -> None:
    pod = DaemonPod(procs, short_tmp)
    pod.start()
    record = wait_ready(short_tmp)
    gpus = [json.loads(line)["devices"] for line in (root(short_tmp) / ".ready").read_text().splitlines()]
    assert record["devices"] == gpus[0] and len(gpus) == 1 and len(record["devices"]) == 8 and G0 in gpus[0]
    assert (record["resource"], record["replicas"], record["active_thread_percentage"]) == (MPS_RES, 4, 25)
    assert record["pinned_mem_limits"] == [f"{i}=20389M" for i in range(8)]
    # NVIDIA's layout: <root>/<resource>/pipe and log, the daemon configured as NVIDIA's configures it.
    assert (pipe_of(short_tmp) / "control").exists() and (root(short_tmp) / MPS_RES / "log" / "control.log").exists()
    env = {**pod.env, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_of(short_tmp))}
    answers = subprocess.run([str(FAKE_MPS / "nvidia-cuda-mps-control")], input="get_default_active_thread_percentage\n"
                             "get_default_device_pinned_mem_limit 7\n", env=env, capture_output=True, text=True,
                             timeout=30)
    assert answers.stdout.split() == ["25.0", "20389M"], answers
    assert smi_calls(short_tmp) == ["EXCLUSIVE_PROCESS"] * 8
    pid = fake_daemon_pid(short_tmp)
    assert pod.stop() == 0
    assert not alive(pid), "SIGTERM quits the daemons"
    assert not (root(short_tmp) / ".ready").exists() and not started(short_tmp).exists()
    assert not pipe_of(short_tmp).exists()
    assert smi_calls(short_tmp)[8:] == ["DEFAULT"] * 8
    assert "mps-control-daemon stopped" in pod.log()


def test_a_killed_daemon_is_restarted_and_its_ready_files_follow_it(procs: Procs, short_tmp: Path) -> None:
    pod = DaemonPod(procs, short_tmp)
    pod.start()
    wait_ready(short_tmp)
    first = fake_daemon_pid(short_tmp)
    seen: set[tuple[bool, bool]] = set()

    def back() -> bool:
        seen.add(((root(short_tmp) / ".ready").exists(), started(short_tmp).exists()))
        return fake_daemon_pid(short_tmp) not in (0, first) and started(short_tmp).exists() and (
            root(short_tmp) / ".ready").exists()

    os.kill(first, signal.SIGKILL)
    wait_until(back, 60, "a new daemon, configured, and the ready files again")
    assert (False, False) in seen, "both ready files are taken away while the daemon is down (1 s at least)"
    assert "is gone" in pod.log()
    assert daemon_starts(short_tmp) == 2
    assert control_answer(pod, short_tmp) == "25.0"
    assert pod.stop() == 0


def control_answer(pod: DaemonPod, tmp: Path) -> str:
    env = {**pod.env, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_of(tmp))}
    out = subprocess.run([str(FAKE_MPS / "nvidia-cuda-mps-control")], input="get_default_active_thread_percentage\n",
                         env=env, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def test_without_sharing_mps_it_waits_and_follows_its_config(procs: Procs, short_tmp: Path) -> None:
    """NVIDIA's waits indefinitely without MPS (a DaemonSet container that exits is restarted forever),
    with `/mps/.ready` written: nothing to start, all of it started; a config given later by its
    config-manager starts the daemons, and one without MPS stops them."""
    pod = DaemonPod(procs, short_tmp, config=NO_MPS)
    p = pod.start()
    wait_until(lambda: "sharing.mps is not configured: waiting" in pod.log(), 30, "the daemon saying it waits")
    wait_until(lambda: (root(short_tmp) / ".ready").exists(), 30, "an empty .ready")
    assert p.poll() is None and (root(short_tmp) / ".ready").read_text() == ""
    pod.configure(MPS_2)
    assert wait_ready(short_tmp)["replicas"] == 2
    assert control_answer(pod, short_tmp) == "50.0"
    pod.configure(MPS_RENAMED)  # other replicas: the daemon is replaced, configured for 4
    wait_until(lambda: (read_started(short_tmp) or {}).get("replicas") == 4, 60, "the daemon replaced for 4 replicas")
    assert control_answer(pod, short_tmp) == "25.0"
    pod.configure(NO_MPS)
    wait_until(lambda: not pipe_of(short_tmp).exists() and (root(short_tmp) / ".ready").exists()
               and (root(short_tmp) / ".ready").read_text() == "", 60, "the daemon stopped, nothing left to start")
    assert p.poll() is None, "still waiting for a config with MPS"
    assert pod.stop() == 0
    assert not (root(short_tmp) / ".ready").exists(), "removed at the end, as NVIDIA's stopDaemons does"


def test_without_any_config_it_waits_until_sigterm(procs: Procs, short_tmp: Path) -> None:
    pod = DaemonPod(procs, short_tmp, config=None)
    p = pod.start()
    wait_until(lambda: "sharing.mps is not configured: waiting" in pod.log(), 30, "the daemon saying it waits")
    assert p.poll() is None
    assert pod.stop() == 0


def test_a_bad_config_ends_it_with_the_cause(procs: Procs, short_tmp: Path) -> None:
    pod = DaemonPod(procs, short_tmp, config=MPS_RENAMED.replace("replicas: 4", "replicas: 1"))
    assert pod.start().wait(30) == 1
    assert pod.log().strip().splitlines()[-1].startswith("mps-control-daemon: cannot start: ")


# -- the plugin in NVIDIA's layout --------------------------------------------------------------

def external_node(make_node: Any, short_tmp: Path, config: str = MPS_RENAMED, **env: str) -> Node:
    node: Node = make_node(config=config, **mps_env(short_tmp), **{DAEMON_ENV: EXTERNAL}, **env)
    node.start("mps-control")
    return node


def waiting_for(node: Node, text: str) -> dict[str, Any] | None:
    daemons = mps_state(node)["daemons"]
    return daemons[0] if daemons and text in daemons[0]["last_error"] else None


def test_the_plugin_serves_the_replicas_only_while_the_external_daemon_is_ready(make_node: Any, procs: Procs,
                                                                                short_tmp: Path) -> None:
    node = external_node(make_node, short_tmp)
    state = wait_until(lambda: waiting_for(node, "waiting for mps-control-daemon"), 60, "mps-control waiting")
    assert not state["ready"] and not node.devices(MPS_RES)
    assert not pipe_of(short_tmp).exists() and not smi_calls(short_tmp), "the plugin's pod runs no daemon"
    pod = DaemonPod(procs, short_tmp)
    pod.start()
    node.wait_devices(MPS_RES, count=32, timeout=60)
    answer = node.lt.run(node.sim.allocate(MPS_RES, [f"{G0}::1"]))
    assert dict(answer.envs) == {"CUDA_MPS_PIPE_DIRECTORY": f"{short_tmp}/mps/{MPS_RES}/pipe",
                                 "NVIDIA_VISIBLE_DEVICES": G0}
    daemon = mps_state(node)["daemons"][0]
    assert (daemon["ready"], daemon["active_thread_percentage"], daemon["pid"]) == (True, 25, 0)
    assert daemon["pinned_mem_limits"] == [f"{i}=20389M" for i in range(8)]
    # Its pod stops: the replicas stay listed, Unhealthy, until it is back.
    assert pod.stop() == 0
    node.wait_devices(MPS_RES, count=32, healthy=0, timeout=30)
    pod.start()
    node.wait_devices(MPS_RES, count=32, timeout=60)
    assert daemon_starts(short_tmp) == 2, "only mps-control-daemon ever started a daemon"
    assert smi_calls(short_tmp) == ["EXCLUSIVE_PROCESS"] * 8 + ["DEFAULT"] * 8 + ["EXCLUSIVE_PROCESS"] * 8
    # The plugin's mps-control stops without touching the daemon, which keeps serving its clients.
    pid = fake_daemon_pid(short_tmp)
    assert node.procs.stop(node.services["mps-control"], timeout=30) == 0
    assert alive(pid) and control(node, "get_default_active_thread_percentage\n").stdout.split() == ["25.0"]
    assert started(short_tmp).exists() and (root(short_tmp) / ".ready").exists()
    assert pod.stop() == 0


def test_a_daemon_pod_killed_outright_is_found_by_its_probe(make_node: Any, procs: Procs, short_tmp: Path) -> None:
    """SIGKILL to the daemon's pod leaves its files behind: the daemon's silence on its pipe tells,
    at the next probe (every second here, not every 10 s)."""
    node = external_node(make_node, short_tmp, GPU_PLUGIN_MPS_PROBE_INTERVAL="1s")
    pod = DaemonPod(procs, short_tmp)
    p = pod.start()
    node.wait_devices(MPS_RES, count=32, timeout=60)
    pid = fake_daemon_pid(short_tmp)
    p.kill()
    p.wait()
    os.kill(pid, signal.SIGKILL)  # the container's processes die with it
    node.wait_devices(MPS_RES, count=32, healthy=0, timeout=30)
    assert started(short_tmp).exists(), "the files stay: only the probe could tell"
    assert "does not answer" in mps_state(node)["daemons"][0]["last_error"]
    pod.start()  # the pod again: a new daemon, new files, probed at once
    node.wait_devices(MPS_RES, count=32, timeout=60)
    assert daemon_starts(short_tmp) == 2
    assert pod.stop() == 0


def test_a_daemon_serving_another_config_is_not_taken_for_ours(make_node: Any, procs: Procs, short_tmp: Path) -> None:
    """The two pods' config-managers switch at different times: a daemon set up for 2 replicas would
    give each of our 4 half a GPU. Its replicas wait until the daemon's pod has the same config."""
    node = external_node(make_node, short_tmp)
    pod = DaemonPod(procs, short_tmp, config=MPS_2)
    pod.start()
    assert wait_ready(short_tmp)["replicas"] == 2
    state = wait_until(lambda: waiting_for(node, "serves another configuration"), 60, "the mismatch reported")
    assert not state["ready"] and not node.devices(MPS_RES)
    pod.configure(MPS_RENAMED)
    node.wait_devices(MPS_RES, count=32, timeout=60)
    assert pod.stop() == 0


def test_an_empty_started_file_as_nvidias_daemon_writes_is_checked_by_the_daemons_answer(
        make_node: Any, short_tmp: Path) -> None:
    """NVIDIA's own mps-control-daemon writes `.started` empty: what its daemon answers is all there is."""
    node = external_node(make_node, short_tmp)
    pid = start_fake_daemon(pipe_of(short_tmp))
    try:
        assert control(node, "set_default_active_thread_percentage 50\n").returncode == 0  # set up for 2 replicas
        started(short_tmp).write_bytes(b"")
        wait_until(lambda: waiting_for(node, "gives each client '50.0' % of the SMs, not 25"), 60,
                   "the other percentage reported")
        assert not node.devices(MPS_RES)
        assert control(node, "set_default_active_thread_percentage 25\n").returncode == 0
        replaced = short_tmp / "started.new"
        replaced.write_bytes(b"")
        replaced.replace(started(short_tmp))  # written again, as a daemon's restart does: probed at once
        node.wait_devices(MPS_RES, count=32, timeout=30)
    finally:
        control(node, "quit\n")
        wait_until(lambda: not alive(pid), 30, "the daemon quit")


def test_an_unknown_layout_is_a_bad_setting(procs: Procs, short_tmp: Path) -> None:
    config = short_tmp / "config.yaml"
    config.write_text(MPS_RENAMED)
    env = {**mps_env(short_tmp), "CONFIG_FILE": str(config), "GPU_PLUGIN_RUN_DIR": str(short_tmp / "r"),
           DAEMON_ENV: "nvidia"}
    p = procs.start("mps-control", "mps-control", env=env)
    assert p.wait(30) == 78
    assert "GPU_PLUGIN_MPS_DAEMON='nvidia': must be one of own, external" in procs.log("mps-control")


# -- mount-shm ----------------------------------------------------------------------------------

def recording_tools(tmp: Path, mount_rc: int = 0) -> Path:
    """`mount` and `umount` that record their arguments (a real mount needs privileges)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in ("mount", "umount"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >>"{tmp}/mounts.log"\n'
                        + (f'echo "{name}: permission denied" >&2\nexit {mount_rc}\n' if mount_rc else ""))
        tool.chmod(0o755)
    return bin_dir


def run_mount_shm(tmp: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "GPU_PLUGIN_MPS_CONTAINER_ROOT": str(tmp / "mps")}
    return subprocess.run([str(BIN / "mps-control-daemon"), "mount-shm"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_mount_shm_mounts_nvidias_tmpfs_at_the_mps_root(short_tmp: Path) -> None:
    out = run_mount_shm(short_tmp, recording_tools(short_tmp))
    assert out.returncode == 0, out.stderr
    shm = short_tmp / "mps" / "shm"
    assert (short_tmp / "mounts.log").read_text().splitlines() == [
        f"mount -t tmpfs -o rw,nosuid,nodev,noexec,relatime,size=65536k shm {shm}"]
    assert shm.is_dir() and shm.stat().st_mode & 0o777 == 0o755


def test_a_failed_mount_ends_mount_shm_with_what_mount_said(short_tmp: Path) -> None:
    out = run_mount_shm(short_tmp, recording_tools(short_tmp, mount_rc=32))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].endswith("shm: mount: permission denied"), out.stderr


def test_mount_shm_replaces_an_earlier_mount_instead_of_stacking_one(short_tmp: Path) -> None:
    calls: list[list[str]] = []
    mounted = [True, True, False]  # two tmpfs stacked by earlier runs

    def is_mounted(path: str) -> bool:
        return mounted.pop(0) if len(mounted) > 1 else mounted[0]

    shm = mount_shm(str(short_tmp), calls.append, is_mounted)
    assert [c[0].rsplit("/", 1)[-1] for c in calls] == ["umount", "umount", "mount"]
    assert calls[0][1:] == [shm] and calls[2][1:] == ["-t", "tmpfs", "-o", SHM_OPTIONS, "shm", shm]
    with pytest.raises(MountError, match="still mounted after 8 unmounts"):
        mount_shm(str(short_tmp), calls.append, lambda path: True)


def test_the_mount_table_is_read_with_its_escapes(short_tmp: Path) -> None:
    target = short_tmp / "a dir" / "shm"
    target.mkdir(parents=True)
    table = short_tmp / "mountinfo"
    escaped = str(target).replace(" ", "\\040")
    table.write_text(f"70 48 0:40 / {escaped} rw,nosuid - tmpfs shm rw,size=65536k\n")
    assert is_mount_point(str(target), str(table))
    assert not is_mount_point(str(short_tmp), str(table))
    assert not is_mount_point(str(short_tmp / "missing"), str(table))
    assert is_mount_point("/proc")
