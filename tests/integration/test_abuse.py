"""Bad input, churn and bus abuse against a live plugin-server: every request gets a usable
answer or a clear gRPC status, and the server keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import select
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.bus.codec import MAX_PAYLOAD, encode
from common.bus.messages import UNHEALTHY, HealthState, PluginState
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from devtools.bus_flood import SubscriptionFlood
from devtools.devstack import RESOURCE, DevStack
from services.plugin_server.servicer import MAX_STREAMS
from tests.conftest import Procs, wait_until
from tests.integration.busclient import BusWatch
from tests.integration.conftest import MakeNode
from tests.integration.fakes import FakeHealthMonitor, PluginClient, gpus


@dataclasses.dataclass
class Server:
    """A plugin-server under test, alone (fed by a test-side health publisher) or under
    supervisord with the rest of the stack (fed by the simulated health-monitor)."""

    run: Path
    sock: Path
    ids: list[str]
    client: PluginClient

    def alive(self) -> bool:
        try:
            resp = self.client.stub.Allocate(pb.AllocateRequest(container_requests=[
                pb.ContainerAllocateRequest(devices_ids=self.ids[:1])]), timeout=5)
        except grpc.RpcError as e:
            # The socket file appears at bind(), a moment before the server accepts on it.
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return False
            raise
        return bool(resp.container_responses[0].envs)

    def set_health(self, device: str, healthy: bool) -> None:
        raise NotImplementedError

    def release_health_bus(self) -> None:
        """Stops the real health publisher, so that a rogue one can bind its endpoint."""
        raise NotImplementedError

    def restore_health_bus(self) -> None:
        raise NotImplementedError


class AloneServer(Server):
    def __init__(self, run: Path, sock: Path, health: FakeHealthMonitor) -> None:
        super().__init__(run, sock, [d.id for d in health.devices], PluginClient(sock))
        self.health = health
        self.healthy = list(health.devices)

    def set_health(self, device: str, healthy: bool) -> None:
        self.health.publish([d if healthy or d.id != device else dataclasses.replace(d, health=UNHEALTHY)
                             for d in self.healthy])

    def release_health_bus(self) -> None:
        self.health.close()

    def restore_health_bus(self) -> None:
        self.health = FakeHealthMonitor(self.run, self.healthy)


class SupervisedServer(Server):
    def __init__(self, stack: DevStack) -> None:
        state = stack.kubelet.wait(RESOURCE, allocatable=8, connected=True, timeout=30)
        assert state["ok"], stack.logs()
        sock = stack.dp_dir / "nvidia-gpu.sock"
        super().__init__(stack.run_dir, sock, list(state["state"]["resources"][RESOURCE]["devices"]),
                         PluginClient(sock))
        self.stack = stack

    def set_health(self, device: str, healthy: bool) -> None:
        self.stack.inject("recover" if healthy else "lost", device)

    def release_health_bus(self) -> None:
        self.stack.ctl("stop", "health-monitor")

    def restore_health_bus(self) -> None:
        self.stack.ctl("start", "health-monitor")


# The plugin-server publishes what it counts (bus_dropped) with its heartbeat, a third of this: every
# second, not every 5 s as by default (15 s).
STALE_AFTER = {"GPU_PLUGIN_STALE_AFTER": "3s"}


@pytest.fixture(params=["alone", pytest.param("supervised", marks=pytest.mark.e2e)])
def server(request: pytest.FixtureRequest, procs: Procs, short_tmp: Path) -> Iterator[Server]:
    if request.param == "alone":
        run, dp = short_tmp / "run", short_tmp / "dp"
        health = FakeHealthMonitor(run, gpus(8))
        proc = procs.start("ps", "plugin-server", env={"GPU_PLUGIN_RUN_DIR": str(run),
                                                       "KUBELET_SOCKET": str(dp / "kubelet.sock"), **STALE_AFTER})
        sock = dp / "nvidia-gpu.sock"
        wait_until(sock.exists, 15, "the plugin socket")
        alone = AloneServer(run, sock, health)
        wait_until(alone.alive, 10, "the server answering")
        yield alone
        alone.client.close()
        alone.health.close()
        assert proc.poll() is None, "the plugin-server survived everything"
        return
    # A GPU lost (set_health) is seen at the health-monitor's next probe: within a second, not 10.
    stack = DevStack(fleet="dgx-h100-8", env={**STALE_AFTER, "HEALTH_PROBE_INTERVAL": "1s"})
    stack.start()
    try:
        supervised = SupervisedServer(stack)
        pid = stack.pid("plugin-server")
        yield supervised
        supervised.client.close()
        assert stack.pid("plugin-server") == pid, "the plugin-server survived everything"
    finally:
        stack.stop()
        stack.cleanup()


ids_strategy = st.lists(st.one_of(st.text(max_size=300), st.sampled_from(["GPU-00000000-0000-0000-0000-000000000000"])),
                        max_size=50)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=ids_strategy)
def test_allocate_bad_ids_get_a_clear_status(server: Server, ids: list[str]) -> None:
    req = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)])
    valid = bool(ids) and set(ids) <= set(server.ids) and len(set(ids)) == len(ids)
    if valid:
        assert server.client.stub.Allocate(req, timeout=5).container_responses
        return
    with pytest.raises(grpc.RpcError) as err:
        server.client.stub.Allocate(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith('invalid allocation request for "nvidia.com/gpu"')


@pytest.mark.parametrize(
    "ids",
    [[], ["GPU-nope"], None, ["x" * 100_000], ["ГПУ-устройство", "🙂"], [str(i) for i in range(10_000)]],
    ids=["empty", "unknown", "duplicates", "very-long", "non-ascii", "ten-thousand"],
)
def test_allocate_edge_cases(server: Server, ids: list[str] | None) -> None:
    ids = [server.ids[0], server.ids[0]] if ids is None else ids
    with pytest.raises(grpc.RpcError) as err:
        server.client.stub.Allocate(pb.AllocateRequest(container_requests=[
            pb.ContainerAllocateRequest(devices_ids=ids)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details()) < 2000, "the message stays readable"
    assert server.alive()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.integers(min_value=-2, max_value=10), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
       avail=st.lists(st.integers(0, 9), unique=True), must=st.lists(st.integers(0, 9), unique=True, max_size=3))
def test_preferred_allocation_answers_usably_or_refuses_clearly(
    server: Server, size: int, avail: list[int], must: list[int]
) -> None:
    # Once, any request was answered: IDs not served, sizes beyond `available`, an empty OK
    # for size -1. What the kubelet can send is answered; anything else is INVALID_ARGUMENT.
    names = [*server.ids, "GPU-unknown-a", "GPU-unknown-b"]
    available = [names[i] for i in avail]
    must_include = [names[i] for i in must]
    req = pb.PreferredAllocationRequest(container_requests=[pb.ContainerPreferredAllocationRequest(
        available_deviceIDs=available, must_include_deviceIDs=must_include, allocation_size=size)])
    legal = (set(available) <= set(server.ids) and set(must_include) <= set(available)
             and size >= 1 and len(must_include) <= size <= len(available))
    if not legal:
        with pytest.raises(grpc.RpcError) as err:
            server.client.stub.GetPreferredAllocation(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith('invalid preferred allocation request for "nvidia.com/gpu"')
        return
    chosen = list(server.client.stub.GetPreferredAllocation(req, timeout=5).container_responses[0].deviceIDs)
    assert chosen[: len(must_include)] == must_include, "must_include always honoured, first"
    assert set(chosen) <= set(available)
    assert len(chosen) == len(set(chosen)) == size


def _streams(server: Server) -> int:
    with BusWatch(server.run / "plugin.sock", ("plugin.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, PluginState) and bool(m.endpoints))
    assert isinstance(msg, PluginState)
    return msg.endpoints[0].streams


def test_list_and_watch_churn_and_two_streams(server: Server) -> None:
    baseline = _streams(server)  # the kubelet's own stream, under supervisord
    for _ in range(50):
        c = PluginClient(server.sock)
        c.watch()
        assert len(c.next_update().devices) == 8
        c.close()
    a, b = PluginClient(server.sock), PluginClient(server.sock)
    try:
        a.watch()
        b.watch()
        assert len(a.next_update().devices) == len(b.next_update().devices) == 8
        server.set_health(server.ids[3], False)
        for c in (a, b):
            wait_until(lambda c=c: [d.health for d in c.next_update().devices].count("Unhealthy") == 1, 10,
                       "the change on both streams")
    finally:
        a.close()
        b.close()
    wait_until(lambda: _streams(server) == baseline, 10, "closed streams counted out")


FLOOD = 2000  # past what grpc.aio's server held by default (1 000 calls waiting), and past MAX_STREAMS


async def _open_streams(sock: Path, n: int) -> tuple[Counter[str], list[str]]:
    """Opens `n` ListAndWatch streams at once; how each began (served: the device list came;
    else its status code), and the details of the refusals. The streams are cancelled at the end."""
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        stub = pb_grpc.DevicePluginStub(channel)
        calls = [stub.ListAndWatch(pb.Empty()) for _ in range(n)]
        details: list[str] = []

        async def first(call: grpc.aio.UnaryStreamCall[pb.Empty, pb.ListAndWatchResponse]) -> str:
            try:
                resp = await call.read()
            except grpc.aio.AioRpcError as e:
                details.append(e.details() or "")
                code: str = e.code().name
                return code
            assert isinstance(resp, pb.ListAndWatchResponse) and len(resp.devices) == 8
            return "served"

        outcomes = Counter(await asyncio.gather(*(first(c) for c in calls)))
        for c in calls:
            c.cancel()
    return outcomes, details


_ONE = re.compile(r"ListAndWatch stream on \S+ (refused|ended|failed) \(([^)]*)\)")
_MANY = re.compile(r"(\d+) (refused|ended|failed) \(([^)]*)\)")


def _stream_log(text: str) -> tuple[Counter[str], int]:
    """Stream outcomes told by the plugin-server's log ("refused (why)": count), and in how many lines."""
    told: Counter[str] = Counter()
    lines = 0
    for line in text.splitlines():
        if "ListAndWatch streams on " in line:
            lines += 1
            for n, verb, why in _MANY.findall(line):
                told[f"{verb} ({why})"] += int(n)
        elif m := _ONE.search(line):
            lines += 1
            told[f"{m[1]} ({m[2]})"] += 1
    return told, lines


