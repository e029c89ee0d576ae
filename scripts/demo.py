"""`make demo`: the real stack under supervisord on a simulated 8-GPU box, with the
kubelet simulator, walked through what an operator cares about. Exits 0 on success."""

from __future__ import annotations

import subprocess
import sys
import time

from devtools.devstack import RESOURCE, DevStack


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    # Probing every second (default 10 s) lets the demo show recovery without a long wait.
    stack = DevStack(fleet="dgx-h100-8", env={"HEALTH_PROBE_INTERVAL": "1s"})
    ok = False
    try:
        say(f"starting supervisord (health-monitor, plugin-server, registrar) "
            f" and the kubelet simulator in {stack.root}")
        t0 = time.monotonic()
        stack.start()
        k = stack.kubelet
        reply = k.wait(RESOURCE, allocatable=8, timeout=30)
        if not reply["ok"]:
            raise RuntimeError(f"{RESOURCE} never reached the kubelet: {reply}")
        print(f"registered and listed within {time.monotonic() - t0:.2f} s")
        print(stack.ctl("status"), end="")

        state = k.state()
        say("registrations the kubelet received")
        for r in state["registrations"]:
            print(f"  {r['resource']} via {r['endpoint']} ok={r['ok']}")
        view = state["resources"][RESOURCE]
        say(f"the device list the kubelet holds for {RESOURCE}: capacity {view['capacity']}, "
            f"allocatable {view['allocatable']}")
        ids = list(view["devices"])
        for dev_id, health in view["devices"].items():
            print(f"  {dev_id}  {health}")

        say(f"Allocate of two GPUs: {ids[0]}, {ids[1]}")
        reply = k.allocate(RESOURCE, ids[:2])
        if not reply["ok"]:
            raise RuntimeError(f"Allocate failed: {reply}")
        print(f"  container response: {reply['response']}")

        victim = ids[3]
        say(f"injecting XID 79 (GPU fallen off the bus) into {victim}")
        stack.inject("xid", victim, "79")
        reply = k.wait(RESOURCE, device=victim, health="Unhealthy", timeout=10)
        if not reply["ok"]:
            raise RuntimeError(f"{victim} did not turn Unhealthy at the kubelet: {reply}")
        view = reply["state"]["resources"][RESOURCE]
        print(f"  kubelet now holds {victim}: {view['devices'][victim]}; "
              f"allocatable {view['allocatable']} of {view['capacity']}")

        say("gpu-plugin status (read from the health bus)")
        gpu_plugin = str(stack.env["PATH"].split(":")[0] + "/gpu-plugin")
        subprocess.run([gpu_plugin, "status"], env=stack.env, check=True)

        say(f"the GPU is reset (simulated): {victim} returns to Healthy without restarting anything")
        stack.inject("recover", victim)
        t0 = time.monotonic()
        reply = k.wait(RESOURCE, device=victim, health="Healthy", timeout=30)
        if not reply["ok"]:
            raise RuntimeError(f"{victim} did not recover: {reply}")
        print(f"  back to Healthy at the kubelet after {time.monotonic() - t0:.1f} s "
              f"(the driver's recovery advice is read by the next probe)")
        ok = True
    finally:
        say("stopping the stack with SIGTERM to its entry point (as the kubelet does)")
        code = stack.stop()
        print(f"the entry point exited with {code}")
        leftovers = sorted(p.name for p in stack.dp_dir.glob("nvidia-*.sock"))
        print(f"plugin sockets left behind: {leftovers or 'none'}")
        if not ok:
            print(stack.logs(), file=sys.stderr)
            stack.keep = True
        stack.cleanup()
    return 0 if ok and code == 0 and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
