"""`make bench`: the real stack under supervisord on the simulated 8-GPU box, measured from
the kubelet simulator's side. Prints a table and writes bench/results/latest.json.

Figures (p50/p99 where repeated):
  cold start -> registered          supervisord start until the kubelet holds 8 healthy GPUs (the kubelet
                                    simulator started and answering first, as a node's kubelet is: its
                                    own start no longer competes with the pod's for the two cores)
  fault -> Unhealthy at kubelet     `inject xid 79` sent until the kubelet's list shows it
  ... during a subscription flood   the same while a raw XSUB sends subscribe/unsubscribe
                                    frames to the health bus without pause
  kubelet restart -> back           simulator restart until it holds the resource again
  kill -9 plugin-server -> back     SIGKILL until the kubelet holds 8 healthy GPUs again
  ... from a C++ ListAndWatch client     half as many more, seen by a client whose own cost is
                                    small (bench/cpp), on a stream beside the kubelet's
  Allocate, GetPreferredAllocation  the C++ client (bench/cpp, Debian's libgrpc++) on the plugin
                                    socket, next to two floors: the no-op PreStartContainer on our
                                    server (Python gRPC's own round trip) and a C++ no-op server (the
                                    client and the transport); and the Python client, as the kubelet
                                    simulator sees them
  memory                            PSS of supervisord and every child
  idle CPU                          CPU time of each process over an idle window
  wake-ups at idle                  context switches of every thread of each process over that window
  pod termination                   SIGTERM to the entry point (PID 1) until it exited, each stack
  node label -> new device list     bench/per_node_config.py: and the kube-agent's memory and idle CPU
  node health in the API            bench/node_health.py: XID 79 -> GPUUnhealthy condition and Event at the
                                    API server, API writes per minute under an XID storm
  DRA                               bench/dra.py: DRA on for 4 of the 8 GPUs: XID 79 -> device taint in the
                                    ResourceSlice at the API server and recovery, NodePrepareResources p50/p99,
                                    slices deleted -> republished, the dra-plugin's memory
  fault path, hop by hop            bench/fault_path.py (with the C++ client): injected -> the monitor's state
                                    sent -> a plain bus reader / the C++ client, and ZeroMQ's own floor here
  at scale                          bench/scale.py: 1024 replicas and 56 MIG devices, figures with targets

Every figure is printed with the target issue 14 set for it, or issue 21 where it set a new one
(met / MISSED).

Usage: python bench/run.py [--injections 200] [--allocations 2000] [--idle 60]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.bus.messages import HEALTH_SOCKET
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from devtools.bus_flood import SubscriptionFlood
from devtools.devstack import PROGRAMS, RESOURCE, DevStack
from devtools.nvml_sim import SIM_CONTROL_SOCKET, FaultClient

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": pct(samples, 50), "p99": pct(samples, 99), "max": max(samples),
            "mean": statistics.fmean(samples)}


def held(stack: DevStack, timeout: float = 30.0, **cond: Any) -> dict[str, Any]:
    reply = stack.kubelet.wait(RESOURCE, timeout=timeout, **({"allocatable": 8, "connected": True} | cond))
    if not reply["ok"]:
        raise RuntimeError(f"condition {cond} not reached: {reply['state']}\n{stack.logs()}")
    return reply


def registrations(stack: DevStack) -> int:
    return sum(1 for r in stack.kubelet.state()["registrations"] if r["ok"])


def pids(stack: DevStack) -> dict[str, int]:
    assert stack.supervisord is not None
    out = {"entrypoint": stack.supervisord.pid, "supervisord": stack.supervisord_pid()}
    for p in (*PROGRAMS, "watchdog"):
        out[p] = stack.pid(p)
    return out


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wakeups(pid: int) -> int:
    """Context switches of every thread of `pid` so far: each is a wake-up (or a preemption)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except OSError:
            continue  # a thread that ended meanwhile
    return total


def terminate(stack: DevStack) -> float:
    """Pod termination: SIGTERM to the entry point, as the kubelet sends it, until it exited 0."""
    assert stack.supervisord is not None
    t0 = time.perf_counter()
    stack.supervisord.send_signal(signal.SIGTERM)
    code = stack.supervisord.wait(60)
    elapsed = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"the entry point exited {code} after SIGTERM\n{stack.logs()}")
    return elapsed


