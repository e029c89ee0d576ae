"""ZeroMQ sockets of the bus: a publisher that replays its state to every new subscriber,
and a subscriber that drops and counts whatever it cannot decode.

Snapshot mechanism: the publisher binds an XPUB socket with XPUB_VERBOSE, so every
subscription a subscriber sends (at connect, and again after any reconnect) reaches the
publisher, which answers by re-sending its current state messages at once. A new
subscriber therefore has the full state within a round trip, not at the next heartbeat,
with no second socket to keep in step. Heartbeats re-send the same state (same seq,
new sent_at) at least once a second.

Only one process may publish on an endpoint: binding an ipc:// path silently takes it
over from a live owner, so the publisher first takes an exclusive flock next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import zmq
import zmq.asyncio

from common.bus.codec import MAX_PAYLOAD, BusDecodeError, decode, encode
from common.bus.messages import Message
from common.fswatch import file_id
from common.lifecycle import FatalError, ensure_private_dir

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
MAX_DRAIN = 256  # superseded states skipped per receive, bounding the work between two yields
# AF_UNIX paths are limited to 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107


class BusInUseError(FatalError):
    """Another live process already publishes on this endpoint."""


def ipc_address(path: Path) -> str:
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise ValueError(f"bus socket path {path} is longer than {MAX_IPC_PATH} bytes; use a shorter run dir")
    return f"ipc://{path}"


class BusPublisher:
    """Publishes messages on `<run_dir>/<name>`; remembers state messages for replay."""

    def __init__(self, path: Path, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = path
        self._heartbeat_s = heartbeat_s
        self._lock_file = self._take_lock(path)
        self._sock = zmq.asyncio.Context.instance().socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._sock.setsockopt(zmq.SNDHWM, 10000)
        self._bound = ""
        self._bind()
        self._states: dict[str, Message] = {}
        self.sent = 0

    def _bind(self) -> None:
        # We hold the lock: whatever socket file is there was left by a dead publisher.
        self.path.unlink(missing_ok=True)
        self._sock.bind(ipc_address(self.path))
        os.chmod(self.path, 0o600)
        self._bound = file_id(self.path)

    def _ensure_bound(self) -> None:
        """Re-binds when someone removed our socket file (or the whole run directory)."""
        if file_id(self.path) == self._bound:
            return
        log.warning("bus socket %s was removed; binding it again", self.path)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.unbind(ipc_address(self.path))
        ensure_private_dir(self.path.parent)
        if not self.path.with_name(self.path.name + ".lock").exists():
            self._lock_file.close()
            self._lock_file = self._take_lock(self.path)
        self._bind()

    @staticmethod
    def _take_lock(path: Path) -> IO[bytes]:
        f = open(path.with_name(path.name + ".lock"), "wb")  # noqa: SIM115 - held for the life of the publisher
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise BusInUseError(f"another process publishes on {path}") from None
        return f

    async def publish(self, msg: Message) -> None:
        if msg.TOPIC.endswith(".state"):
            self._states[msg.TOPIC] = msg
        await self._send(msg)

    async def _send(self, msg: Message) -> None:
        topic, payload = encode(msg)
        await self._sock.send_multipart([topic, payload])
        self.sent += 1

    async def _resend_states(self) -> None:
        for topic, msg in list(self._states.items()):
            if hasattr(msg, "sent_at"):
                msg = dataclasses.replace(msg, sent_at=time.time())  # type: ignore[call-arg]
                self._states[topic] = msg
            await self._send(msg)

    async def run(self) -> None:
        """Answers subscriptions with the current state and sends heartbeats; runs forever."""
        next_beat = time.monotonic() + self._heartbeat_s
        while True:
            timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000))
            if await self._sock.poll(timeout=timeout_ms):
                frame = await self._sock.recv()
                # \x01<topic> is a subscription; anything else (unsubscribe, junk) needs nothing.
                if frame[:1] == b"\x01":
                    await self._resend_states()
                continue
            self._ensure_bound()
            await self._resend_states()
            next_beat = time.monotonic() + self._heartbeat_s

    def close(self) -> None:
        self._sock.close(linger=0)
        if file_id(self.path) == self._bound:
            self.path.unlink(missing_ok=True)
        self._lock_file.close()


class BusSubscriber:
    """Receives decoded messages of the given topic prefixes from one or more publishers."""

    def __init__(self, paths: Iterable[Path], topics: Iterable[str] = ("",)) -> None:
        self._sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Reconnect fast after a publisher restart; back off to 1 s while it stays away.
        self._sock.setsockopt(zmq.RECONNECT_IVL, 20)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # An oversized frame never reaches us: libzmq drops that connection instead.
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD + 1024)
        for t in topics:
            self._sock.setsockopt(zmq.SUBSCRIBE, t.encode("ascii"))
        for p in paths:
            self._sock.connect(ipc_address(p))
        self.received = 0
        self.dropped = 0

    def _decode(self, frames: list[bytes]) -> Message | None:
        """The message, or None after counting the drop."""
        if len(frames) != 2:
            self._drop(f"{len(frames)} frames, expected 2")
            return None
        try:
            msg = decode(frames[0], frames[1])
        except BusDecodeError as e:
            self._drop(str(e))
            return None
        self.received += 1
        return msg

    async def recv(self) -> Message:
        while True:
            msg = self._decode(await self._sock.recv_multipart())
            if msg is not None:
                return msg

    async def recv_latest(self) -> Message:
        """The newest of the messages waiting (at least one), after yielding to the loop.

        For full-state topics only the newest matters, and a flood of states must neither pile
        up work nor starve the loop: pyzmq's recv returns without yielding when a message is
        already there, so a consumer looping on recv() alone would never let gRPC run. At most
        MAX_DRAIN waiting messages are skipped per call, and only the newest is decoded.
        """
        msg = await self.recv()
        waiting: list[list[bytes]] = []
        for _ in range(MAX_DRAIN):
            try:
                waiting.append(await self._sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        for frames in reversed(waiting):
            newer = self._decode(frames)
            if newer is not None:
                msg = newer
                break
        await asyncio.sleep(0)
        return msg

    async def recv_timeout(self, timeout_s: float) -> Message | None:
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can swallow a cancellation (3.11)
                return await self.recv()
        except TimeoutError:
            return None

    def _drop(self, why: str) -> None:
        self.dropped += 1
        # Log the first few and then every 1000th: a flood must not become a log flood.
        if self.dropped <= 10 or self.dropped % 1000 == 0:
            log.warning("dropped bus message (%d so far): %s", self.dropped, why)

    def close(self) -> None:
        self._sock.close(linger=0)