def test_list_and_watch_flood_every_stream_is_answered_and_logged(procs: Procs, short_tmp: Path) -> None:
    # 2 000 streams at once: on grpc.aio's server 50 to 160 ended CANCELLED, refused by gRPC core before
    # the servicer saw them, and nothing said so. Every one must reach the servicer and be answered.
    run, dp = short_tmp / "run", short_tmp / "dp"
    server = AloneServer(run, dp / "nvidia-gpu.sock", FakeHealthMonitor(run, gpus(8)))
    try:
        proc = procs.start("ps", "plugin-server", env={"GPU_PLUGIN_RUN_DIR": str(run),
                                                       "KUBELET_SOCKET": str(dp / "kubelet.sock")})
        wait_until(server.sock.exists, 15, "the plugin socket")
        wait_until(server.alive, 10, "the server answering")
        outcomes, details = asyncio.run(_open_streams(server.sock, FLOOD))
        assert outcomes == {"served": MAX_STREAMS, "RESOURCE_EXHAUSTED": FLOOD - MAX_STREAMS}, outcomes
        assert all(f"{MAX_STREAMS} ListAndWatch streams" in d for d in details), details[:3]
        refused = f"refused (over the limit of {MAX_STREAMS} open streams)"
        went = "ended (the client went away)"
        wait_until(lambda: _stream_log(procs.log("ps"))[0] == {refused: FLOOD - MAX_STREAMS, went: MAX_STREAMS}, 15,
                   "every stream's end in the log")
        _, lines = _stream_log(procs.log("ps"))
        assert lines <= 40, f"{FLOOD} stream ends told in {lines} lines"
        wait_until(lambda: _streams(server) == 0, 10, "every stream counted out")
        assert server.alive()
    finally:
        server.client.close()
        server.health.close()
    assert proc.poll() is None