def bench_faults(stack: DevStack, victims: list[tuple[str, str]], per_gpu: int, total: int, n: int,
                 watcher: StreamWatcher | None = None) -> tuple[list[float], list[float]]:
    """XID 79 on a GPU (victims: GPU UUID, an ID of it that the kubelet lists) until the kubelet
    sees that ID Unhealthy, and until the C++ watcher does (empty without it); checks that
    exactly the GPU's `per_gpu` IDs went; recovers it."""
    faults = FaultClient(stack.run_dir / SIM_CONTROL_SOCKET)
    out: list[float] = []
    seen: list[float] = []
    for i in range(n):
        gpu, watched = victims[i % len(victims)]
        t0 = time.time()
        faults.send({"op": "xid", "uuid": gpu, "xid": 79})
        reply = stack.kubelet.wait(RESOURCE, device=watched, health="Unhealthy", timeout=10)
        if not reply["ok"]:
            raise RuntimeError(f"{watched} never turned Unhealthy\n{stack.logs()}")
        out.append(reply["at"] - t0)
        at = watcher.first(t0, watched, unhealthy=True) if watcher is not None else None
        if at is not None:
            seen.append(at - t0)
        left = reply["state"]["resources"][RESOURCE]["allocatable"]
        if left != total - per_gpu:
            raise RuntimeError(f"XID 79 on {gpu}: {total - left} IDs Unhealthy, expected {per_gpu}")
        faults.send({"op": "recover", "uuid": gpu})
        if not stack.kubelet.wait(RESOURCE, allocatable=total, timeout=10)["ok"]:
            raise RuntimeError(f"{gpu} never recovered\n{stack.logs()}")
        if watcher is not None:
            watcher.first(t0, watched, unhealthy=False)
    return out, seen


def bench_faults_flooded(stack: DevStack, ids: list[str], n: int) -> tuple[list[float], int]:
    """bench_faults while a client floods the health bus with subscriptions; also the frames sent."""
    with SubscriptionFlood(stack.run_dir / HEALTH_SOCKET) as flood:
        samples, _ = bench_faults(stack, [(i, i) for i in ids], 1, len(ids), n)
    return samples, flood.sent


