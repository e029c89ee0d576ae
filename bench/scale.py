"""The real stack under supervisord at scale, measured from the kubelet simulator's side, against
the 8-GPU default stack as the baseline. Prints one line per figure with its target; writes
bench/results/scale.json. Every stack here probes every 100 ms (faults are recovered after each
injection), the baseline too, so that the figures compare.

Scenarios (fleets generated into a temporary directory):
  8-GPU      dgx-h100-8, default settings: 8 IDs of nvidia.com/gpu (the baseline)
  ts-16x64   16 H100 (the DGX H100 fleet twice) x 64 time-slicing replicas: 1024 IDs of nvidia.com/gpu
  mig-8x7    8 H100, each with 7 MIG devices 1g.10gb, MIG strategy single: 56 IDs of nvidia.com/gpu
Figures per scenario:
  cold start                 DevStack start until the kubelet holds every ID healthy (information)
  fault -> Unhealthy         XID 79 on a GPU until the kubelet's list shows its IDs Unhealthy; then
                             recovered, waiting Healthy (target p50 <= 5 ms)
  Allocate, preferred 1-8    the C++ client (bench/cpp) on the plugin socket, every ID available
                             (targets p99 <= 1 ms and <= 2 ms)
  PSS                        supervisord, the entry point and every program after cold start, and
                             the growth over the baseline's (also in private memory, which other
                             processes mapping the same libraries do not move); the total after the load

Usage: .venv/bin/python bench/scale.py [--injections 100] [--allocations 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import StreamWatcher, bench_faults, bench_rpc_cpp, pids, pss_kb, summary
from devtools.devstack import RESOURCE, DevStack
from devtools.nvml_sim import fleet_path
from services.plugin_server.device_table import socket_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TS = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: {}\n"
FAULT_P50_S, ALLOCATE_P99_S, PREFERRED_P99_S = 0.005, 0.001, 0.002
# Faults are recovered after each injection: probe fast, as bench/run.py's fault stack does (all stacks here).
FAST_PROBES = {"HEALTH_PROBE_INTERVAL": "100ms"}


def new_uuid(prefix: str, name: str) -> str:
    return f"{prefix}-{uuid.uuid5(uuid.NAMESPACE_URL, 'gpu-device-plugin/bench/scale/' + name)}"


def fleet_16(out: Path) -> Path:
    """The DGX H100 fleet and a second baseboard: its 8 GPUs again with new UUIDs, minors 8-15, PCI
    domain 0001 (its NVSwitches too), NUMA nodes 2-3; across the two boards the PCIe level is SYS (50)."""
    desc = json.loads(fleet_path("dgx-h100-8").read_text())
    first = desc["devices"]
    renamed = {d["uuid"]: new_uuid("GPU", f"16/{i}") for i, d in enumerate(first)}
    copies = []
    for d in first:
        c = json.loads(json.dumps(d))
        c.update(uuid=renamed[d["uuid"]], minor=d["minor"] + 8, pci_bus_id="00000001" + d["pci_bus_id"][8:],
                 sysfs_numa_node=d["sysfs_numa_node"] + 2)
        for link in c["nvlinks"]:
            link["remote_pci_bus_id"] = "00000001" + link["remote_pci_bus_id"][8:]
        c["topology"] = {renamed[peer]: level for peer, level in d["topology"].items()}
        c["topology"].update({o["uuid"]: 50 for o in first})
        copies.append(c)
    desc["devices"] = first + copies
    desc["_comment"] = "bench/scale.py: dgx-h100-8 and a copy of it (new UUIDs, minors 8-15, PCI domain 0001)"
    path = out / "dgx-h100-16.json"
    path.write_text(json.dumps(desc))
    return path


def fleet_mig(out: Path) -> Path:
    """dgx-h100-8-mig with every GPU as its GPU 7: MIG on, 7 x 1g.10gb (GPU instances 7-13)."""
    desc = json.loads(fleet_path("dgx-h100-8-mig").read_text())
    template = desc["devices"][7]["mig_devices"]
    assert len(template) == 7 and all(m["name"].endswith("1g.10gb") for m in template), template
    for g, d in enumerate(desc["devices"]):
        d["mig_mode"] = [1, 1]
        d["mig_devices"] = [m | {"uuid": new_uuid("MIG", f"mig/{g}/{k}")} for k, m in enumerate(template)]
    desc["_comment"] = "bench/scale.py: dgx-h100-8-mig with 7 x 1g.10gb on every GPU"
    path = out / "dgx-h100-8-mig-7x1g.json"
    path.write_text(json.dumps(desc))
    return path


def cold_start(stack: DevStack, count: int) -> tuple[float, list[str]]:
    """Starts the stack; seconds until the kubelet holds `count` healthy IDs, and the IDs."""
    t0 = time.time()
    stack.start()
    reply = stack.kubelet.wait(RESOURCE, capacity=count, allocatable=count, connected=True, timeout=180)
    if not reply["ok"]:
        raise RuntimeError(f"{count} IDs not served: {reply['state']}\n{stack.logs()}")
    stack.wait_running()
    return reply["at"] - t0, list(reply["state"]["resources"][RESOURCE]["devices"])


def private_kb(pid: int) -> int:
    """Private_Clean + Private_Dirty: the process's own pages, whatever else maps the same files."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in lines if line.startswith("Private_"))


