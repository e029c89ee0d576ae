"""Micro-benchmark of topology-aware preferred allocation (services/plugin_server/preferred.py).

No stack, no gRPC: `Topology` build time, and p50/p99 of `preferred_gpus` per allocation
size on an 8-GPU NVSwitch box and a 16-GPU box (two NVSwitch islands of 8), each over
--calls calls (time.perf_counter) with `available` given three ways:
  ordered   every GPU free, in topology order
  shuffled  every GPU free, in a random order per call (the kubelet's order is a Go map's)
  busy      a random 3/4 of the GPUs free, shuffled, one of them in must_include

Usage: .venv/bin/python bench/preferred.py [--calls 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.bus.messages import HEALTHY, DeviceState, PairLink
from services.plugin_server.preferred import Topology, preferred_gpus


def box(n: int, island: int) -> tuple[list[DeviceState], list[PairLink]]:
    """n GPUs, NVSwitch islands of `island` GPUs (18 links within, none across), NUMA node
    per half, GPU pairs (0,1) (2,3) .. under one PCIe switch."""
    half = n // 2
    gpus = [
        DeviceState(id=f"GPU-{i:02d}", kind="gpu", index=str(i), name="NVIDIA H100", health=HEALTHY, reason="",
                    since=0.0, minor=i, numa_node=i // half)
        for i in range(n)
    ]
    links = []
    for i, j in combinations(range(n), 2):
        level = 10 if i // 2 == j // 2 else 40 if i // half == j // half else 50
        links.append(PairLink(gpus[i].id, gpus[j].id, 18 if i // island == j // island else 0, level))
    return gpus, links


def percentiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49], q[98]


def timed(fn: Callable[..., object], inputs: list[tuple[object, ...]]) -> list[float]:
    """Seconds per call of fn(*args), one call per input (inputs drawn before timing)."""
    out = []
    for args in inputs:
        t0 = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t0)
    return out


def bench_box(name: str, n: int, island: int, calls: int, rnd: random.Random) -> None:
    gpus, links = box(n, island)
    builds = timed(Topology, [(gpus, links)] * max(20, calls // 50))
    topo = Topology(gpus, links)
    b50, b99 = percentiles(builds)
    print(f"\n{name}: Topology build p50 {b50 * 1e3:.2f} ms, p99 {b99 * 1e3:.2f} ms "
          f"({len(builds)} builds), tables {topo.nbytes / 1024:.1f} KiB")
    print(f"{'size':>4}  {'ordered p50/p99 us':>20}  {'shuffled p50/p99 us':>20}  {'busy p50/p99 us':>20}")
    ids = list(topo.ids)
    worst = 0.0
    for size in range(1, n + 1):
        ordered = timed(preferred_gpus, [(topo, ids, [], size)] * calls)
        shuffled = timed(preferred_gpus, [(topo, rnd.sample(ids, n), [], size) for _ in range(calls)])
        busy_inputs: list[tuple[object, ...]] = []
        for _ in range(calls):
            free = rnd.sample(ids, max(1, 3 * n // 4))
            busy_inputs.append((topo, free, free[:1], size))
        busy = timed(preferred_gpus, busy_inputs)
        cells = []
        for samples in (ordered, shuffled, busy):
            p50, p99 = percentiles(samples)
            worst = max(worst, p99)
            cells.append(f"{p50 * 1e6:8.1f} / {p99 * 1e6:8.1f}")
        print(f"{size:>4}  " + "  ".join(f"{c:>20}" for c in cells))
    print(f"worst p99 {worst * 1e3:.3f} ms over {calls} calls per cell")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    print(f"python {sys.version.split()[0]}, {args.calls} calls per cell")
    bench_box("8 GPUs, one NVSwitch island", 8, 8, args.calls, rnd)
    bench_box("16 GPUs, two NVSwitch islands of 8", 16, 8, args.calls, rnd)


if __name__ == "__main__":
    main()
