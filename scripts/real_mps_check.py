"""Starts the MPS control daemon for one GPU with 2 replicas the way mps-control does, checks
that it answers `get_default_active_thread_percentage` with 50 (and the pinned-memory limit
of half the GPU's memory), then stops it and checks that its pipe directory is gone.

For a machine with a GPU and the CUDA MPS binaries (`nvidia-cuda-mps-control`, `nvidia-smi` on
PATH; run as root: it sets the GPU's compute mode to EXCLUSIVE_PROCESS and back to DEFAULT).
`--nvml-backend simulated` with devtools/fake_mps first on PATH runs the same code here.

    sudo python scripts/real_mps_check.py --root /run/nvidia/mps-check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.mps import CONTROL_BIN
from common.nvml.backend import NvmlError
from common.nvml.real import RealNvml
from common.settings import SharedResource, resolve
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.health_monitor.discovery import discover
from services.mps_control.control import Daemon, MpsError, find_binary

REPLICAS = 2


async def check(root: str, gpu: Any, rec: dict[str, Any]) -> bool:
    settings = resolve(environ={"GPU_PLUGIN_MPS_CONTAINER_ROOT": root, "MPS_ROOT": root})
    control = find_binary(CONTROL_BIN, settings)
    if control is None:
        rec["error"] = f"{CONTROL_BIN} not found on PATH"
        return False
    res = SharedResource("nvidia.com/gpu", "", REPLICAS, (gpu.index,))
    daemon = Daemon("nvidia.com/gpu", res, [gpu], settings, control, find_binary("nvidia-smi", settings))
    ok = False
    try:
        await daemon.start()
        pct = await daemon.command("get_default_active_thread_percentage")
        mem = await daemon.command(f"get_default_device_pinned_mem_limit {gpu.index}")
        rec.update(active_thread_percentage=pct, pinned_mem_limit=mem, state=daemon.state.__dict__)
        expected_mem = f"{gpu.memory_mb // REPLICAS}M"
        ok = float(pct.split()[0]) == 100 / REPLICAS and (not gpu.memory_mb or expected_mem in mem)
        if not ok:
            rec["error"] = f"expected 50 and {expected_mem}, got {pct!r} and {mem!r}"
    except (MpsError, OSError, ValueError, IndexError) as e:
        rec["error"] = str(e)
    finally:
        await daemon.stop()
    rec["pipe_dir_removed"] = not Path(daemon.pipe_dir).exists()
    return ok and rec["pipe_dir_removed"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="MPS root for the check (default: a new temporary directory)")
    ap.add_argument("--nvml-backend", choices=("real", "simulated"), default="real")
    ap.add_argument("--simulated-devices", default="h200")
    ap.add_argument("--json", type=Path, help="write the full record here")
    args = ap.parse_args()

    nvml = RealNvml() if args.nvml_backend == "real" else SimulatedNvml(fleet_path(args.simulated_devices))
    try:
        nvml.init()
        gpus = [d for d in discover(nvml, 0.0).devices if d.kind == "gpu"]
        nvml.shutdown()
    except NvmlError as e:
        print(f"NVML init failed: {e}")
        return 1
    if not gpus:
        print("no GPU found")
        return 1
    root = args.root or tempfile.mkdtemp(prefix="mps-check-")
    rec: dict[str, Any] = {"gpu": gpus[0].id, "index": gpus[0].index, "root": root, "replicas": REPLICAS}
    ok = asyncio.run(check(root, gpus[0], rec))
    print(f"GPU {gpus[0].index} ({gpus[0].id}), {REPLICAS} replicas, MPS root {root}")
    print(f"  active thread percentage: {rec.get('active_thread_percentage', '?')} (expected 50)")
    print(f"  pinned memory limit: {rec.get('pinned_mem_limit', '?')}")
    print(f"  pipe dir removed after stop: {rec.get('pipe_dir_removed')}")
    print("MPS check: " + ("OK" if ok else f"FAILED: {rec.get('error', 'see above')}"))
    if args.json:
        args.json.write_text(json.dumps(rec, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