def bench_rpc(socket: Path, ids: list[str], n: int) -> tuple[list[float], list[float], dict[int, list[float]]]:
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = pb_grpc.DevicePluginStub(channel)
        alloc: list[float] = []
        for i in range(n):
            req = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[ids[i % 8]])])
            t0 = time.perf_counter()
            stub.Allocate(req)
            alloc.append(time.perf_counter() - t0)
        noop: list[float] = []  # the floor: a gRPC round trip that does nothing
        for _ in range(n):
            t0 = time.perf_counter()
            stub.PreStartContainer(pb.PreStartContainerRequest())
            noop.append(time.perf_counter() - t0)
        preferred: dict[int, list[float]] = {}
        for size in range(1, 9):
            req2 = pb.PreferredAllocationRequest(container_requests=[pb.ContainerPreferredAllocationRequest(
                available_deviceIDs=ids, must_include_deviceIDs=[], allocation_size=size)])
            samples = []
            for _ in range(max(50, n // 10)):
                t0 = time.perf_counter()
                stub.GetPreferredAllocation(req2)
                samples.append(time.perf_counter() - t0)
            preferred[size] = samples
    return alloc, noop, preferred


HERE = Path(__file__).resolve().parent
CPP_CLIENT = HERE / "cpp" / "build" / "client"


@functools.cache
def cpp_client() -> Path | None:
    """The C++ client, brought up to date once (`make -C bench/cpp`); None without libgrpc++-dev."""
    subprocess.run(["make", "-C", str(HERE / "cpp")], capture_output=True, check=False)
    return CPP_CLIENT if CPP_CLIENT.exists() else None


def bench_rpc_cpp(socket: Path, ids: list[str], n: int) -> dict[str, Any] | None:
    """Allocate, the no-op PreStartContainer and GetPreferredAllocation 1, 2, 4, 8 timed by the
    C++ client, whose own cost per call is small: the server's figure. None without the client."""
    client = cpp_client()
    if client is None:
        return None
    out = subprocess.run([str(client), "client", str(socket), str(n), *ids], capture_output=True, text=True,
                         timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the C++ client failed: {out.stderr[-2000:]}")
    raw = json.loads(out.stdout)
    return {"allocate": summary(raw["allocate"]), "noop": summary(raw["noop"]),
            "preferred": {size: summary(s) for size, s in raw["preferred"].items()}}


def cpp_floor(ids: list[str], n: int) -> dict[str, Any] | None:
    """The same client against a C++ server that answers every call with nothing: what the client
    and the transport cost here, the least any server could show."""
    client = cpp_client()
    if client is None:
        return None
    with tempfile.TemporaryDirectory(prefix="gp-floor-") as tmp:
        sock = Path(tmp) / "noop.sock"
        server = subprocess.Popen([str(client), "serve", str(sock)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            return bench_rpc_cpp(sock, ids, n)
        finally:
            server.kill()
            server.wait()


class StreamWatcher:
    """A C++ ListAndWatch client on a plugin socket (beside the kubelet's stream): the arrival time
    of every update and the IDs it lists Unhealthy."""

    def __init__(self, socket: Path) -> None:
        client = cpp_client()
        self.updates: list[tuple[float, set[str]]] = []
        self._changed = threading.Condition()
        self._proc = None if client is None else subprocess.Popen(
            [str(client), "watch", str(socket)], stdout=subprocess.PIPE, text=True)
        if self._proc is not None:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            at, *unhealthy = line.split()
            with self._changed:
                self.updates.append((float(at), set(unhealthy)))
                self._changed.notify_all()
        with self._changed:  # ended: nobody waits for it any longer
            self._changed.notify_all()

    def first(self, after: float, device: str, unhealthy: bool, timeout: float = 10.0) -> float | None:
        """The arrival time of the first update after `after` that lists `device` (un)healthy."""
        if self._proc is None:
            return None

        def found() -> float | None:
            return next((at for at, bad in self.updates if at >= after and (device in bad) == unhealthy), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._proc is None or self._proc.poll() is not None,
                                   timeout)
            return found()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()


# Issue 14's targets, and issue 21's where it set new ones (cold start, fault, PSS): (figure,
# percentile, bound); seconds, MB or % of a core.
TARGETS: dict[str, tuple[str, float]] = {
    "cold start": ("", 0.25),
    "fault p50": ("p50", 0.0006),
    "fault p99": ("p99", 0.002),
    "rpc p50": ("p50", 0.0002),
    "rpc p99": ("p99", 0.001),
    "kubelet restart": ("p50", 0.008),
    "kill -9": ("p50", 1.0),
    "pss": ("", 45.0),
    "idle cpu": ("", 0.1),
}


def verdict(value: float, target: str) -> str:
    key, bound = TARGETS[target]
    unit = "s" if target in ("cold start", "kill -9") else "MB" if target == "pss" else "%" if target == "idle cpu" \
        else "ms"
    shown = bound * 1000 if unit == "ms" else bound
    goal = f"{key + ' ' if key else ''}<= {shown:g} {unit}"
    return f"{goal:18} {'met' if value <= bound else 'MISSED'}"


def print_table(results: dict[str, Any], idle: float) -> None:
    ms = 1000.0
    print(f"{'figure':50} {'p50':>9} {'p99':>9}   {'target':18} verdict")

    def row(label: str, r: dict[str, float] | None, *targets: str) -> None:
        if r is None:
            print(f"{label:50} (no C++ client: apt-get install libgrpc++-dev protobuf-compiler-grpc pkg-config)")
            return
        marks = "; ".join(verdict(r[TARGETS[t][0]], t) for t in targets)
        print(f"{label:50} {r['p50'] * ms:9.3f} {r['p99'] * ms:9.3f}   {marks or 'information':18} (n={r['n']})")

    print(f"{'cold start -> registered with devices (s)':50} {results['cold_start_s']:9.3f} {'':9}   "
          f"{verdict(results['cold_start_s'], 'cold start')}")
    row("fault -> Unhealthy at the kubelet simulator (ms)", results["fault_to_unhealthy_s"], "fault p50", "fault p99")
    row("fault -> Unhealthy at a C++ ListAndWatch (ms)", results["fault_to_unhealthy_cpp_s"], "fault p50", "fault p99")
    row("fault -> Unhealthy, subscription flood (ms)", results["fault_to_unhealthy_flooded_s"])
    row("kubelet restart -> resource back (ms)", results["kubelet_restart_to_back_s"], "kubelet restart")
    row("kill -9 plugin-server -> back (ms)", results["kill9_plugin_server_to_back_s"], "kill -9")
    cpp, floor = results["cpp_client"], results["cpp_floor"]
    row("Allocate, C++ client (ms)", cpp and cpp["allocate"], "rpc p50", "rpc p99")
    for size, r in (cpp or {}).get("preferred", {}).items():
        row(f"GetPreferredAllocation {size} of 8, C++ client (ms)", r, "rpc p50", "rpc p99")
    row("  floor: no-op PreStartContainer, our server (ms)", cpp and cpp["noop"])
    row("  floor: C++ no-op server, same client (ms)", floor and floor["noop"])
    row("Allocate, Python client (ms)", results["allocate_s"])
    row("Allocate, 8 GPUs x 16 replicas, Python client (ms)", results["allocate_replicas_8x16_s"])
    row("  floor: no-op PreStartContainer, Python client (ms)", results["noop_rpc_s"])
    row("GetPreferredAllocation 4 of 128 replicas, Python (ms)", results["preferred_replicas_8x16_s"]["4"])
    row("SIGTERM -> entry point exited (ms)", results["pod_termination_s"])
    print(f"{'total PSS (MB)':50} {results['pss_total_mb']:9.1f} {'':9}   {verdict(results['pss_total_mb'], 'pss')}  "
          + ", ".join(f"{k} {v / 1024:.1f}" for k, v in results["pss_kb"].items()))
    print(f"{'idle CPU over ' + str(int(idle)) + ' s (% of one core)':50} {results['idle_cpu_percent_total']:9.3f} "
          f"{'':9}   {verdict(results['idle_cpu_percent_total'], 'idle cpu')}  "
          + ", ".join(f"{k} {v:.3f}" for k, v in results["idle_cpu_percent"].items()))
    print(f"{'wake-ups per second at idle, whole stack':50} {sum(results['idle_wakeups_per_s'].values()):9.2f} "
          f"{'':9}   {'information':18} "
          + ", ".join(f"{k} {v:.2f}" for k, v in results["idle_wakeups_per_s"].items()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--injections", type=int, default=200)
    ap.add_argument("--allocations", type=int, default=2000)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--idle", type=float, default=60.0, help="idle CPU window, seconds")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip preferred.py, per_node_config.py, node_health.py, dra.py, fault_path.py and scale.py")
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    terminations: list[float] = []

    # Recovery after each injected fault waits for a probe: probe fast in this stack only.
    stack = DevStack(fleet="dgx-h100-8", env={"HEALTH_PROBE_INTERVAL": "100ms"})
    try:
        stack.start_kubelet()
        stack.kubelet.state()  # up and answering before the pod starts
        t0 = time.time()
        stack.start_supervisor()
        reply = held(stack, timeout=60)
        results["cold_start_s"] = reply["at"] - t0
        ids = list(reply["state"]["resources"][RESOURCE]["devices"])

        victims = [(i, i) for i in ids]  # a whole GPU: injected on it, watched as itself
        results["fault_to_unhealthy_s"] = summary(bench_faults(stack, victims, 1, len(ids), args.injections)[0])
        # A series of its own: a second stream (written beside the kubelet's) and the reader thread
        # here would weigh on the kubelet simulator's figure.
        watcher = StreamWatcher(stack.dp_dir / "nvidia-gpu.sock")
        try:
            _, at_watcher = bench_faults(stack, victims, 1, len(ids), max(1, args.injections // 2), watcher)
        finally:
            watcher.close()
        results["fault_to_unhealthy_cpp_s"] = summary(at_watcher) if at_watcher else None
        flooded, frames = bench_faults_flooded(stack, ids, max(1, args.injections // 4))
        results["fault_to_unhealthy_flooded_s"] = summary(flooded)
        results["flood_frames"] = frames

        restarts = []
        for _ in range(args.restarts):
            before = registrations(stack)
            t0 = time.time()
            stack.kubelet.restart()
            reply = held(stack, registrations=before + 1)
            restarts.append(reply["at"] - t0)
            assert registrations(stack) == before + 1, "exactly one registration per kubelet restart"
        results["kubelet_restart_to_back_s"] = summary(restarts)

        kills = []
        for _ in range(args.kills):
            pid = stack.pid("plugin-server")
            before = registrations(stack)
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            reply = held(stack, timeout=30, registrations=before + 1)
            kills.append(reply["at"] - t0)
            # Three deaths within startsecs would be a crash loop, and supervisord would give up
            # (by design: the pod restarts). Space the kills as independent crashes.
            stack.wait_running()
        results["kill9_plugin_server_to_back_s"] = summary(kills)

        alloc, noop, preferred = bench_rpc(stack.dp_dir / "nvidia-gpu.sock", ids, args.allocations)
        results["allocate_s"] = summary(alloc)
        results["noop_rpc_s"] = summary(noop)
        results["cpp_client"] = bench_rpc_cpp(stack.dp_dir / "nvidia-gpu.sock", ids, args.allocations)
        results["cpp_floor"] = cpp_floor(ids, args.allocations)
        results["preferred_allocation_s"] = {str(k): summary(v) for k, v in preferred.items()}
        terminations.append(terminate(stack))
    finally:
        stack.stop()
        stack.cleanup()

    # Allocate and preferred allocation on 8 GPUs x 16 time-sliced replicas.
    config = RESULTS.parent / "replicas16.yaml"
    stack = DevStack(fleet="dgx-h100-8", env={"CONFIG_FILE": str(config)})
    try:
        stack.start()
        reply = stack.kubelet.wait(RESOURCE, capacity=128, allocatable=128, connected=True, timeout=60)
        if not reply["ok"]:
            raise RuntimeError(f"128 replicas not served: {reply['state']}")
        replicas = list(reply["state"]["resources"][RESOURCE]["devices"])
        alloc, _, shared = bench_rpc(stack.dp_dir / "nvidia-gpu.sock", replicas, args.allocations)
        results["allocate_replicas_8x16_s"] = summary(alloc)
        results["preferred_replicas_8x16_s"] = {str(k): summary(v) for k, v in shared.items()}
        terminations.append(terminate(stack))
    finally:
        stack.stop()
        stack.cleanup()

    # Memory and idle CPU with the shipped defaults.
    stack = DevStack(fleet="dgx-h100-8")
    try:
        stack.start()
        held(stack, timeout=60)
        stack.wait_running()
        procs = pids(stack)
        results["pss_kb"] = {name: pss_kb(pid) for name, pid in procs.items()}
        results["pss_total_mb"] = sum(results["pss_kb"].values()) / 1024
        ticks_before = {name: cpu_ticks(pid) for name, pid in procs.items()}
        woken_before = {name: wakeups(pid) for name, pid in procs.items()}
        time.sleep(args.idle)  # the idle window being measured
        ticks_after = {name: cpu_ticks(pid) for name, pid in procs.items()}
        results["idle_wakeups_per_s"] = {name: (wakeups(pid) - woken_before[name]) / args.idle
                                         for name, pid in procs.items()}
        results["idle_window_s"] = args.idle
        results["idle_cpu_percent"] = {
            name: 100.0 * (ticks_after[name] - ticks_before[name]) / CLK_TCK / args.idle for name in procs
        }
        results["idle_cpu_percent_total"] = sum(results["idle_cpu_percent"].values())
        terminations.append(terminate(stack))
    finally:
        stack.stop()
        stack.cleanup()

    results["pod_termination_s"] = summary(terminations)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1))
    print_table(results, args.idle)
    print(f"written to {RESULTS / 'latest.json'}")
    if args.no_extras:
        return 0
    print("\npreferred allocation alone (bench/preferred.py), 8 and 16 GPUs:", flush=True)
    here = Path(__file__).resolve().parent
    status = subprocess.call([sys.executable, str(here / "preferred.py")])
    print("\nper-node configuration (bench/per_node_config.py):", flush=True)
    status = status or subprocess.call([sys.executable, str(here / "per_node_config.py")])
    print("\nnode health in the API (bench/node_health.py):", flush=True)
    status = status or subprocess.call([sys.executable, str(here / "node_health.py")])
    print("\nDRA (bench/dra.py):", flush=True)
    status = status or subprocess.call([sys.executable, str(here / "dra.py")])
    if cpp_client() is not None:
        print("\nthe fault path hop by hop, and the bus's floor (bench/fault_path.py):", flush=True)
        status = status or subprocess.call([sys.executable, str(here / "fault_path.py")])
    print("\nat scale (bench/scale.py): 16 GPUs x 64 replicas, 8 GPUs x 7 MIG devices:", flush=True)
    return status or subprocess.call([sys.executable, str(here / "scale.py")])


if __name__ == "__main__":
    sys.exit(main())
