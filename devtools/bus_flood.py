"""A misbehaving bus client for tests and benchmarks: subscribe/unsubscribe frames sent as
fast as the publisher takes them (what `bus tail` in a tight loop, or a hostile local user,
does to a publisher), from a thread, until stopped."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

import zmq


class SubscriptionFlood:
    def __init__(self, endpoint: Path, topic: bytes = b"health.state") -> None:
        # XSUB, not SUB: its subscriptions are plain frames, sent at the pace libzmq's send HWM
        # allows, i.e. as fast as the publisher reads them.
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XSUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"ipc://{endpoint}")
        self._frames = (b"\x01" + topic, b"\x00" + topic)
        self._stop = threading.Event()
        self.sent = 0  # frames sent so far (read from another thread: a lower bound)
        self._thread = threading.Thread(target=self._run, name="bus-flood", daemon=True)

    def _run(self) -> None:
        subscribe, unsubscribe = self._frames
        while not self._stop.is_set():
            for _ in range(1000):
                self._sock.send(subscribe)
                self._sock.send(unsubscribe)
            self.sent += 2000

    def __enter__(self) -> SubscriptionFlood:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(0)
