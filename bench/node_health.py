"""Node health in the API, measured on the real stack under supervisord (simulated 8-GPU box, the
kubelet simulator, the emulated API server), the kube-agent writing the GPUUnhealthy condition and
the Events: XID 79 injected in the simulated driver -> the condition True at the API server (and
the Warning Event), and the API writes per minute while a GPU's driver reports an XID storm (10 000
XIDs in a minute by default). Prints a table; writes bench/results/node_health.json.

Usage: python bench/node_health.py [--faults 20] [--storm 10000] [--storm-s 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import pss_kb, summary
from devtools.devstack import GROUP, RESOURCE, DevStack
from devtools.kube_api import KubeApiEmulator
from devtools.loop_thread import LoopThread
from devtools.nvml_sim import SIM_CONTROL_SOCKET, FaultClient
from services.kube_agent.node_events import BURST, REFILL_S

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "node-1"


class TimedApi(KubeApiEmulator):
    """The emulator, noting when each status and Event write landed (its own clock: no polling delay)."""

    def __init__(self) -> None:
        super().__init__()
        self.landed: list[tuple[float, str, int, dict[str, Any]]] = []  # (time, resource, code, answer)

    def _status_write(self, method: str, path: str, body: bytes, patch_type: str) -> tuple[int, dict[str, Any]]:
        code, answer = super()._status_write(method, path, body, patch_type)
        if method != "GET":
            self.landed.append((time.time(), "status", code, answer))
        return code, answer

    def _event_write(self, method: str, path: str, body: bytes, patch_type: str) -> tuple[int, dict[str, Any]]:
        code, answer = super()._event_write(method, path, body, patch_type)
        if method != "GET":
            self.landed.append((time.time(), "event", code, answer))
        return code, answer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults", type=int, default=20)
    ap.add_argument("--storm", type=int, default=10_000, help="XIDs injected on one GPU")
    ap.add_argument("--storm-s", type=float, default=60.0, help="over this many seconds")
    args = ap.parse_args()
    lt = LoopThread()

    emu = TimedApi()
    lt.run(emu.start())
    lt.call(lambda: emu.add_node(NODE, {}))
    root = Path(tempfile.mkdtemp(prefix="gp-bench-"))
    (root / "kubeconfig").write_text(emu.kubeconfig())
    env = {"HEALTH_NODE_CONDITION": "true", "HEALTH_NODE_EVENTS": "true", "NODE_NAME": NODE,
           "KUBECONFIG": str(root / "kubeconfig"), "HEALTH_PROBE_INTERVAL": "100ms"}

    def landed_since(t0: float, resource: str, ok: Any) -> float | None:
        for at, what, code, answer in lt.call(lambda: list(emu.landed)):
            if at >= t0 and what == resource and code < 300 and ok(answer):
                return float(at)
        return None

    def status_of(node: dict[str, Any]) -> str:
        for c in node.get("status", {}).get("conditions", []):
            if c["type"] == "GPUUnhealthy":
                return str(c["status"])
        return ""

    def wait(what: str, fn: Any, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while (value := fn()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout} s\n{stack.logs()}")
            time.sleep(0.005)
        return value

    results: dict[str, Any] = {}
    stack = DevStack(fleet="dgx-h100-8", env=env)
    try:
        stack.start()
        reply = stack.kubelet.wait(RESOURCE, capacity=8, allocatable=8, connected=True, timeout=60)
        assert reply["ok"], reply
        wait("first condition", lambda: landed_since(0, "status", lambda n: status_of(n) == "False") or None)
        gpus = list(reply["state"]["resources"][RESOURCE]["devices"])
        faults = FaultClient(stack.run_dir / SIM_CONTROL_SOCKET)

        def one_fault(gpu: str) -> tuple[float, float]:
            """XID 79 on `gpu`: until the condition says True, and until its Warning Event; then recovered."""
            t0 = time.time()
            faults.send({"op": "xid", "uuid": gpu, "xid": 79})
            at = wait("condition True", lambda: landed_since(t0, "status", lambda n: status_of(n) == "True"))
            ev = wait("Warning Event", lambda: landed_since(
                t0, "event", lambda e: e.get("reason") == "GPUUnhealthy" and gpu in e.get("message", "")))
            faults.send({"op": "recover", "uuid": gpu})
            wait("condition False", lambda: landed_since(t0, "status", lambda n: status_of(n) == "False"))
            return at - t0, ev - t0

        samples = [one_fault(gpus[i % len(gpus)]) for i in range(args.faults)]
        results["fault_to_condition_s"] = summary([c for c, _ in samples])
        results["fault_to_event_s"] = summary([e for _, e in samples])

        # The storm: one GPU's driver reports XIDs at a steady rate for storm_s seconds.
        agent = stack.pid(f"{GROUP}:kube-agent")
        pss_before = pss_kb(agent)
        gpu = gpus[0]
        writes_before = len(lt.call(emu.writes))
        t0 = time.time()
        for n in range(args.storm):
            due = t0 + n * args.storm_s / args.storm
            if (ahead := due - time.time()) > 0:
                time.sleep(ahead)  # the storm's pace, not a wait for a condition
            faults.send({"op": "xid", "uuid": gpu, "xid": 94})
        storm_end = time.time()
        writes_storm = len(lt.call(emu.writes)) - writes_before
        # The last coalesced count: one more refill period, then what the API holds.
        time.sleep(REFILL_S + 1)  # the rate limit's period, so that the held count is written
        xid_events = [e for e in lt.call(emu.events_of) if e["reason"] == "XidError" and gpu in e["message"]
                      and "XID 94" in e["message"]]
        results["storm"] = {
            "xids": args.storm, "seconds": storm_end - t0, "api_writes": writes_storm,
            "api_writes_per_minute": writes_storm * 60.0 / (storm_end - t0),
            "events_objects": len(xid_events), "event_count": sum(e.get("count", 0) for e in xid_events),
            # The storm Event: a burst, then one per refill; the fault: its Unhealthy Event and the condition,
            # written again as the monitor adds what it learns (the driver's advice), and a heartbeat.
            "bound_per_minute": BURST + 60 / REFILL_S + 4,
            "kube_agent_pss_kb_before": pss_before, "kube_agent_pss_kb_after": pss_kb(agent)}
        faults.send({"op": "recover", "uuid": gpu})
    finally:
        stack.stop()
        stack.cleanup()
        lt.run(emu.stop())
        lt.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "node_health.json").write_text(json.dumps(results, indent=1))
    for label, key in (("XID 79 -> condition True at the API (ms)", "fault_to_condition_s"),
                       ("XID 79 -> Warning Event at the API (ms)", "fault_to_event_s")):
        r = results[key]
        print(f"{label:48} {r['p50'] * 1000:10.3f} {r['p99'] * 1000:10.3f}   (n={r['n']})")
    s = results["storm"]
    print(f"{'XID storm: API writes per minute':48} {s['api_writes_per_minute']:10.1f}   "
          f"({s['api_writes']} writes for {s['xids']} XIDs in {s['seconds']:.0f} s; bound "
          f"{s['bound_per_minute']:.0f}/min)")
    print(f"{'XID storm: Events / their count':48} {s['events_objects']:10d} {s['event_count']:10d}")
    print(f"{'kube-agent PSS before / after the storm (MB)':48} {s['kube_agent_pss_kb_before'] / 1024:10.1f} "
          f"{s['kube_agent_pss_kb_after'] / 1024:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
