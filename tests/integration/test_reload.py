"""Live reload of the config file: the kubelet sees the new resources, no service restarts."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from tests.conftest import wait_until
from tests.integration.node import Node

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"


def sliced(replicas: int, rename: bool = False) -> str:
    return f"""version: v1
sharing:
  timeSlicing:
    renameByDefault: {str(rename).lower()}
    resources:
    - name: nvidia.com/gpu
      replicas: {replicas}
"""


def write(node: Node, text: str) -> None:
    """As the kube-agent and config-manager do: a new file renamed over the old one."""
    path = Path(node.env["CONFIG_FILE"])
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


def pids(node: Node) -> dict[str, int]:
    return {name: p.pid for name, p in node.services.items() if p.poll() is None}


def status(node: Node) -> str:
    out = node.cli("status", "--timeout", "20")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_time_slicing_replicas_4_to_8_to_off_live(make_node: Any) -> None:
    node = make_node(config=sliced(4))
    before = node.wait_devices(count=32, timeout=30)
    started = pids(node)
    allocated = node.lt.run(node.sim.allocate(GPU, [sorted(before)[0]]))
    write(node, sliced(8))
    devices = node.wait_devices(count=64, timeout=30)
    assert all("::" in i for i in devices)
    write(node, "version: v1\n")
    devices = node.wait_devices(count=8, timeout=30)
    assert all(i.startswith("GPU-") and "::" not in i for i in devices)
    assert pids(node) == started, "no service restarted"
    # The earlier allocation's GPU is still served; nothing was done to what the kubelet holds.
    assert allocated.envs["NVIDIA_VISIBLE_DEVICES"] in devices
    assert "2 reloads applied" in status(node)


def test_renamed_resource_comes_and_goes_with_the_config(make_node: Any) -> None:
    node = make_node(config="version: v1\n")
    node.wait_devices(count=8, timeout=30)
    write(node, sliced(2, rename=True))
    node.wait_devices(SHARED, count=16, timeout=30)
    assert (node.dp / "nvidia-gpu.shared.sock").exists()
    write(node, "version: v1\n")
    wait_until(lambda: not (node.dp / "nvidia-gpu.shared.sock").exists(), 30, "the shared endpoint stopped")
    wait_until(lambda: not node.sim.resources[SHARED].connected, 30, "the kubelet lost the shared resource")
    node.wait_devices(count=8, timeout=30)


def test_bad_config_is_refused_and_the_old_one_keeps_running(make_node: Any, procs: Any) -> None:
    node = make_node(config=sliced(4))
    node.wait_devices(count=32, timeout=30)
    started = pids(node)
    write(node, sliced(0))
    wait_until(lambda: "REFUSED" in status(node), 30, "the refusal on the bus")
    shown = status(node)
    assert "replicas" in shown, shown
    for name in ("plugin-server", "health-monitor"):
        assert "config reload refused, still running the previous config" in procs.log(name)
    assert len(node.devices()) == 32
    assert pids(node) == started
    write(node, sliced(2))
    node.wait_devices(count=16, timeout=30)
    wait_until(lambda: "REFUSED" not in status(node), 30, "the refusal cleared by a good config")


def test_sighup_reloads_and_never_kills(make_node: Any, procs: Any) -> None:
    node = make_node(config=sliced(2))
    node.wait_devices(count=16, timeout=30)
    started = pids(node)
    Path(node.env["CONFIG_FILE"]).write_text(sliced(3))  # in place, as an editor may: SIGHUP is the trigger
    for p in node.services.values():
        os.kill(p.pid, signal.SIGHUP)
    node.wait_devices(count=24, timeout=30)
    wait_until(lambda: all("SIGHUP received" in procs.log(n) for n in started), 30, "every service reloaded")
    assert pids(node) == started


def test_sighup_rereads_a_file_the_watch_cannot_see(make_node: Any, short_tmp: Path) -> None:
    """CONFIG_FILE a symlink into another directory (a hand-made layout): an edit there is not an
    event of the watched directory, so SIGHUP, as NVIDIA's sidecar sends it, is what applies it."""
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "real.yaml").write_text(sliced(2))
    link = short_tmp / "linked.yaml"
    link.symlink_to(elsewhere / "real.yaml")
    node = make_node(CONFIG_FILE=str(link))
    node.wait_devices(count=16, timeout=30)
    (elsewhere / "real.yaml").write_text(sliced(3))
    os.kill(node.services["plugin-server"].pid, signal.SIGHUP)
    node.wait_devices(count=24, timeout=15)  # well inside the 30 s backstop re-read


