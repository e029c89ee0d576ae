"""The bus sockets on real ipc:// endpoints: replay on subscribe, one publisher per
endpoint, a removed socket bound again, and junk dropped and counted."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from common.bus.messages import HealthEvent, HealthState
from common.bus.sockets import YIELD_EVERY, BusInUseError, BusLockError, BusPublisher, BusSubscriber


def state(seq: int) -> HealthState:
    return HealthState(incarnation="i", seq=seq, sent_at=time.time(), nvml_ok=True, error="", driver_version="")


def test_a_new_subscriber_gets_the_state_at_once_not_at_the_heartbeat(short_tmp: Path) -> None:
    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=3600)  # no heartbeat during the test
        task = asyncio.create_task(pub.run())
        try:
            pub.publish(state(7))
            for _ in range(3):  # each new subscriber, even after others
                sub = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
                msg = await sub.recv_timeout(5.0)
                sub.close()
                assert isinstance(msg, HealthState) and msg.seq == 7
        finally:
            task.cancel()
            pub.close()

    asyncio.run(run())


def test_heartbeat_resends_the_same_state_with_a_new_time(short_tmp: Path) -> None:
    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=0.05)
        task = asyncio.create_task(pub.run())
        sub = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
        try:
            pub.publish(state(3))
            first = await sub.recv_timeout(5.0)
            beats = [await sub.recv_timeout(5.0) for _ in range(3)]
            assert isinstance(first, HealthState)
            assert all(isinstance(b, HealthState) and b.seq == 3 and b.sent_at >= first.sent_at for b in beats)
        finally:
            sub.close()
            task.cancel()
            pub.close()

    asyncio.run(run())


def test_the_publisher_stamps_states_services_hand_it(short_tmp: Path) -> None:
    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=0.05)
        task = asyncio.create_task(pub.run())
        sub = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
        try:
            content = HealthState(nvml_ok=True, error="", driver_version="580")
            sent = [pub.publish_state(content) for _ in range(2)]
            assert [s.seq for s in sent] == [1, 2], "seq grows with every state handed over"
            assert {s.incarnation for s in sent} == {pub.incarnation} and len(pub.incarnation) == 12
            assert all(s.sent_at > 0 for s in sent)
            other = BusPublisher(short_tmp / "other.sock")
            assert other.incarnation != pub.incarnation, "incarnation is per publisher"
            other.close()

            def latest(m: object) -> bool:
                return isinstance(m, HealthState) and m.seq == 2

            first = await sub.recv_timeout(5.0)
            while not latest(first):
                first = await sub.recv_timeout(5.0)
            beat = await sub.recv_timeout(5.0)
            assert isinstance(first, HealthState) and isinstance(beat, HealthState)
            assert (beat.incarnation, beat.seq, beat.driver_version) == (pub.incarnation, 2, "580")
            assert beat.sent_at > first.sent_at, "a heartbeat is the same state, sent again"
        finally:
            sub.close()
            task.cancel()
            pub.close()

    asyncio.run(run())


def test_one_publisher_per_endpoint(short_tmp: Path) -> None:
    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock")
        try:
            with pytest.raises(BusInUseError, match="another process publishes"):
                BusPublisher(short_tmp / "health.sock")
        finally:
            pub.close()
        BusPublisher(short_tmp / "health.sock").close()  # free again once closed

    asyncio.run(run())


def test_a_removed_socket_and_run_dir_are_bound_again(short_tmp: Path) -> None:
    run_dir = short_tmp / "run"
    run_dir.mkdir(mode=0o700)

    async def run() -> None:
        pub = BusPublisher(run_dir / "health.sock", heartbeat_s=0.05)
        task = asyncio.create_task(pub.run())
        try:
            pub.publish(state(1))
            for p in run_dir.iterdir():
                p.unlink()
            run_dir.rmdir()
            sub = BusSubscriber([run_dir / "health.sock"], topics=["health.state"])
            msg = await sub.recv_timeout(5.0)
            sub.close()
            assert isinstance(msg, HealthState) and msg.seq == 1
            assert run_dir.stat().st_mode & 0o777 == 0o700
        finally:
            task.cancel()
            pub.close()

    asyncio.run(run())


def test_junk_is_dropped_and_counted(short_tmp: Path) -> None:
    path = short_tmp / "rogue.sock"
    rogue = zmq.Context.instance().socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.bind(f"ipc://{path}")

    async def run() -> None:
        sub = BusSubscriber([path])
        try:
            deadline = time.monotonic() + 10
            while sub.dropped < 3 and time.monotonic() < deadline:
                rogue.send_multipart([b"health.state", os.urandom(32)])
                rogue.send_multipart([b"nonsense", b"x"])
                rogue.send_multipart([b"a", b"b", b"c"])
                await sub.recv_timeout(0.05)
            assert sub.dropped >= 3 and sub.received == 0
        finally:
            sub.close()

    try:
        asyncio.run(run())
    finally:
        rogue.close(0)


def test_recv_latest_skips_to_the_newest_state(short_tmp: Path) -> None:
    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=3600)
        task = asyncio.create_task(pub.run())
        sub = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
        try:
            pub.publish(state(0))
            first = await sub.recv_timeout(5.0)
            assert isinstance(first, HealthState)
            for seq in range(1, 201):
                pub.publish(state(seq))
            seen = []
            while not seen or seen[-1] != 200:
                msg = await asyncio.wait_for(sub.recv_latest(), 5.0)
                assert isinstance(msg, HealthState)
                seen.append(msg.seq)
            assert len(seen) < 200, "a burst is coalesced, not handled one by one"
        finally:
            sub.close()
            task.cancel()
            pub.close()

    asyncio.run(run())


def test_recv_lets_the_loop_run_through_a_backlog(short_tmp: Path) -> None:
    """pyzmq's recv returns without yielding while frames wait: a consumer looping on recv through a
    storm would hold the loop for the whole backlog, so recv yields every YIELD_EVERY frames."""
    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=3600)
        task = asyncio.create_task(pub.run())
        sub = BusSubscriber([short_tmp / "health.sock"], topics=["health."])
        probe = BusSubscriber([short_tmp / "health.sock"], topics=["health."])
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        try:
            pub.publish(state(0))
            for s in (sub, probe):  # the replay of the state: each subscription is in
                assert isinstance(await asyncio.wait_for(s.recv(), 5.0), HealthState)
            n = 10 * YIELD_EVERY
            for i in range(n):
                pub.publish(HealthEvent(time=float(i), device="GPU-0", event="xid", xid=i))
            # The probe has the last one: the backlog is waiting for the subscriber too.
            while not isinstance(msg := await asyncio.wait_for(probe.recv(), 5.0), HealthEvent) or msg.xid != n - 1:
                pass
            other = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            ticks = 0
            for _ in range(n):
                await sub.recv()
            other.cancel()
            assert ticks >= n // YIELD_EVERY - 1, f"{ticks} turns of another task while {n} messages were read"
        finally:
            sub.close()
            probe.close()
            task.cancel()
            pub.close()

    asyncio.run(run())


def _plant_symlink(lock: Path, target: Path) -> None:
    lock.symlink_to(target)


def _plant_dangling_symlink(lock: Path, target: Path) -> None:
    lock.symlink_to(target.with_name("nowhere"))


def _plant_directory(lock: Path, target: Path) -> None:
    lock.mkdir()


def _plant_fifo(lock: Path, target: Path) -> None:
    os.mkfifo(lock)


@pytest.mark.parametrize(
    ("plant", "why"),
    [(_plant_symlink, "is a symlink"), (_plant_dangling_symlink, "is a symlink"),
     (_plant_directory, "is not a regular file"), (_plant_fifo, "is not a regular file")],
    ids=["symlink", "dangling-symlink", "directory", "fifo"],
)
def test_a_lock_path_that_is_not_a_plain_file_is_refused_and_nothing_is_touched(
    short_tmp: Path, plant: Any, why: str
) -> None:
    # Root opening a planted symlink with O_TRUNC would empty whatever file it points to.
    target = short_tmp / "precious"
    target.write_bytes(b"not yours")
    plant(short_tmp / "health.sock.lock", target)
    with pytest.raises(BusLockError, match=f"health.sock.lock {why}"):
        BusPublisher(short_tmp / "health.sock")
    assert target.read_bytes() == b"not yours"
    assert not (short_tmp / "health.sock").exists(), "nothing bound without the lock"
    assert not (short_tmp / "nowhere").exists(), "a dangling symlink's target is not created"


def test_an_existing_lock_file_is_reused_not_truncated(short_tmp: Path) -> None:
    lock = short_tmp / "health.sock.lock"
    lock.write_bytes(b"left by an earlier publisher")
    pub = BusPublisher(short_tmp / "health.sock")
    try:
        assert lock.read_bytes() == b"left by an earlier publisher"
        fd = pub._lock_fd
        assert os.get_inheritable(fd) is False, "a child process must not inherit the lock"
    finally:
        pub.close()


def test_a_subscription_flood_is_answered_by_a_few_coalesced_replays(short_tmp: Path) -> None:
    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=3600)  # no heartbeat during the test
        task = asyncio.create_task(pub.run())
        honest = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
        flooder = zmq.Context.instance().socket(zmq.XSUB)
        flooder.setsockopt(zmq.LINGER, 0)
        flooder.setsockopt(zmq.SNDHWM, 0)  # every frame reaches the publisher
        try:
            pub.publish(state(1))
            first = await honest.recv_timeout(10.0)
            assert isinstance(first, HealthState)
            flooder.connect(f"ipc://{short_tmp / 'health.sock'}")
            for _ in range(50_000):
                flooder.send(b"\x01health.state")
                flooder.send(b"\x00health.state")
            deadline = time.monotonic() + 120
            while pub.subscriptions < 50_000 + 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert pub.subscriptions == 50_000 + 1, "the publisher saw every subscription"
            # The old publisher replayed for each: tens of thousands of copies to every subscriber.
            copies = 0
            while (msg := await honest.recv_timeout(0.5)) is not None:
                assert isinstance(msg, HealthState) and msg.seq == 1
                copies += 1
            assert copies <= 2000, f"{copies} replays for one flood"
            # A flood over, an honest newcomer still gets the state at once.
            late = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
            try:
                assert isinstance(await late.recv_timeout(10.0), HealthState)
            finally:
                late.close()
        finally:
            flooder.close(0)
            honest.close()
            task.cancel()
            pub.close()

    asyncio.run(run())


def test_a_heartbeat_of_the_state_held_is_not_decoded_again(short_tmp: Path) -> None:
    """The same bytes with a new time are the state held: the subscriber keeps what it decoded
    (the very same device list object) and takes the new time. Anything else is decoded: new
    content behind the same seq, and a broken payload, which is dropped and counted."""
    from common.bus.codec import encode

    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=3600)
        sub = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
        try:
            # No pub.run(): its replays would interleave. Wait for the subscription itself.
            assert pub._raw.poll(5000) and pub._raw.recv()[:1] == b"\x01"
            first_state = dataclasses.replace(state(5), driver_version="580")
            pub.publish(first_state)
            first = await sub.recv_timeout(5.0)
            assert isinstance(first, HealthState) and first.driver_version == "580"
            pub.publish(dataclasses.replace(first_state, sent_at=first.sent_at + 7))
            beat = await sub.recv_timeout(5.0)
            assert isinstance(beat, HealthState) and beat.sent_at == first.sent_at + 7
            assert beat.devices is first.devices, "reused, not decoded again"
            pub.publish(dataclasses.replace(first_state, driver_version="590"))  # same seq, other content
            other = await sub.recv_timeout(5.0)
            assert isinstance(other, HealthState) and (other.seq, other.driver_version) == (5, "590")
            topic, payload = encode(dataclasses.replace(first_state, driver_version="590", sent_at=1.0))
            pub._raw.send_multipart([topic, payload[:-3]])  # same seq, broken
            assert await sub.recv_timeout(0.5) is None and sub.dropped == 1
        finally:
            sub.close()
            pub.close()

    asyncio.run(run())


def test_a_send_while_a_subscription_arrives_does_not_delay_its_replay(short_tmp: Path) -> None:
    """A send processes libzmq's pending commands, which drains the descriptor the publisher's
    poll waits on; a subscription that came in meanwhile must still be answered at once, not at
    the next heartbeat (here: never within the test)."""
    from common.bus.messages import HealthEvent

    async def run() -> None:
        pub = BusPublisher(short_tmp / "health.sock", heartbeat_s=3600)
        task = asyncio.create_task(pub.run())
        pub.publish(state(4))
        sub = BusSubscriber([short_tmp / "health.sock"], topics=["health.state"])
        try:
            await asyncio.sleep(0)  # run() is polling
            time.sleep(0.2)  # the loop is busy (blocked) while the subscription arrives: the race itself
            pub.publish(HealthEvent(time=1.0, device="", event="nvml", reason="another topic"))
            msg = await sub.recv_timeout(5.0)
            assert isinstance(msg, HealthState) and msg.seq == 4
        finally:
            sub.close()
            task.cancel()
            pub.close()

    asyncio.run(run())
