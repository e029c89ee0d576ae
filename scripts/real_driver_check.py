"""Runs discovery and the health monitor's NVML paths against a driver for a bounded time
and prints what it found: devices, topology, which events registered, one probe per GPU,
and every event seen. For a machine with a real GPU (`--nvml-backend real`, the default);
`--nvml-backend simulated` runs the same code on a shipped fleet so that the script is
tested here. Prints a human summary and, with --json, the full record.

    python scripts/real_driver_check.py --seconds 20 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.nvml.backend import NVML_ERROR_TIMEOUT, RECOVERY_ACTION_NAMES, NvmlError
from common.nvml.real import RealNvml
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.health_monitor.discovery import discover
from services.health_monitor.events import register_events
from services.health_monitor.probes import probe_gpu
from services.health_monitor.xid_policy import xid_policy


def timed(record: dict[str, Any], key: str, call: Any) -> Any:
    t0 = time.perf_counter()
    try:
        value = call()
        record[key] = {"ms": round((time.perf_counter() - t0) * 1000, 3)}
        return value
    except NvmlError as e:
        record[key] = {"ms": round((time.perf_counter() - t0) * 1000, 3), "error": str(e), "code": e.code}
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to wait for events")
    ap.add_argument("--nvml-backend", choices=("real", "simulated"), default="real")
    ap.add_argument("--simulated-devices", default="h200")
    ap.add_argument("--json", type=Path, help="write the full record here")
    args = ap.parse_args()

    nvml = RealNvml() if args.nvml_backend == "real" else SimulatedNvml(fleet_path(args.simulated_devices))
    rec: dict[str, Any] = {"backend": args.nvml_backend}
    try:
        timed(rec, "init", nvml.init)
    except NvmlError as e:
        print(f"NVML init failed: {e}")
        print(json.dumps(rec, indent=1))
        return 1
    rec["driver"] = nvml.system_get_driver_version()
    inv = timed(rec, "discovery", lambda: discover(nvml, time.time()))
    rec["devices"] = [dataclasses.asdict(d) for d in inv.devices]
    rec["links"] = [dataclasses.asdict(link) for link in inv.links]
    event_set, registered = timed(rec, "register_events", lambda: register_events(nvml, inv.handles))
    rec["event_registration"] = {u: (why or "ok") for u, why in registered.items()}
    probes = [probe_gpu(nvml, u, h) for u, h in inv.handles.items()]
    rec["probes"] = [dataclasses.asdict(p) for p in probes]

    policy = xid_policy()
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            ev = nvml.event_set_wait(event_set, int(min(left, 1.0) * 1000) or 1)
        except NvmlError as e:
            if e.code == NVML_ERROR_TIMEOUT:
                continue
            events.append({"wait_error": str(e), "code": e.code})
            break
        entry = dataclasses.asdict(ev)
        if ev.event_type & 0x8:
            entry["verdict"] = policy.classify(ev.event_data)
        events.append(entry)
    rec["events"] = events
    nvml.event_set_free(event_set)
    timed(rec, "shutdown", nvml.shutdown)
    rec["max_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    print(f"driver {rec['driver']}; NVML init {rec['init']['ms']} ms; discovery {rec['discovery']['ms']} ms")
    for d in inv.devices:
        numa = "?" if d.numa_node is None else d.numa_node
        print(f"  {d.kind} {d.index:5} {d.id}  {d.name}  pci {d.pci_bus_id}  numa {numa}  {d.health}"
              + (f" ({d.reason})" if d.reason else ""))
    print(f"pairs: {len(inv.links)}; NVLink pairs: {sum(1 for link in inv.links if link.nvlinks)}")
    for uuid, outcome in rec["event_registration"].items():
        print(f"  events {uuid}: {outcome}")
    for p in probes:
        advice = "n/a" if p.recovery_action is None else RECOVERY_ACTION_NAMES.get(p.recovery_action, p.recovery_action)
        print(f"  probe {p.gpu}: faults {p.faults or 'none'}; recovery advice {advice}; DBE total {p.dbe_total}")
    print(f"events in {args.seconds:.0f} s: {len(events)}")
    for e in events:
        print(f"  {e}")
    print(f"max RSS {rec['max_rss_kb']} kB")
    if args.json:
        args.json.write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
