"""DRA, measured on the real stack under supervisord (simulated 8-GPU box, DRA on for some of its GPUs, the
device plugin's kubelet simulator holding the others), with the kubelet's DRA side emulated
(devtools.kubelet_simulator.dra) and the API server emulated (devtools.kube_api), both in this process:

  start -> slices published        supervisord start until the API holds the pool (and until the DRA kubelet
                                   registered the dra-plugin)
  XID 79 -> taint in the API       the fault sent to the simulated driver until the slice the API stores holds
                                   the device's gpu.nvidia.com/xid=79 taint (the emulator's own clock, when it
                                   stored the write); the first fault apart (it also asks the server, by a
                                   dry-run create, whether it keeps taints)
  ... -> Unhealthy at the kubelet  the same faults until the emulated kubelet's health stream received it
  recovery -> taint removed        the simulated GPU reset until the stored slice has no taint (includes the
                                   health-monitor's probe that sees the reset: 100 ms apart here)
  NodePrepareResources             a 1-GPU and a 2-GPU claim (allocated in the emulated API, read by the plugin),
                                   each a new claim, timed at the emulated kubelet (the program's first apart: it
                                   also looks up the driver's files); NodeUnprepareResources of each
  slices deleted -> republished    the kubelet's DeleteCollection of the node's slices until the API holds the
                                   whole pool again
  memory                           PSS of the dra-plugin, and of the whole pod (entry point, supervisord, every
                                   running program and the watchdog), settled and after the runs; and of the
                                   same pod without DRA, started after
  pod termination                  SIGTERM to the entry point until it exited 0, DRA on

The claims' CDI specs need a driver root with real device nodes: a stand-in is made with mknod (tests'
fakedriver), so the bench runs as root, as the tests do. Prints a table; writes bench/results/dra.json.

Usage: python bench/dra.py [--faults 100] [--prepares 200] [--wipes 20] [--dra-devices 4,5,6,7]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import pids, pss_kb, summary, terminate
from devtools.devstack import GROUP, RESOURCE, DevStack
from devtools.kube_api import KubeApiEmulator, ResourceSlices
from devtools.kubelet_simulator.dra import DeviceHealth, DraKubelet
from devtools.loop_thread import LoopThread
from devtools.nvml_sim import SIM_CONTROL_SOCKET, FaultClient
from tests.fakedriver import make_driver_root

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "node-1"
DRIVER = "gpu.nvidia.com"
XID_KEY = "gpu.nvidia.com/xid"
GPUS = 8
T = TypeVar("T")
# The pool as the API holds it after a write: device name -> its taints (key, value, effect); None while it
# is not whole (no slice, or slices of different generations or fewer than its count).
Pool = dict[str, tuple[tuple[str, str, str], ...]]


class TimedSlices(ResourceSlices):
    """The emulator's ResourceSlices, noting the pool it holds after each stored change, with the time it was
    stored (its own clock: the bench's polling adds nothing), and waking whoever waits for one."""

    def __init__(self) -> None:
        super().__init__()
        self.landed: list[tuple[float, str, Pool | None]] = []
        self.changed = threading.Condition()

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        at = time.time()
        super()._event(kind, obj)
        with self.changed:
            self.landed.append((at, kind, self._pool()))
            self.changed.notify_all()

    def _pool(self) -> Pool | None:
        slices = [o for o in self.objects.values() if o["spec"].get("nodeName") == NODE]
        shapes = {(s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"]) for s in slices}
        if len(shapes) != 1 or next(iter(shapes))[1] != len(slices):
            return None
        return {d["name"]: tuple((t["key"], t.get("value", ""), t["effect"]) for t in d.get("taints") or [])
                for s in slices for d in s["spec"]["devices"]}

    def first(self, after: float, ok: Callable[[Pool], bool], timeout: float = 10.0) -> tuple[float, Pool]:
        """The first stored pool at or after `after` that `ok` accepts: (when it was stored, the pool)."""

        def found() -> tuple[float, Pool] | None:
            return next(((at, pool) for at, _, pool in self.landed if at >= after and pool is not None and ok(pool)),
                        None)

        with self.changed:
            if not self.changed.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"no such pool in the API within {timeout} s: {self.landed[-3:]}")
            got = found()
            assert got is not None
            return got


class HealthLog(dict[tuple[str, str, str], DeviceHealth]):
    """The DRA kubelet's health cache (driver, pool, device) -> health, noting each device's changes of health
    with the time its stream message arrived (the kubelet's monotonic stamp), and waking whoever waits for one."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[tuple[float, str, str]] = []  # (arrived, device, health)
        self.changed = threading.Condition()

    def __setitem__(self, key: tuple[str, str, str], value: DeviceHealth) -> None:
        before = self.get(key)
        super().__setitem__(key, value)
        if before is None or before.health != value.health:
            with self.changed:
                self.changes.append((value.at, key[2], value.health))
                self.changed.notify_all()

    def first(self, after: float, device: str, health: str, timeout: float = 10.0) -> float:
        """When the first message at or after `after` (monotonic) with `device` in `health` arrived."""

        def found() -> float | None:
            return next((at for at, d, h in self.changes if at >= after and d == device and h == health), None)

        with self.changed:
            if not self.changed.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"{device} not {health} on the health stream within {timeout} s")
            got = found()
            assert got is not None
            return got


def wait(what: str, fn: Callable[[], T | None], stack: DevStack, timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while (value := fn()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout} s\n{stack.logs()}")
        time.sleep(0.002)
    return value


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument("--prepares", type=int, default=200, help="claims of each size prepared (and unprepared)")
    ap.add_argument("--wipes", type=int, default=20)
    ap.add_argument("--dra-devices", default="4,5,6,7", help="DRA_DEVICES: the NVML indexes DRA serves")
    args = ap.parse_args()
    dra_indexes = [int(i) for i in args.dra_devices.split(",")]
    loop = LoopThread()
    emu = KubeApiEmulator()
    slices = TimedSlices()
    emu.resourceslices = slices
    loop.run(emu.start())
    stack = DevStack(fleet="dgx-h100-8")
    # The kubelet's directories, the CDI directory and a driver root under the stack's root, as the chart mounts them.
    (stack.root / "kubeconfig").write_text(emu.kubeconfig())
    driver = make_driver_root(stack.root / "driver", range(GPUS))
    stack.env.update({
        "DRA_ENABLED": "true", "DRA_DEVICES": args.dra_devices, "NODE_NAME": NODE,
        "KUBECONFIG": str(stack.root / "kubeconfig"),
        "KUBELET_REGISTRAR_DIRECTORY_PATH": str(stack.root / "registry"),
        "KUBELET_PLUGINS_DIRECTORY_PATH": str(stack.root / "plugins"),
        "CDI_SPEC_DIR": str(stack.root / "cdi"), "NVIDIA_DRIVER_ROOT": str(driver),
        "DRIVER_ROOT_CTR_PATH": str(stack.root / "no-such-mount"),
        # Recovery after each fault waits for a probe: probe fast in this stack, as bench/run.py does.
        "HEALTH_PROBE_INTERVAL": "100ms"})
    kubelet = DraKubelet(stack.root / "registry")
    kubelet.health = health = HealthLog()
    loop.run(kubelet.start())
    results: dict[str, Any] = {"dra_devices": args.dra_devices}
    try:
        t0, m0 = time.time(), time.monotonic()
        stack.start()
        served = len(dra_indexes)
        at, pool = slices.first(t0, lambda p: len(p) == served, timeout=60)
        results["start_to_published_s"] = at - t0
        wait("registration at the DRA kubelet", lambda: next(
            (n.at for n in loop.call(lambda: list(kubelet.notices)) if n.registered), None), stack)
        results["start_to_registered_s"] = next(n.at for n in kubelet.notices if n.registered) - m0
        reply = stack.kubelet.wait(RESOURCE, capacity=GPUS - served, allocatable=GPUS - served, connected=True,
                                   timeout=30)
        if not reply["ok"]:
            raise RuntimeError(f"the device plugin does not serve the other GPUs: {reply['state']}\n{stack.logs()}")
        names = sorted(pool)
        assert names == sorted(f"gpu-{i}" for i in dra_indexes), names
        stored = loop.call(lambda: emu.resourceslices.of_node(NODE, DRIVER))
        uuids = {d["name"]: d["attributes"]["uuid"]["string"] for s in stored for d in s["spec"]["devices"]}
        dra_pid = stack.pid(f"{GROUP}:dra-plugin")
        assert dra_pid, stack.logs()
        procs = pids(stack) | {"dra-plugin": dra_pid}
        results["pss_kb_settled"] = {name: pss_kb(pid) for name, pid in procs.items()}

        faults = FaultClient(stack.run_dir / SIM_CONTROL_SOCKET)

        def one_fault(i: int) -> tuple[float, float, float]:
            """XID 79 on a DRA GPU: (until the taint is stored, until the kubelet's stream has it Unhealthy, from
            the reset until the taint is gone); it is Healthy everywhere again after."""
            name = names[i % len(names)]
            t0, m0 = time.time(), time.monotonic()
            faults.send({"op": "xid", "uuid": uuids[name], "xid": 79})
            tainted, _ = slices.first(t0, lambda p: any(k == XID_KEY and v == "79" for k, v, _ in p.get(name, ())))
            seen = health.first(m0, name, "Unhealthy")
            t1, m1 = time.time(), time.monotonic()
            faults.send({"op": "recover", "uuid": uuids[name]})
            cleared, _ = slices.first(t1, lambda p: p.get(name) == ())
            health.first(m1, name, "Healthy")
            return tainted - t0, seen - m0, cleared - t1

        first = one_fault(0)
        results["first_fault_to_taint_s"] = first[0]
        samples = [one_fault(i) for i in range(1, args.faults + 1)]
        results["fault_to_taint_s"] = summary([s[0] for s in samples])
        results["fault_to_health_stream_s"] = summary([s[1] for s in samples])
        results["recovery_to_untainted_s"] = summary([s[2] for s in samples])

        async def timed(call: Coroutine[Any, Any, Any]) -> tuple[float, Any]:
            t = time.perf_counter()
            answer = await call
            return time.perf_counter() - t, answer

        def claims(size: int) -> tuple[list[float], list[float]]:
            """`--prepares` new claims of `size` GPUs, each prepared and then unprepared (a GPU is prepared for
            one claim at a time)."""
            prepares, unprepares = [], []
            for n in range(args.prepares):
                devs = [names[(n + k) % len(names)] for k in range(size)]
                obj = loop.call(functools.partial(emu.claims.add, "default", f"c{size}-{n}", devs, pool=NODE))
                ref = ("default", obj["metadata"]["uid"], obj["metadata"]["name"])
                took, answer = loop.run(timed(kubelet.prepare(DRIVER, [ref])))
                got = answer.claims[ref[1]]
                if got.error or sorted(d.device_name for d in got.devices) != sorted(devs):
                    raise RuntimeError(f"claim {ref} not prepared: {got}\n{stack.logs()}")
                prepares.append(took)
                took, answer = loop.run(timed(kubelet.unprepare(DRIVER, [ref])))
                if answer.claims[ref[1]].error:
                    raise RuntimeError(f"claim {ref} not unprepared: {answer.claims[ref[1]].error}")
                unprepares.append(took)
            return prepares, unprepares

        one, undo_one = claims(1)
        two, undo_two = claims(2)
        # The program's first prepare also finds the driver's files and opens its API connection: apart.
        results["first_prepare_s"] = one.pop(0)
        results["prepare_1gpu_s"] = summary(one)
        results["prepare_2gpu_s"] = summary(two)
        results["unprepare_s"] = summary(undo_one + undo_two)

        republished = []
        for _ in range(args.wipes):
            t0 = time.time()
            loop.call(lambda: slices.wipe(NODE))  # the kubelet's DeleteCollection, as it does at its start
            at, _ = slices.first(t0, lambda p: len(p) == served)
            republished.append(at - t0)
        results["wiped_to_republished_s"] = summary(republished)

        results["pss_kb_after"] = {name: pss_kb(pid) for name, pid in procs.items()}
        results["pod_termination_s"] = terminate(stack)
    finally:
        stack.stop()
        loop.run(kubelet.stop())  # before its directory goes with the stack's
        loop.run(emu.stop())
        loop.close()
        stack.cleanup()

    # The same pod without DRA, measured now on the same machine: what DRA adds to the pod's memory (PSS splits
    # the pages the programs share with the supervisor that forked them, so the dra-plugin's own figure is not it).
    stack = DevStack(fleet="dgx-h100-8")
    with stack.finished_after():
        stack.start()
        if not stack.kubelet.wait(RESOURCE, capacity=GPUS, allocatable=GPUS, connected=True, timeout=60)["ok"]:
            raise RuntimeError(f"the stack without DRA does not serve its GPUs\n{stack.logs()}")
        stack.wait_running()
        results["pss_kb_without_dra"] = {name: pss_kb(pid) for name, pid in pids(stack).items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dra.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"written to {RESULTS / 'dra.json'}")
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(f"DRA on GPUs {results['dra_devices']} of 8; the device plugin serves the others")
    print(f"{'figure':52} {'p50':>9} {'p99':>9}")
    print(f"{'start -> registered with the DRA kubelet (ms)':52} {results['start_to_registered_s'] * 1000:9.1f}")
    print(f"{'start -> slices published (ms)':52} {results['start_to_published_s'] * 1000:9.1f}")
    print(f"{'first XID 79 -> taint (ms; + dry-run create)':52} "
          f"{results['first_fault_to_taint_s'] * 1000:9.3f}")
    for label, key in (("XID 79 -> taint in the API (ms)", "fault_to_taint_s"),
                       ("XID 79 -> Unhealthy on the DRA health stream (ms)", "fault_to_health_stream_s"),
                       ("GPU reset -> taint removed (ms; 100 ms probes)", "recovery_to_untainted_s"),
                       ("NodePrepareResources, 1-GPU claim (ms; not the first)", "prepare_1gpu_s"),
                       ("NodePrepareResources, 2-GPU claim (ms)", "prepare_2gpu_s"),
                       ("NodeUnprepareResources (ms)", "unprepare_s"),
                       ("slices deleted (kubelet) -> republished (ms)", "wiped_to_republished_s")):
        r = results[key]
        print(f"{label:52} {r['p50'] * 1000:9.3f} {r['p99'] * 1000:9.3f}   (n={r['n']})")
    print(f"{'first NodePrepareResources (ms; + driver files)':52} {results['first_prepare_s'] * 1000:9.3f}")
    settled, after = results["pss_kb_settled"], results["pss_kb_after"]
    print(f"{'dra-plugin PSS, settled / after the runs (MB)':52} {settled['dra-plugin'] / 1024:9.1f} "
          f"{after['dra-plugin'] / 1024:9.1f}")
    print(f"{'whole pod PSS with DRA on, settled / after (MB)':52} {sum(settled.values()) / 1024:9.1f} "
          f"{sum(after.values()) / 1024:9.1f}   " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in settled.items()))
    print(f"{'whole pod PSS without DRA, the same machine now (MB)':52} "
          f"{sum(results['pss_kb_without_dra'].values()) / 1024:9.1f}")
    print(f"{'SIGTERM -> entry point exited 0, DRA on (ms)':52} {results['pod_termination_s'] * 1000:9.1f}")


if __name__ == "__main__":
    sys.exit(main())