def test_concurrent_allocates_while_a_device_flaps(server: Server) -> None:
    stop = threading.Event()
    flapper = server.ids[2]

    def flap() -> None:
        while not stop.is_set():
            server.set_health(flapper, False)
            server.set_health(flapper, True)

    t = threading.Thread(target=flap)
    t.start()
    try:
        def call(i: int) -> str:
            ids = [server.ids[i % 8]]
            try:
                server.client.stub.Allocate(pb.AllocateRequest(container_requests=[
                    pb.ContainerAllocateRequest(devices_ids=ids)]), timeout=10)
                return "ok"
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and ids[0] == flapper, e.details()
                return "unhealthy"

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(call, range(640)))
    finally:
        stop.set()
        t.join()
    assert results.count("ok") >= 640 - 80, "only the flapping device may be refused"
    assert server.alive()


def test_bus_abuse_is_dropped_and_counted(server: Server) -> None:
    server.release_health_bus()  # a rogue process takes the endpoint (bypassing the lock, as an attacker would)
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    (server.run / "health.sock").unlink(missing_ok=True)
    rogue.bind(f"ipc://{server.run / 'health.sock'}")
    good = HealthState(incarnation="x", seq=1, sent_at=0.0, nvml_ok=True, error="", driver_version="", devices=[])
    topic, payload = encode(good)
    # Well-formed, but a device ID that would split NVIDIA_VISIBLE_DEVICES in two.
    comma = HealthState(incarnation="x", seq=2, sent_at=0.0, nvml_ok=True, error="", driver_version="",
                        devices=[dataclasses.replace(gpus(1)[0], id="GPU-a,GPU-b")])
    frames = [
        [*encode(comma)],
        [topic, os.urandom(64)],
        [topic, payload[: len(payload) // 2]],
        [topic, msgpack.packb({**msgpack.unpackb(payload), "v": 99})],
        [topic, msgpack.packb({"v": 1, "seq": "not a number"})],
        [b"\xff\xfe", payload],
        [topic],
        [topic, payload, b"extra"],
        [topic, b"\x00" * (MAX_PAYLOAD + 10)],
    ]
    try:
        def dropped() -> int:
            with BusWatch(server.run / "plugin.sock", ("plugin.state",)) as w:
                msg = w.wait(lambda m: isinstance(m, PluginState))
            assert isinstance(msg, PluginState)
            return msg.bus_dropped

        def flood() -> bool:
            for f in frames:
                rogue.send_multipart(f)
            return dropped() >= 8

        wait_until(flood, 15, "the plugin-server counting dropped payloads")
    finally:
        rogue.close(0)
    assert server.alive()
    c = PluginClient(server.sock)
    try:
        c.watch()
        assert len(c.next_update().devices) == 8, "the last good state is intact"
    finally:
        c.close()
    server.restore_health_bus()
    # Junk sent *into* every publisher's XPUB socket (where subscriptions arrive) is harmless too.
    for bus in sorted(server.run.glob("*.sock")):
        if bus.name not in ("health.sock", "plugin.sock", "registrar.sock"):
            continue
        xsub = ctx.socket(zmq.XSUB)
        xsub.setsockopt(zmq.LINGER, 0)
        xsub.connect(f"ipc://{bus}")
        for junk in (b"", b"\x02garbage", os.urandom(1000), b"\x01" + os.urandom(100), b"\x00"):
            xsub.send(junk)
        xsub.close(0)
    assert server.alive()
    with BusWatch(server.run / "health.sock", ("health.state",)) as w:
        assert isinstance(w.wait(lambda m: isinstance(m, HealthState)), HealthState), "health publisher still up"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _raw_subscriber(path: Path) -> zmq.Socket[bytes]:
    """A raw XSUB, as any process that can reach the run dir may open: sends frames as they are."""
    xsub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XSUB)
    xsub.setsockopt(zmq.LINGER, 0)
    xsub.setsockopt(zmq.SNDHWM, 0)  # queue everything: the flood reaches the publisher whole
    xsub.connect(f"ipc://{path}")
    return xsub


class RawZmtpPeer:
    """A subscriber speaking ZMTP 3.0 by hand over the unix socket, as any process that can
    reach the run dir may: it sends frames of any size (libzmq's own XSUB cannot even hold a
    10 MB subscription: its trie recursion overflows the stack)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
        ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 4) + b"XSUB"
        self.sock.sendall(greeting + b"\x04" + bytes([len(ready)]) + ready)
        self.closed_by_peer = False

    def send_frame(self, body: bytes) -> None:
        head = b"\x00" + bytes([len(body)]) if len(body) < 256 else b"\x02" + struct.pack(">Q", len(body))
        try:
            self.sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            self.closed_by_peer = True

    def peer_closed(self) -> bool:
        """Whether the publisher hung up on us (reads and discards what it sent meanwhile)."""
        while not self.closed_by_peer and select.select([self.sock], [], [], 0)[0]:
            try:
                self.closed_by_peer = not self.sock.recv(65536)
            except ConnectionResetError:
                self.closed_by_peer = True
        return self.closed_by_peer

    def close(self) -> None:
        self.sock.close()


def test_huge_subscription_frames_keep_the_publisher_memory_bounded(make_node: MakeNode) -> None:
    node = make_node()
    node.wait_devices()
    pid = node.services["health-monitor"].pid
    before = _rss_mb(pid)
    grown = 0.0
    for i in range(5):
        peer = RawZmtpPeer(node.run / "health.sock")
        try:
            peer.send_frame(b"\x01" + bytes([65 + i]) * (10 * 1024 * 1024))

            def refused_or_grown(peer: RawZmtpPeer = peer) -> bool:
                nonlocal grown
                grown = _rss_mb(pid) - before
                return peer.peer_closed() or grown > 100

            wait_until(refused_or_grown, 60, "the publisher hanging up on the frame or its memory growing")
            assert grown <= 100, f"the health-monitor grew by {grown:.0f} MB taking {i + 1} x 10 MB subscription frames"
        finally:
            peer.close()
    assert node.services["health-monitor"].poll() is None
    with BusWatch(node.run / "health.sock", ("health.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, HealthState) and len(m.devices) == 8)
    assert isinstance(msg, HealthState)
    assert _rss_mb(pid) - before <= 100


def test_a_fault_reaches_the_kubelet_during_a_subscription_flood(make_node: MakeNode) -> None:
    node = make_node()
    devices = node.wait_devices()
    ctx = zmq.Context.instance()
    # Slow subscribers (a stopped `bus tail`): whatever the publisher sends them piles up.
    idle = []
    for _ in range(20):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"health.state")
        s.connect(f"ipc://{node.run / 'health.sock'}")
        idle.append(s)
    try:
        with SubscriptionFlood(node.run / "health.sock") as flood:
            wait_until(lambda: flood.sent >= 100_000, 60, "the first 100 000 frames of the flood")
            # The old publisher answered each subscription with a full state, queued ahead of the
            # fault's: under a sustained flood an XID reached the kubelet ~42 s late, or not at all.
            for victim in sorted(devices)[:3]:
                node.inject("xid", victim, "79")
                node.wait_health(victim, "Unhealthy", timeout=10)
                node.inject("recover", victim)
                node.wait_health(victim, "Healthy", timeout=10)
            node.inject("xid", victim, "79")
            node.wait_health(victim, "Unhealthy", timeout=10)
    finally:
        for s in idle:
            s.close(0)
    node.wait_devices(healthy=7, timeout=10)
    assert all(p.poll() is None for p in node.services.values())