def memory(stack: DevStack) -> tuple[dict[str, int], dict[str, int]]:
    """PSS and private memory (KiB) of supervisord, the entry point and every program."""
    procs = pids(stack)
    return {n: pss_kb(p) for n, p in procs.items()}, {n: private_kb(p) for n, p in procs.items()}


def scenario(fleet: str, env: dict[str, str], per_gpu: int, gpus: int, args: argparse.Namespace) -> dict[str, Any]:
    total = per_gpu * gpus
    with DevStack(fleet=fleet, env=env).finished_after() as stack:
        r: dict[str, Any] = {"ids": total}
        r["cold_start_s"], ids = cold_start(stack, total)
        r["pss_kb"], r["private_kb"] = memory(stack)
        # The ID of each GPU that the kubelet is watched for: its last MIG device, last replica, or itself.
        victims = []
        for d in json.loads(fleet_path(fleet).read_text())["devices"]:
            kids = [m["uuid"] for m in d.get("mig_devices", [])] or [f"{d['uuid']}::{per_gpu - 1}"]
            victims.append((d["uuid"], kids[-1] if per_gpu > 1 else d["uuid"]))
        assert {v for _, v in victims} <= set(ids), "the watched IDs are not the kubelet's"
        r["fault_to_unhealthy_s"] = summary(bench_faults(stack, victims, per_gpu, total, args.injections)[0])
        watcher = StreamWatcher(stack.dp_dir / socket_name(RESOURCE))  # a series of its own, as in run.py
        try:
            _, at_watcher = bench_faults(stack, victims, per_gpu, total, max(1, args.injections // 2), watcher)
        finally:
            watcher.close()
        r["fault_to_unhealthy_cpp_s"] = summary(at_watcher) if at_watcher else None
        r["rpc"] = bench_rpc_cpp(stack.dp_dir / socket_name(RESOURCE), ids, args.allocations)
        r["pss_after_kb"], _ = memory(stack)
    return r


def row(label: str, s: dict[str, float] | None, target: float | None = None, key: str = "p99") -> str:
    if s is None:
        return f"{label:52} {'(no C++ client: make -C bench/cpp)':>21}"
    verdict = "info" if target is None else "met" if s[key] <= target else "MISSED"
    goal = "" if target is None else f"{key} <= {target * 1000:g} ms"
    return f"{label:52} {s['p50'] * 1000:10.3f} {s['p99'] * 1000:10.3f}   {goal:16} {verdict:7} (n={s['n']})"


def report(name: str, r: dict[str, Any], base: dict[str, Any]) -> list[str]:
    lines = [f"{name + ': cold start -> all ' + str(r['ids']) + ' IDs held (s)':52} {r['cold_start_s']:10.3f}"
             f"{'':11}   {'':16} info"]
    lines.append(row(f"{name}: XID 79 -> Unhealthy at kubelet (ms)", r["fault_to_unhealthy_s"], FAULT_P50_S, "p50"))
    lines.append(row(f"{name}: XID 79 -> Unhealthy at a C++ ListAndWatch (ms)", r["fault_to_unhealthy_cpp_s"],
                     FAULT_P50_S, "p50"))
    rpc = r["rpc"]
    lines.append(row(f"{name}: Allocate (ms)", rpc and rpc["allocate"], ALLOCATE_P99_S))
    if rpc is not None:
        lines.append(row(f"{name}: no-op PreStartContainer: floor (ms)", rpc["noop"]))
        lines += [row(f"{name}: GetPreferredAllocation size {k} (ms)", v, PREFERRED_P99_S)
                  for k, v in rpc["preferred"].items()]
    total, after, b = sum(r["pss_kb"].values()), sum(r["pss_after_kb"].values()), sum(base["pss_kb"].values())
    own = sum(r["private_kb"].values()) - sum(base["private_kb"].values())
    lines.append(f"{name + ': total PSS (MB)':52} {total / 1024:10.1f}   {(total - b) / 1024:+.1f} over the 8-GPU "
                 f"default (private {own / 1024:+.1f}); {after / 1024:.1f} after the load")
    lines.append(f"{'':52}   PSS growth: " + ", ".join(f"{k} {(v - base['pss_kb'][k]) / 1024:+.1f}"
                                                        for k, v in r["pss_kb"].items()))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--injections", type=int, default=100)
    ap.add_argument("--allocations", type=int, default=2000)
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                           "loadavg_at_start": os.getloadavg()},
                               "targets_s": {"fault_p50": FAULT_P50_S, "allocate_p99": ALLOCATE_P99_S,
                                             "preferred_p99": PREFERRED_P99_S}}
    with tempfile.TemporaryDirectory(prefix="gp-scale-") as tmp:
        base = Path(tmp)
        (base / "ts64.yaml").write_text(TS.format(64))
        results["baseline_8"] = scenario("dgx-h100-8", FAST_PROBES, 1, 8, args)
        results["ts_16x64"] = scenario(str(fleet_16(base)), FAST_PROBES | {"CONFIG_FILE": str(base / "ts64.yaml")},
                                       64, 16, args)
        results["mig_8x7"] = scenario(str(fleet_mig(base)), FAST_PROBES | {"MIG_STRATEGY": "single"}, 7, 8, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=1))
    print(f"{'figure':52} {'p50':>10} {'p99':>10}   {'target':16} verdict")
    b = results["baseline_8"]
    print(f"{'8-GPU default: cold start -> 8 GPUs held (s)':52} {b['cold_start_s']:10.3f}{'':11}   {'':16} info")
    print(row("8-GPU default: XID 79 -> Unhealthy at kubelet (ms)", b["fault_to_unhealthy_s"]))
    if b["rpc"] is not None:
        print(row("8-GPU default: Allocate (ms)", b["rpc"]["allocate"]))
        print(row("8-GPU default: GetPreferredAllocation 8 (ms)", b["rpc"]["preferred"]["8"]))
    print(f"{'8-GPU default: total PSS (MB)':52} {sum(b['pss_kb'].values()) / 1024:10.1f}   " +
          ", ".join(f"{k} {v / 1024:.1f}" for k, v in b["pss_kb"].items()))
    for name, key in (("ts 16x64", "ts_16x64"), ("mig 8x7", "mig_8x7")):
        print("\n".join(report(name, results[key], b)))
    print(f"written to {RESULTS / 'scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
