"""Blocking bus subscriber for tests: subscribe first, act, then wait for a matching message."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import zmq

from common.bus.codec import BusDecodeError, decode
from common.bus.messages import Message


class BusWatch:
    def __init__(self, path: Path, topics: tuple[str, ...] = ("",)) -> None:
        self.path = path
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 20)
        # Everything is subscribed and filtered here, so that the publisher's state replay
        # proves the subscription is live before the test acts (events are not replayed).
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(f"ipc://{path}")
        self._topics = topics
        self.seen: list[Message] = []
        if not self._sock.poll(15000):
            raise AssertionError(f"no publisher answered on {path}")

    def wait(self, predicate: Callable[[Message], bool], timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(int(left * 1000) + 1):
                break
            frames = self._sock.recv_multipart()
            try:
                msg = decode(frames[0], frames[1])
            except (BusDecodeError, IndexError):
                continue
            self.seen.append(msg)
            if msg.TOPIC.startswith(self._topics) and predicate(msg):
                return msg
        raise AssertionError(
            f"no matching message on {self.path} within {timeout} s (last seen: {[m.TOPIC for m in self.seen[-5:]]})"
        )

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> BusWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_message(
    path: Path, predicate: Callable[[Message], bool], timeout: float = 10.0, topics: tuple[str, ...] = ("",)
) -> Message:
    with BusWatch(path, topics) as w:
        return w.wait(predicate, timeout)
