"""Per-node configuration, measured on the real stack under supervisord (simulated 8-GPU box, the
kubelet simulator, the emulated API server): label change -> new device list at the kubelet, and
what the kube-agent costs (PSS, idle CPU). Prints a table; writes bench/results/per_node_config.json.

Usage: python bench/per_node_config.py [--flips 20] [--idle 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import CLK_TCK, cpu_ticks, pss_kb, summary
from devtools.devstack import GROUP, RESOURCE, DevStack
from devtools.kube_api import KubeApiEmulator
from devtools.loop_thread import LoopThread

RESULTS = Path(__file__).resolve().parent / "results"
LABEL = "nvidia.com/device-plugin.config"
TS = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: {}\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flips", type=int, default=20)
    ap.add_argument("--idle", type=float, default=20.0)
    args = ap.parse_args()
    lt = LoopThread()

    emu = KubeApiEmulator()
    lt.run(emu.start())
    lt.call(lambda: emu.add_node("node-1", {}))
    root = Path(tempfile.mkdtemp(prefix="gp-bench-"))
    src = root / "configs"
    src.mkdir()
    for n in (2, 4):
        (src / f"ts-{n}").write_text(TS.format(n))
    (src / "default").write_text("version: v1\n")
    (root / "kubeconfig").write_text(emu.kubeconfig())
    env = {"CONFIG_FILE": str(root / "config.yaml"), "CONFIG_FILE_SRCDIR": str(src), "NODE_NAME": "node-1",
           "NODE_LABEL": LABEL, "KUBECONFIG": str(root / "kubeconfig")}
    subprocess.run([sys.executable, "-m", "services.config_manager"], check=True, capture_output=True,
                   env={**os.environ, **env, "ONESHOT": "true", "CONFIG_FILE_DST": env["CONFIG_FILE"]})
    results: dict[str, Any] = {}
    stack = DevStack(fleet="dgx-h100-8", env=env)
    try:
        stack.start()
        reply = stack.kubelet.wait(RESOURCE, capacity=8, allocatable=8, connected=True, timeout=60)
        assert reply["ok"], reply
        flips = []
        for i in range(args.flips):
            n = (2, 4)[i % 2]
            t0 = time.time()
            lt.call(functools.partial(emu.set_label, "node-1", LABEL, f"ts-{n}"))
            reply = stack.kubelet.wait(RESOURCE, capacity=8 * n, allocatable=8 * n, connected=True, timeout=30)
            assert reply["ok"], reply
            flips.append(reply["at"] - t0)
        results["label_to_kubelet_s"] = summary(flips)
        agent = stack.pid(f"{GROUP}:kube-agent")
        results["kube_agent_pss_kb"] = pss_kb(agent)
        before = cpu_ticks(agent)
        time.sleep(args.idle)  # the idle window being measured
        results["kube_agent_idle_cpu_percent"] = 100.0 * (cpu_ticks(agent) - before) / CLK_TCK / args.idle
    finally:
        stack.stop()
        stack.cleanup()
        lt.run(emu.stop())
        lt.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "per_node_config.json").write_text(json.dumps(results, indent=1))
    r = results["label_to_kubelet_s"]
    print(f"{'node label change -> new device list (ms)':44} {r['p50'] * 1000:10.3f} {r['p99'] * 1000:10.3f}"
          f"   (n={r['n']})")
    print(f"{'kube-agent PSS (MB)':44} {results['kube_agent_pss_kb'] / 1024:10.1f}")
    print(f"{'kube-agent idle CPU (% of one core)':44} {results['kube_agent_idle_cpu_percent']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