def test_mig_strategy_change_live(make_node: Any) -> None:
    node = make_node("dgx-h100-8-mig", config="version: v1\nflags:\n  migStrategy: none\n")
    node.wait_devices(count=8, timeout=30)
    write(node, "version: v1\nflags:\n  migStrategy: mixed\n")
    wait_until(lambda: any(r.startswith("nvidia.com/mig-") and v.connected and v.devices
                           for r, v in node.sim.resources.items()), 30, "MIG resources at the kubelet")
    # single cannot be served on a node with MIG and non-MIG GPUs: refused, mixed stays.
    write(node, "version: v1\nflags:\n  migStrategy: single\n")
    wait_until(lambda: "REFUSED" in status(node), 30, "the refusal")
    assert "all GPUs must have MIG enabled" in status(node)
    assert any(r.startswith("nvidia.com/mig-") and v.connected for r, v in node.sim.resources.items())


def test_health_policy_changes_live(make_node: Any) -> None:
    node = make_node(config="version: v1\n")
    devices = node.wait_devices(count=8, timeout=30)
    gpu = sorted(devices)[0]
    write(node, "version: v1\nhealth:\n  xids:\n    fatal: [13]\n")
    wait_until(lambda: "1 reloads applied" in status(node), 30, "the health-monitor applied it")
    node.inject("xid", gpu, "13")  # ignored by default: fatal only by the new config
    node.wait_health(gpu, "Unhealthy", timeout=30)


def _usage(pid: int) -> tuple[int, int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return fds, threads, rss


def test_100_reloads_leak_nothing(make_node: Any) -> None:
    node = make_node(config=sliced(2))
    node.wait_devices(count=16, timeout=30)
    watched = {n: node.services[n].pid for n in ("plugin-server", "health-monitor")}
    for n in (3, 2, 3, 2):  # warm up: every code path once
        write(node, sliced(n))
        node.wait_devices(count=8 * n, timeout=30)
    before = {n: _usage(pid) for n, pid in watched.items()}
    for i in range(100):
        n = 3 if i % 2 == 0 else 2
        write(node, sliced(n))
        node.wait_devices(count=8 * n, timeout=30)
    after = {n: _usage(pid) for n, pid in watched.items()}
    # A leak per reload shows as +100; gRPC's and asyncio's pools may still grow by a thread or two
    # to their bound after the warm-up.
    for name in watched:
        (fds0, threads0, rss0), (fds1, threads1, rss1) = before[name], after[name]
        assert fds1 <= fds0 + 2, f"{name}: fds {fds0} -> {fds1}"
        assert threads1 <= threads0 + 2, f"{name}: threads {threads0} -> {threads1}"
        assert rss1 - rss0 < 8 * 1024, f"{name}: RSS {rss0} -> {rss1} KiB"


def test_a_cdi_strategy_without_the_driver_files_is_refused_not_fatal(make_node: Any, procs: Any) -> None:
    node = make_node(config="version: v1\n")
    node.wait_devices(count=8, timeout=30)
    started = pids(node)
    write(node, "version: v1\nflags:\n  plugin:\n    deviceListStrategy: cdi-annotations\n")
    wait_until(lambda: "REFUSED" in status(node), 30, "the refusal")
    assert pids(node) == started, "a reload never ends a service"
    resp = node.lt.run(node.sim.allocate(GPU, [sorted(node.devices())[0]]))
    assert "NVIDIA_VISIBLE_DEVICES" in resp.envs, "the envvar strategy still answers"


def test_an_endpoint_retired_by_a_reload_is_never_started_again(short_tmp: Path) -> None:
    """The socket watcher may still hold a retired endpoint in its snapshot and ask it to serve."""
    import asyncio
    import dataclasses

    from common.bus.sockets import BusPublisher
    from common.settings import resolve
    from services.plugin_server.server import PluginServer

    settings = dataclasses.replace(resolve(environ={}), device_plugin_dir=short_tmp / "dp", run_dir=short_tmp)

    async def scenario() -> tuple[bool, bool]:
        pub = BusPublisher(short_tmp / "p.sock")
        try:
            ep = PluginServer(settings, pub, short_tmp / "h.sock")._endpoint(SHARED)
            assert await ep.ensure_serving() and ep.path.exists()
            ep.retired = True
            await ep.stop(grace=0)
            return await ep.ensure_serving(), ep.path.exists()
        finally:
            pub.close()

    assert asyncio.run(scenario()) == (False, False)


def _peak_kib(pid: int) -> int:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))


