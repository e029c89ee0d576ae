"""ZeroMQ sockets of the bus: a publisher that replays its state to every new subscriber,
and a subscriber that drops and counts whatever it cannot decode.

Snapshot mechanism: the publisher binds an XPUB socket with XPUB_VERBOSE, so every
subscription a subscriber sends (at connect, and again after any reconnect) reaches the
publisher, which answers by re-sending its current state messages: at once after a quiet
spell, else with the next coalesced replay (REPLAY_INTERVAL_S). A new subscriber therefore
has the full state within a round trip or 50 ms, not at the next heartbeat, with no second
socket to keep in step, and a flood of subscriptions costs one replay per interval.
Heartbeats re-send the same state (same seq, new sent_at) every heartbeat period (5 s by default).

Only one process may publish on an endpoint: binding an ipc:// path silently takes it
over from a live owner, so the publisher first takes an exclusive flock next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import math
import os
import stat
import time
import typing
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import zmq
import zmq.asyncio

from common.bus.codec import MAX_PAYLOAD, BusDecodeError, decode, encode, resent_at
from common.bus.messages import Message, StateMessage
from common.fswatch import file_id
from common.heartbeat import loop_answered
from common.lifecycle import FatalError, PermanentError, ensure_private_dir

log = logging.getLogger(__name__)

S = TypeVar("S", bound=StateMessage)

# The default of a publisher made without settings (tests, tools); the services' is
# Settings.heartbeat_s, a third of GPU_PLUGIN_STALE_AFTER (5 s by default): a heartbeat is a
# wake-up of every publisher and subscriber, so at idle it is most of what the stack does.
HEARTBEAT_S = 5.0
# A new subscriber waits at most this long for the state when another subscribed just before.
REPLAY_INTERVAL_S = 0.05
SUBSCRIPTION_BATCH = 1000  # frames read between two yields to the event loop
# Per subscriber; message bodies are shared between subscribers, so stalled ones cost ~1000
# states at most, not 1000 each. Lower would drop the newest state of an honest burst.
SEND_HWM = 1000
MAX_SUBSCRIPTION = 256  # bytes: \x01 or \x00 and a topic prefix; the longest topic has 15
MAX_DRAIN = 256  # superseded states skipped per receive, bounding the work between two yields
# recv() lets the loop run once per this many frames: pyzmq's recv returns without yielding while
# frames wait, so a consumer looping on it through a storm would starve every other task (the
# writers it feeds, the watchdog's ping) until the backlog is gone.
YIELD_EVERY = 64
# AF_UNIX paths are limited to 108 bytes including the terminating NUL.
MAX_IPC_PATH = 107


class BusInUseError(FatalError):
    """Another live process already publishes on this endpoint."""


class BusLockError(PermanentError):
    """The lock path is not a plain file of ours."""


def ipc_address(path: Path) -> str:
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise ValueError(f"bus socket path {path} is longer than {MAX_IPC_PATH} bytes; use a shorter run dir")
    return f"ipc://{path}"


class BusPublisher:
    """Publishes messages on `<run_dir>/<name>`; remembers state messages for replay."""

    def __init__(self, path: Path, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = path
        self._heartbeat_s = heartbeat_s
        self._lock_fd = self._take_lock(path)
        self._sock = zmq.asyncio.Context.instance().socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        # States supersede each other and events are for humans: a subscriber that stops reading
        # (a suspended `bus tail`) costs at most this many messages here, then misses some.
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        # What arrives here is subscriptions (a topic prefix): libzmq drops a connection that
        # announces a bigger frame before buffering it, where it used to take any size.
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION)
        # Subscription frames are drained synchronously in batches: no future per frame.
        self._raw: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)
        self._bound = ""
        self._bind()
        self._states: dict[str, StateMessage] = {}
        self.incarnation = uuid.uuid4().hex[:12]
        self._seq: dict[str, int] = {}
        self.subscriptions = 0  # subscription frames seen (a flood shows here, not in replays)

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
            os.close(self._lock_fd)
            self._lock_fd = self._take_lock(self.path)
        self._bind()

    @staticmethod
    def _take_lock(path: Path) -> int:
        """An exclusive flock on `<path>.lock`, held (fd open) for the life of the publisher.

        The run dir may hold anything a root process left there, so the lock path is opened
        without following a symlink (root would otherwise truncate or create the file it points
        to), without truncating (the file may be someone else's), and closed on exec (a child
        holding it would keep the bus locked after we die). Only a regular file will do: a
        FIFO or a device would block or act on open, a directory cannot be locked meaningfully.
        """
        lock = path.with_name(path.name + ".lock")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = os.open(lock, flags, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BusLockError(f"bus lock {lock} is a symlink; refusing to follow it (remove it)") from None
            if e.errno == errno.EISDIR:
                raise BusLockError(f"bus lock {lock} is not a regular file (a directory); remove it") from None
            raise BusLockError(f"bus lock {lock} cannot be opened: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise BusLockError(f"bus lock {lock} is not a regular file (mode {stat.filemode(mode)}); remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusInUseError(f"another process publishes on {path}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def publish_state(self, state: S) -> S:
        """Stamps `state` with this publisher's incarnation, the next seq of its topic and the
        time, publishes it and keeps it for replay; returns it as sent."""
        seq = self._seq.get(state.TOPIC, 0) + 1
        self._seq[state.TOPIC] = seq
        stamped = dataclasses.replace(state, incarnation=self.incarnation, seq=seq, sent_at=time.time())
        self.publish(stamped)
        return stamped

    def publish(self, msg: Message) -> None:
        """Sends `msg` as it is: events, and states that a test or tool stamped itself."""
        if isinstance(msg, StateMessage):
            self._states[msg.TOPIC] = msg
        self._send(msg)

    def _send(self, msg: Message) -> None:
        topic, payload = encode(msg)
        # At once, from whichever loop callback has news: an XPUB send never blocks (a subscriber
        # at its high-water mark misses the message instead), so the future is done on return and
        # no loop iteration stands between a fault and the wire. Through the asyncio socket, not
        # the raw one: a send processes libzmq's pending commands, which drains the descriptor
        # run()'s poll waits on, and only pyzmq's own send then re-checks for a subscription that
        # came in meanwhile (else it waited for the next heartbeat).
        sent = self._sock.send_multipart([topic, payload], zmq.NOBLOCK)
        typing.cast("asyncio.Future[object]", sent).result()  # done already; raises what the send raised

    def _resend_states(self) -> None:
        for topic, msg in list(self._states.items()):
            msg = dataclasses.replace(msg, sent_at=time.time())  # same seq: nothing changed
            self._states[topic] = msg
            self._send(msg)

    async def run(self) -> None:
        """Answers subscriptions with the current state and sends heartbeats; runs forever.

        Subscriptions are drained in batches and answered by one replay per REPLAY_INTERVAL_S
        at most: a replay reaches every subscriber at once, so it covers every subscription
        read before it, and a flood of them (a script looping on `bus tail`) costs one state
        per interval instead of one per subscription, per subscriber. The first subscription
        after a quiet spell is answered at once; between batches the loop yields, so that a
        fault's state goes out before any further replay work.
        """
        next_beat = time.monotonic() + self._heartbeat_s
        replay_at: float | None = None  # a coalesced replay is due at this time
        last_replay = -REPLAY_INTERVAL_S
        while True:
            wake = next_beat if replay_at is None else min(next_beat, replay_at)
            timeout_ms = max(0, math.ceil((wake - time.monotonic()) * 1000))
            if await self._sock.poll(timeout=timeout_ms) and self._drain_subscriptions():
                due = max(time.monotonic(), last_replay + REPLAY_INTERVAL_S)
                replay_at = due if replay_at is None else min(replay_at, due)
            now = time.monotonic()
            if now >= next_beat:
                self._ensure_bound()
                next_beat = now + self._heartbeat_s
                loop_answered()  # the watchdog's proof that the loop runs, without a ping of its own
                replay_at = now  # the heartbeat is a replay: it answers the pending subscriptions
            if replay_at is not None and now >= replay_at:
                self._resend_states()
                replay_at, last_replay = None, time.monotonic()
            # pyzmq's poll returns without yielding when a frame is already waiting.
            await asyncio.sleep(0)

    def _drain_subscriptions(self) -> bool:
        """Reads up to SUBSCRIPTION_BATCH waiting frames; whether any was a subscription."""
        subscribed = False
        for _ in range(SUBSCRIPTION_BATCH):
            try:
                frame = self._raw.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            # \x01<topic> is a subscription; anything else (unsubscribe, junk) needs nothing.
            if frame[:1] == b"\x01":
                self.subscriptions += 1
                subscribed = True
        return subscribed

    def close(self) -> None:
        self._sock.close(linger=0)
        if file_id(self.path) == self._bound:
            self.path.unlink(missing_ok=True)
        os.close(self._lock_fd)


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
        self._raw: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)  # drained without futures
        for p in paths:
            self._sock.connect(ipc_address(p))
        self.received = 0
        self.dropped = 0
        self._frames = 0  # frames taken by recv(), junk included: every YIELD_EVERY-th lets the loop run
        self._states: dict[bytes, tuple[bytes, StateMessage]] = {}  # per topic: the last state decoded

    def _decode(self, frames: list[bytes]) -> Message | None:
        """The message, or None after counting the drop."""
        if len(frames) != 2:
            self._drop(f"{len(frames)} frames, expected 2")
            return None
        topic, payload = frames
        held = self._states.get(topic)
        if held is not None:
            sent_at = resent_at(held[0], payload)
            if sent_at is not None:
                # A heartbeat or replay of the state we hold, the same bytes but the time: it
                # was checked when it first came; decoding it again cost every subscriber ~0.2 ms
                # per publisher per second.
                self.received += 1
                return dataclasses.replace(held[1], sent_at=sent_at)
        try:
            msg = decode(topic, payload)
        except BusDecodeError as e:
            self._drop(str(e))
            return None
        if isinstance(msg, StateMessage):
            self._states[topic] = (payload, msg)
        self.received += 1
        return msg

    async def recv(self) -> Message:
        while True:
            self._frames += 1
            if self._frames % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            msg = self._decode(await self._sock.recv_multipart())
            if msg is not None:
                return msg

    async def recv_latest(self) -> Message:
        """The newest of the messages waiting (at least one).

        For full-state topics only the newest matters, and a flood of states must neither pile
        up work nor starve the loop: pyzmq's recv returns without yielding when a message is
        already there, so a consumer looping on recv() alone would never let gRPC run. When a
        message was already waiting, this yields to the loop once before returning; when none
        was, the wait itself did (and a fault's state costs no extra loop iteration). At most
        MAX_DRAIN waiting messages are skipped per call, and only the newest is decoded.
        """
        waiting = self._waiting()
        if waiting:
            await asyncio.sleep(0)
        else:
            waiting = [await self._sock.recv_multipart()]  # the loop ran while this waited
            waiting += self._waiting()
        for frames in reversed(waiting):
            msg = self._decode(frames)
            if msg is not None:
                return msg
        return await self.recv()  # all of them were junk (counted)

    def _waiting(self) -> list[list[bytes]]:
        """Up to MAX_DRAIN messages already received, oldest first, without futures."""
        out: list[list[bytes]] = []
        for _ in range(MAX_DRAIN):
            try:
                out.append(self._raw.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        return out

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
