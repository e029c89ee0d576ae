"""`make bench`: the real stack under supervisord on the simulated 8-GPU box, measured from
the kubelet simulator's side. Prints a table and writes bench/results/latest.json.

Figures (p50/p99 where repeated):
  cold start -> registered          supervisord start until the kubelet holds 8 healthy GPUs
  fault -> Unhealthy at kubelet     `inject xid 79` sent until the kubelet's list shows it
  ... during a subscription flood   the same while a raw XSUB sends subscribe/unsubscribe
                                    frames to the health bus without pause
  kubelet restart -> back           simulator restart until it holds the resource again
  kill -9 plugin-server -> back     SIGKILL until the kubelet holds 8 healthy GPUs again
  Allocate, GetPreferredAllocation  a kubelet-like gRPC client on the plugin socket
  memory                            PSS of supervisord and every child
  idle CPU                          CPU time of each process over an idle window
  pod termination                   SIGTERM to the entry point (PID 1) until it exited, each stack
  node label -> new device list     bench/per_node_config.py: and the kube-agent's memory and idle CPU
  at scale                          bench/scale.py: 1024 replicas and 56 MIG devices, figures with targets

Usage: python bench/run.py [--injections 200] [--allocations 2000] [--idle 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
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


def bench_faults(stack: DevStack, ids: list[str], n: int) -> list[float]:
    faults = FaultClient(stack.run_dir / SIM_CONTROL_SOCKET)
    out: list[float] = []
    for i in range(n):
        victim = ids[i % len(ids)]
        t0 = time.time()
        faults.send({"op": "xid", "uuid": victim, "xid": 79})
        reply = stack.kubelet.wait(RESOURCE, device=victim, health="Unhealthy", timeout=10)
        if not reply["ok"]:
            raise RuntimeError(f"{victim} never turned Unhealthy")
        out.append(reply["at"] - t0)
        faults.send({"op": "recover", "uuid": victim})
        stack.kubelet.wait(RESOURCE, device=victim, health="Healthy", timeout=10)
    return out


def bench_faults_flooded(stack: DevStack, ids: list[str], n: int) -> tuple[list[float], int]:
    """bench_faults while a client floods the health bus with subscriptions; also the frames sent."""
    with SubscriptionFlood(stack.run_dir / HEALTH_SOCKET) as flood:
        samples = bench_faults(stack, ids, n)
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


NODE_CLIENT = Path(__file__).resolve().parent / "node"
PROTO = Path(__file__).resolve().parents[1] / "protos" / "deviceplugin" / "v1beta1" / "api.proto"


def bench_rpc_node(socket: Path, ids: list[str], n: int) -> dict[str, Any] | None:
    """The same calls from a Node (@grpc/grpc-js) client, whose own cost per call is small: the
    server's figure, where the Python client's mostly measures Python's gRPC round trip. None
    when Node or the client's packages are missing (`make bench` installs them)."""
    if shutil.which("node") is None or not (NODE_CLIENT / "node_modules").is_dir():
        return None
    out = subprocess.run(["node", str(NODE_CLIENT / "client.js"), str(socket), str(PROTO), str(n), *ids],
                         capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the Node client failed: {out.stderr[-2000:]}")
    raw = json.loads(out.stdout)
    return {"allocate": summary(raw["allocate"]), "noop": summary(raw["noop"]),
            "preferred": {size: summary(s) for size, s in raw["preferred"].items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--injections", type=int, default=200)
    ap.add_argument("--allocations", type=int, default=2000)
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--idle", type=float, default=60.0, help="idle CPU window, seconds")
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    terminations: list[float] = []

    # Recovery after each injected fault waits for a probe: probe fast in this stack only.
    stack = DevStack(fleet="dgx-h100-8", env={"HEALTH_PROBE_INTERVAL": "100ms"})
    try:
        t0 = time.time()
        stack.start()
        reply = held(stack, timeout=60)
        results["cold_start_s"] = reply["at"] - t0
        ids = list(reply["state"]["resources"][RESOURCE]["devices"])

        results["fault_to_unhealthy_s"] = summary(bench_faults(stack, ids, args.injections))
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
        results["node_client"] = bench_rpc_node(stack.dp_dir / "nvidia-gpu.sock", ids, args.allocations)
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
        before = {name: cpu_ticks(pid) for name, pid in procs.items()}
        time.sleep(args.idle)  # the idle window being measured
        after = {name: cpu_ticks(pid) for name, pid in procs.items()}
        results["idle_window_s"] = args.idle
        results["idle_cpu_percent"] = {
            name: 100.0 * (after[name] - before[name]) / CLK_TCK / args.idle for name in procs
        }
        results["idle_cpu_percent_total"] = sum(results["idle_cpu_percent"].values())
        terminations.append(terminate(stack))
    finally:
        stack.stop()
        stack.cleanup()

    results["pod_termination_s"] = summary(terminations)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1))
    ms = 1000.0
    print(f"{'figure':44} {'p50':>10} {'p99':>10}")
    print(f"{'cold start -> registered (s)':44} {results['cold_start_s']:10.3f}")
    for key, label in (("fault_to_unhealthy_s", "fault -> Unhealthy at kubelet (ms)"),
                       ("fault_to_unhealthy_flooded_s", "XID -> Unhealthy, subscription flood (ms)"),
                       ("kubelet_restart_to_back_s", "kubelet restart -> resource back (ms)"),
                       ("kill9_plugin_server_to_back_s", "kill -9 plugin-server -> back (ms)"),
                       ("allocate_s", "Allocate (ms)"),
                       ("allocate_replicas_8x16_s", "Allocate, 8 GPUs x 16 replicas (ms)"),
                       ("noop_rpc_s", "PreStartContainer, a no-op: the floor (ms)"),
                       ("pod_termination_s", "SIGTERM -> entry point exited (ms)")):
        r = results[key]
        print(f"{label:44} {r['p50'] * ms:10.3f} {r['p99'] * ms:10.3f}   (n={r['n']})")
    for size, r in results["preferred_allocation_s"].items():
        print(f"{'GetPreferredAllocation size ' + size + ' (ms)':44} {r['p50'] * ms:10.3f} {r['p99'] * ms:10.3f}")
    node = results.get("node_client")
    if node is None:
        print("(no Node client: `make bench` installs bench/node; server-side figures skipped)")
    else:
        for label, r in (("Allocate, Node client (ms)", node["allocate"]),
                         ("no-op, Node client: the floor (ms)", node["noop"]),
                         *((f"GetPreferredAllocation size {k}, Node client (ms)", v)
                           for k, v in node["preferred"].items())):
            print(f"{label:44} {r['p50'] * ms:10.3f} {r['p99'] * ms:10.3f}   (n={r['n']})")
    r = results["preferred_replicas_8x16_s"]["4"]
    print(f"{'GetPreferredAllocation 4 of 128 replicas (ms)':44} {r['p50'] * ms:10.3f} {r['p99'] * ms:10.3f}")
    print(f"{'total PSS (MB)':44} {results['pss_total_mb']:10.1f}   " +
          ", ".join(f"{k} {v / 1024:.1f}" for k, v in results["pss_kb"].items()))
    print(f"{'idle CPU over ' + str(int(args.idle)) + ' s (% of one core)':44} "
          f"{results['idle_cpu_percent_total']:10.3f}   " +
          ", ".join(f"{k} {v:.3f}" for k, v in results["idle_cpu_percent"].items()))
    print(f"written to {RESULTS / 'latest.json'}")
    print("\npreferred allocation alone (bench/preferred.py), 8 and 16 GPUs:", flush=True)
    here = Path(__file__).resolve().parent
    status = subprocess.call([sys.executable, str(here / "preferred.py")])
    print("\nper-node configuration (bench/per_node_config.py):", flush=True)
    status = status or subprocess.call([sys.executable, str(here / "per_node_config.py")])
    print("\nat scale (bench/scale.py): 16 GPUs x 64 replicas, 8 GPUs x 7 MIG devices:", flush=True)
    return status or subprocess.call([sys.executable, str(here / "scale.py")])


if __name__ == "__main__":
    sys.exit(main())
