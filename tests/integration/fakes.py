"""Test-side peers on real sockets: a bus publisher on its own event loop, and a blocking
DevicePlugin client that reads a ListAndWatch stream into a queue."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from common.bus.messages import HEALTHY, DeviceState, HealthState, Message
from common.bus.sockets import BusPublisher
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from devtools.loop_thread import LoopThread


class FakeHealthMonitor:
    """Publishes HealthState messages on <run>/health.sock with the real publisher."""

    def __init__(self, run_dir: Path, devices: list[DeviceState]) -> None:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lt = LoopThread()
        self.devices = devices
        self.seq = 0
        self.incarnation = "fake-" + str(time.monotonic_ns())

        async def make() -> BusPublisher:
            return BusPublisher(run_dir / "health.sock", heartbeat_s=1.0)  # the plugin-server's tests: stale at 3 s

        self.pub = self.lt.run(make())
        self.lt.spawn(self.pub.run())
        self.publish()

    def publish(self, devices: list[DeviceState] | None = None, bump: bool = True) -> None:
        if devices is not None:
            self.devices = devices
        self.seq += 1 if bump else 0
        msg = HealthState(incarnation=self.incarnation, seq=self.seq, sent_at=time.time(), nvml_ok=True,
                          error="", driver_version="580.159.04", devices=list(self.devices))
        self.lt.call(lambda: self.pub.publish(msg))

    def send(self, msg: Message) -> None:
        self.lt.call(lambda: self.pub.publish(msg))

    def close(self) -> None:
        async def shut() -> None:
            self.pub.close()

        self.lt.run(shut())
        self.lt.close()


class EmulatedApi:
    """The emulated API server (devtools.kube_api) serving on a loop thread of the test's process."""

    def __init__(self) -> None:
        from devtools.kube_api import KubeApiEmulator

        self.lt = LoopThread()
        self.emu = KubeApiEmulator()
        self.lt.run(self.emu.start())

    def do(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the server's loop (awaited if it is a coroutine)."""
        async def call() -> Any:
            result = fn(*args)
            if hasattr(result, "__await__"):
                return await result
            return result

        return self.lt.run(call())

    def call(self, fn: Callable[[], Any]) -> Any:
        return self.lt.call(fn)

    def close(self) -> None:
        self.lt.run(self.emu.stop())
        self.lt.close()


def gpus(n: int, numa: bool = True) -> list[DeviceState]:
    return [
        DeviceState(id=f"GPU-{i:08x}-0000-0000-0000-000000000000", kind="gpu", index=str(i), name="NVIDIA H100",
                    health=HEALTHY, reason="", since=0.0, minor=i, pci_bus_id=f"00000000:{0x18 + i:02x}:00.0",
                    numa_node=(i * 2 // n) if numa else None, memory_mb=81559)
        for i in range(n)
    ]


class PluginClient:
    """A blocking DevicePlugin client over the unix socket, as the kubelet dials it."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        self.stub = pb_grpc.DevicePluginStub(self.channel)
        self.updates: queue.Queue[pb.ListAndWatchResponse | Exception] = queue.Queue()
        self._stream: Any = None

    def watch(self) -> None:
        self._stream = self.stub.ListAndWatch(pb.Empty())

        def read() -> None:
            try:
                for resp in self._stream:
                    self.updates.put(resp)
            except grpc.RpcError as e:
                self.updates.put(e)

        threading.Thread(target=read, daemon=True).start()

    def next_update(self, timeout: float = 10.0) -> pb.ListAndWatchResponse:
        item = self.updates.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def no_update_within(self, seconds: float) -> bool:
        try:
            self.updates.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        self.channel.close()
