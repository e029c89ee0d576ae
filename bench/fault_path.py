"""Where a fault's time goes, hop by hop, from outside the processes, on the real stack under
supervisord (simulated 8-GPU box, the kubelet simulator, the C++ ListAndWatch client of bench/cpp):

  injected -> published        `inject xid 79` sent until the health-monitor's state saying it was
                               sent (its `sent_at`): the simulated driver's control thread, NVML's
                               event thread, the monitor's loop, the policy, encoding, the send
  published -> bus reader      that state read by a plain ZeroMQ subscriber in this process: the
                               bus's own transport (two ZeroMQ I/O threads and a wake-up), decoding
  published -> C++ client      the same state as the kubelet's stream shows it: the bus, the
                               plugin-server's loop (decode, resources, the stream's write), the
                               client's read
  injected -> C++ client       the whole path (bench/run.py's "fault -> Unhealthy at a C++ client")

and two floors measured alone on this machine, with the health state's size and the faults'
spacing: ZeroMQ IPC from one process to another, read by a blocking recv and by an asyncio loop
(pyzmq's zmq.asyncio, as the services read the bus): what any design with the bus in the path
pays here. Prints a table; writes bench/results/fault_path.json. Needs the C++ client.

Usage: python bench/fault_path.py [--faults 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import RESULTS, StreamWatcher, cpp_client, held, summary
from common.bus.codec import decode
from common.bus.messages import HEALTH_SOCKET, UNHEALTHY, HealthState
from common.bus.sockets import ipc_address
from devtools.devstack import RESOURCE, DevStack
from devtools.nvml_sim import SIM_CONTROL_SOCKET, FaultClient

FLOOR_PUBLISHER = r"""
import sys, time, zmq
ctx = zmq.Context(); sock = ctx.socket(zmq.XPUB); sock.bind(sys.argv[1])
sock.recv()  # the subscription
n, size, gap = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
pad = b"x" * size
time.sleep(0.2)
for _ in range(n):
    sock.send_multipart([b"t", repr(time.time()).encode(), pad])
    time.sleep(gap)
sock.send_multipart([b"t", b"end", b""])
"""


def bus_floor(asynchronous: bool, n: int, size: int, gap: float) -> dict[str, float]:
    """ZeroMQ IPC latency between two processes: `n` messages of `size` bytes `gap` s apart, read by a
    blocking recv or by an asyncio loop."""
    with tempfile.TemporaryDirectory(prefix="gp-floor-") as tmp:
        addr = f"ipc://{tmp}/floor.sock"
        ctx = zmq.asyncio.Context() if asynchronous else zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.subscribe(b"t")
        sub.connect(addr)
        publisher = subprocess.Popen([sys.executable, "-c", FLOOR_PUBLISHER, addr, str(n), str(size), str(gap)])
        lat: list[float] = []

        def took(frames: list[bytes]) -> bool:
            """Records one message's latency; False at the end mark."""
            if frames[1] == b"end":
                return False
            lat.append(time.time() - float(frames[1]))
            return True

        async def read_async() -> None:
            while took(await sub.recv_multipart()):
                pass

        try:
            if asynchronous:
                asyncio.run(read_async())
            else:
                while took(sub.recv_multipart()):
                    pass
        finally:
            sub.close(linger=0)
            publisher.wait(30)
            ctx.term()
        return summary(lat)


class BusReader:
    """A plain ZeroMQ subscriber to the health bus, in a thread: when each state arrived, its sent_at,
    and the devices it lists Unhealthy."""

    def __init__(self, path: Path) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.subscribe(HealthState.TOPIC.encode())
        self._sock.connect(ipc_address(path))
        self.states: list[tuple[float, float, set[str]]] = []  # (arrived, sent_at, unhealthy)
        self.payload_bytes = 0  # the last state's size on the wire
        self._changed = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            if not self._sock.poll(100):
                continue
            topic, payload = self._sock.recv_multipart()
            arrived = time.time()
            self.payload_bytes = len(payload)
            msg = decode(topic, payload)
            assert isinstance(msg, HealthState)
            with self._changed:
                self.states.append((arrived, msg.sent_at, {d.id for d in msg.devices if d.health == UNHEALTHY}))
                self._changed.notify_all()

    def first(self, after: float, device: str, timeout: float = 10.0) -> tuple[float, float] | None:
        """(arrived, sent_at) of the first state sent after `after` that lists `device` Unhealthy."""
        def found() -> tuple[float, float] | None:
            return next(((a, s) for a, s, bad in self.states if s >= after and device in bad), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None, timeout)
            return found()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults", type=int, default=200)
    args = ap.parse_args()
    if cpp_client() is None:
        print("the C++ client is missing (apt-get install libgrpc++-dev protobuf-compiler-grpc pkg-config)",
              file=sys.stderr)
        return 2
    hops: dict[str, list[float]] = {"injected -> published": [], "published -> bus reader": [],
                                    "published -> C++ client": [], "injected -> C++ client": []}
    stack = DevStack(fleet="dgx-h100-8", env={"HEALTH_PROBE_INTERVAL": "100ms"})
    state_bytes = 0
    try:
        stack.start_kubelet()
        stack.kubelet.state()
        stack.start_supervisor()
        ids = list(held(stack, timeout=60)["state"]["resources"][RESOURCE]["devices"])
        reader = BusReader(stack.run_dir / HEALTH_SOCKET)
        watcher = StreamWatcher(stack.dp_dir / "nvidia-gpu.sock")
        faults = FaultClient(stack.run_dir / SIM_CONTROL_SOCKET)
        try:
            for i in range(args.faults):
                gpu = ids[i % len(ids)]
                t0 = time.time()
                faults.send({"op": "xid", "uuid": gpu, "xid": 79})
                at_client = watcher.first(t0, gpu, unhealthy=True)
                bus = reader.first(t0, gpu)
                if at_client is None or bus is None:
                    raise RuntimeError(f"XID 79 on {gpu} not seen (client {at_client}, bus {bus})\n{stack.logs()}")
                arrived, sent = bus
                hops["injected -> published"].append(sent - t0)
                hops["published -> bus reader"].append(arrived - sent)
                hops["published -> C++ client"].append(at_client - sent)
                hops["injected -> C++ client"].append(at_client - t0)
                faults.send({"op": "recover", "uuid": gpu})
                if not stack.kubelet.wait(RESOURCE, allocatable=len(ids), timeout=10)["ok"]:
                    raise RuntimeError(f"{gpu} never recovered\n{stack.logs()}")
                watcher.first(t0, gpu, unhealthy=False)
            state_bytes = reader.payload_bytes
        finally:
            watcher.close()
            reader.close()
    finally:
        stack.stop()
        stack.cleanup()
    results: dict[str, Any] = {name: summary(v) for name, v in hops.items()}
    # The floors with the health state's size, as far apart as the faults were (~10 ms).
    results["floor: ZeroMQ IPC, blocking recv"] = bus_floor(False, args.faults, state_bytes, 0.01)
    results["floor: ZeroMQ IPC, zmq.asyncio recv"] = bus_floor(True, args.faults, state_bytes, 0.01)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fault_path.json").write_text(json.dumps({**results, "state_bytes": state_bytes}, indent=1))
    print(f"{'hop (ms), health state of ' + str(state_bytes) + ' bytes':50} {'p50':>8} {'p99':>8}")
    for name, r in results.items():
        print(f"{name:50} {1000 * r['p50']:8.3f} {1000 * r['p99']:8.3f}")
    print(f"written to {RESULTS / 'fault_path.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