def test_a_fifo_in_place_of_the_config_is_refused_and_a_regular_file_applies_again(
        make_node: Any, procs: Any, short_tmp: Path) -> None:
    """The reload's read blocked on the FIFO; every watchdog then ended its service, and the
    restarted services blocked at start on the same FIFO."""
    node = make_node(config=sliced(4))
    node.wait_devices(count=32, timeout=30)
    started = pids(node)
    fifo = short_tmp / "fifo"
    os.mkfifo(fifo)
    os.replace(fifo, node.env["CONFIG_FILE"])
    wait_until(lambda: "not a regular file (a FIFO)" in status(node), 30, "the refusal naming the FIFO")
    assert len(node.devices()) == 32 and pids(node) == started
    write(node, sliced(2))  # a regular file again: applied, by the same services
    node.wait_devices(count=16, timeout=30)
    wait_until(lambda: "REFUSED" not in status(node), 30, "the refusal cleared")
    assert pids(node) == started


def test_a_1_gib_config_is_refused_without_reading_it(make_node: Any, short_tmp: Path) -> None:
    node = make_node(config=sliced(4))
    node.wait_devices(count=32, timeout=30)
    big = short_tmp / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: reading it whole costs 1 GiB of memory, not of disk
    os.replace(big, node.env["CONFIG_FILE"])
    wait_until(lambda: "larger than 1048576 bytes" in status(node), 30, "the refusal naming the bound")
    for name in ("plugin-server", "health-monitor", "registrar"):
        assert _peak_kib(node.services[name].pid) < 256 * 1024, f"{name} read the file"
    assert len(node.devices()) == 32


def test_a_config_written_in_place_is_applied_only_once_complete(make_node: Any, procs: Any) -> None:
    """A file truncated and rewritten in place can be read half-written and still be valid YAML:
    the first half below is a config of its own (no replicas: 8 devices, not 32)."""
    node = make_node(config=sliced(2))
    node.wait_devices(count=16, timeout=30)
    full = sliced(4)
    half = full[:full.index("sharing:")]  # "version: v1\n": valid, and the default config
    path = node.env["CONFIG_FILE"]
    with open(path, "w") as f:  # same inode: `cat part1 > file; cat part2 >> file` in a shell
        f.write(half)
    # The services see the half (its close is an event) while the writer is not done: either they
    # wait for it to settle, or they apply it and the kubelet gets 8 devices.
    wait_until(lambda: len(node.devices()) != 16 or all(
        "changed in place" in procs.log(n) for n in ("plugin-server", "health-monitor")), 30, "the half noticed")
    assert len(node.devices()) == 16, "half a file was applied"
    with open(path, "a") as f:
        f.write(full[len(half):])
    node.wait_devices(count=32, timeout=30)
    shown = status(node)
    assert "1 reloads applied" in shown and "2 reloads applied" not in shown, shown
