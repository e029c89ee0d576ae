"""common.h2grpc's gRPC server, spoken to by real gRPC clients (grpcio, sync and aio) over a unix
socket, and by a raw HTTP/2 client (h2) where a gRPC client cannot produce the input (a peer that
does not read, a deadline the client itself does not enforce, garbage on the socket).

The server runs on an event loop of its own in a thread (as the services run it: one loop, the
handlers on it); the tests drive clients from the test's thread and wait on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes

from common import h2grpc
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.pb.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from tests.conftest import wait_until

WAIT_S = 5.0  # the deadline of every wait: a test that needs it has failed
SERVICE = "/v1beta1.DevicePlugin"
T = TypeVar("T")

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Watch = Callable[[pb.Empty, grpc.aio.ServicerContext], Any]


def big_list(size: int = 300_000) -> pb.ListAndWatchResponse:
    """A ListAndWatch answer of about `size` bytes: past HTTP/2's initial 64 KiB window."""
    devices = [pb.Device(ID=f"GPU-{i:08d}-0123456789abcdef0123", health="Healthy") for i in range(size // 40)]
    message = pb.ListAndWatchResponse(devices=devices)
    assert message.ByteSize() >= size
    return message


async def forever() -> None:
    await asyncio.Event().wait()


class Servicer(pb_grpc.DevicePluginServicer):
    """A DevicePlugin whose methods each test sets; what the handlers went through is in threading.Events
    (the handlers run on the server's loop, the test waits in its own thread)."""

    def __init__(self) -> None:
        self.allocate: Unary = self._allocate
        self.messages: list[pb.ListAndWatchResponse] = [pb.ListAndWatchResponse(devices=[pb.Device(ID="GPU-0")])]
        self.hold = True  # after its messages, the default stream waits (until cancelled) instead of ending
        self.watch: Watch = self._watch
        self.started = threading.Event()  # a handler began
        self.cancelled = threading.Event()  # a handler was cancelled
        self.closed = threading.Event()  # a ListAndWatch generator's `finally` ran
        self.metadata: tuple[tuple[str, str | bytes], ...] = ()
        self.context_cancelled: bool | None = None  # what context.cancelled() said when the handler was cancelled

    async def GetDevicePluginOptions(self, request: pb.Empty, context: Any) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(pre_start_required=True, get_preferred_allocation_available=True)

    async def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        self.metadata = context.invocation_metadata()
        self.started.set()
        try:
            return await self.allocate(request, context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def ListAndWatch(self, request: pb.Empty, context: Any) -> Any:
        return self.watch(request, context)

    @staticmethod
    async def _allocate(request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        return pb.AllocateResponse(container_responses=[
            pb.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(c.devices_ids)})
            for c in request.container_requests])

    async def _watch(self, request: pb.Empty, context: Any) -> AsyncIterator[pb.ListAndWatchResponse]:
        self.started.set()
        try:
            for message in self.messages:
                yield message
            if self.hold:
                await forever()
        except asyncio.CancelledError:
            self.context_cancelled = context.cancelled()
            self.cancelled.set()
            raise
        finally:
            self.closed.set()


class Served:
    """An h2grpc.Server with a Servicer on `<dir>/dp.sock`, on an event loop in a thread of its own."""

    def __init__(self, root: Path) -> None:
        self.path = root / "dp.sock"
        self.target = f"unix:{self.path}"
        self.servicer = Servicer()
        self.server = h2grpc.Server()
        pb_grpc.add_DevicePluginServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(self.target)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="h2grpc-test", daemon=True)
        self.thread.start()
        self.run(self.server.start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT_S) -> T:
        """Runs `coro` on the server's loop; its result, within `timeout`."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop_soon(self, grace: float | None) -> Any:
        """server.stop(grace) started on the server's loop: a concurrent.futures.Future of it."""
        return asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop)

    def call_soon(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def connections(self) -> int:
        return self.run(self._count())

    async def _count(self) -> int:
        return len(self.server.connections)

    def close(self) -> None:
        try:
            self.run(self._shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT_S)
            assert not self.thread.is_alive(), "the server's loop did not stop"
            self.loop.close()

    async def _shutdown(self) -> None:
        await self.server.stop(0)
        await until(lambda: not self.server.connections, "the server's connections to close")
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()


async def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> None:
    """Polls `predicate` on the loop until it holds; fails at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def waited(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT_S), f"timed out after {WAIT_S} s waiting for {what}"


@pytest.fixture
def served(short_tmp: Path) -> Iterator[Served]:
    s = Served(short_tmp)
    yield s
    s.close()


@pytest.fixture
def stub(served: Served) -> Iterator[pb_grpc.DevicePluginStub]:
    with grpc.insecure_channel(served.target) as channel:
        yield pb_grpc.DevicePluginStub(channel)


def allocate_request(*ids: str) -> pb.AllocateRequest:
    return pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=list(ids))])


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- a raw HTTP/2 client -------------------------------------------------------------------------------


class RawClient:
    """HTTP/2 by hand (h2, client side) on a blocking unix socket. It grants no flow-control window
    beyond HTTP/2's initial 64 KiB unless told to (`ack`), and sends only what a test asks."""

    def __init__(self, path: Path, ack: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(path))
        self.ack = ack
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.events: list[Event] = []
        self.eof = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def call(self, method: str, message: bytes | None = b"", end: bool = True,
             headers: tuple[tuple[bytes, bytes], ...] = ()) -> int:
        """Starts a call; `message` (None: no body) length-prefixed, and the request's end unless `end` is False."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", method.encode()), (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"), *headers])
        if message is not None:
            self.h2.send_data(sid, struct.pack(">BI", 0, len(message)) + message, end_stream=end)
        elif end:
            self.h2.end_stream(sid)
        self.flush()
        return sid

    def reset(self, sid: int) -> None:
        self.h2.reset_stream(sid, ErrorCodes.CANCEL)
        self.flush()

    def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Reads and handles what the server sends until `predicate` holds; fails at the deadline."""
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                raise AssertionError(f"{what}: not seen within {WAIT_S} s (connection closed: {self.eof})")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                self.eof = True
                continue
            for event in self.h2.receive_data(data):
                self.events.append(event)
                if isinstance(event, DataReceived) and self.ack and event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.flush()

    def headers(self, sid: int) -> list[tuple[bytes, bytes]]:
        """The stream's response headers and trailers, in order."""
        return [h for e in self.events if isinstance(e, ResponseReceived | TrailersReceived)
                and e.stream_id == sid for h in e.headers or ()]

    def status(self, sid: int) -> dict[bytes, bytes] | None:
        """The stream's grpc-status and the rest of its trailers, once it ended; None before."""
        if not any(isinstance(e, StreamEnded) and e.stream_id == sid for e in self.events):
            return None
        return dict(self.headers(sid))

    def received(self, sid: int) -> int:
        return sum(len(e.data or b"") for e in self.events if isinstance(e, DataReceived) and e.stream_id == sid)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(served: Served) -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def connect(ack: bool = True) -> RawClient:
        clients.append(RawClient(served.path, ack))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


# -- unary calls -----------------------------------------------------------------------------------------


def test_unary_calls_are_answered(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    options = stub.GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S)
    assert options.pre_start_required and options.get_preferred_allocation_available

    answer, call = stub.Allocate.with_call(allocate_request("GPU-0", "GPU-1"), timeout=WAIT_S,
                                           metadata=(("x-caller", "kubelet"), ("trace-bin", b"\x00\xff\x10")))
    assert call.code() == grpc.StatusCode.OK
    assert [dict(c.envs) for c in answer.container_responses] == [{"NVIDIA_VISIBLE_DEVICES": "GPU-0,GPU-1"}]
    assert ("x-caller", "kubelet") in served.servicer.metadata
    assert ("trace-bin", b"\x00\xff\x10") in served.servicer.metadata  # base64 on the wire, bytes again here


def test_unary_answer_without_message_is_unknown(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    async def nothing(request: Any, context: Any) -> None:
        return None

    served.servicer.allocate = nothing
    assert rpc_error(lambda: stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S)).code() == \
        grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize("details", ["no such device: GPU-7", "gérée à 100% ✓\nsecond line"])
def test_abort_reaches_the_client(served: Served, stub: pb_grpc.DevicePluginStub, details: str) -> None:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details,
                            trailing_metadata=(("x-why", "unknown id"), ("why-bin", b"\x00\x01")))

    served.servicer.allocate = refuse
    error = rpc_error(lambda: stub.Allocate(allocate_request("GPU-7"), timeout=WAIT_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == details
    assert ("x-why", "unknown id") in error.trailing_metadata()
    assert ("why-bin", b"\x00\x01") in error.trailing_metadata()


def test_abort_before_any_message_is_trailers_only(served: Served, raw: Callable[..., RawClient]) -> None:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ünïcode 100%")

    served.servicer.allocate = refuse
    client = raw()
    sid = client.call(f"{SERVICE}/Allocate", allocate_request("GPU-0").SerializeToString())
    client.until(lambda: client.status(sid) is not None, "the call's end")
    answers = [e for e in client.events if isinstance(e, ResponseReceived | TrailersReceived) and e.stream_id == sid]
    assert len(answers) == 1 and isinstance(answers[0], ResponseReceived)  # one HEADERS frame, ending the stream
    assert client.received(sid) == 0
    status = client.status(sid)
    assert status is not None
    assert status[b":status"] == b"200" and status[b"content-type"] == b"application/grpc"
    assert status[b"grpc-status"] == b"3"
    assert status[b"grpc-message"] == b"%C3%BCn%C3%AFcode 100%25"


def test_abort_after_messages_ends_the_stream_with_its_code(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    async def two_then_fail(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        yield pb.ListAndWatchResponse(devices=[pb.Device(ID="GPU-0")])
        yield pb.ListAndWatchResponse(devices=[pb.Device(ID="GPU-1")])
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the table is gone")

    served.servicer.watch = two_then_fail
    stream = stub.ListAndWatch(pb.Empty(), timeout=WAIT_S)
    got = []
    with pytest.raises(grpc.RpcError):
        for message in stream:
            got.append(message.devices[0].ID)
    assert got == ["GPU-0", "GPU-1"]
    assert stream.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stream.details() == "the table is gone"


def test_handler_exception_is_unknown(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    async def boom(request: Any, context: Any) -> None:
        raise RuntimeError("boom")

    served.servicer.allocate = boom
    error = rpc_error(lambda: stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S))
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert "boom" in (error.details() or "")
    # The server goes on serving.
    served.servicer.allocate = Servicer._allocate
    assert stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S).container_responses


def test_a_handler_cancelled_from_within_ends_its_call(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    """A CancelledError that is not the call's (a future the handler awaited was cancelled by someone
    else) ends the call CANCELLED, instead of leaving it open with nobody to answer it."""
    async def own(request: Any, context: grpc.aio.ServicerContext) -> None:
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.cancel)
        await future

    served.servicer.allocate = own
    error = rpc_error(lambda: stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S))
    assert error.code() == grpc.StatusCode.CANCELLED and error.details() == "the handler was cancelled"
    assert stub.GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S).pre_start_required


@pytest.mark.parametrize("method", [f"{SERVICE}/Nope", "/other.Service/Allocate"])
def test_unknown_method_is_unimplemented(served: Served, method: str) -> None:
    with grpc.insecure_channel(served.target) as channel:
        nope = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        error = rpc_error(lambda: nope(b"", timeout=WAIT_S))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        assert pb_grpc.DevicePluginStub(channel).GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S)


def test_invalid_request_message_is_internal(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    with grpc.insecure_channel(served.target) as channel:
        allocate = channel.unary_unary(f"{SERVICE}/Allocate", request_serializer=None, response_deserializer=None)
        error = rpc_error(lambda: allocate(b"\xff\xff\xff", timeout=WAIT_S))  # a truncated varint: not protobuf
    assert error.code() == grpc.StatusCode.INTERNAL
    assert not served.servicer.started.is_set()
    assert stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S).container_responses


def test_request_past_the_limit_is_resource_exhausted(served: Served) -> None:
    ids = [f"GPU-{i:08d}-0123456789abcdef0123456789abcdef" for i in range(h2grpc.MAX_MESSAGE // 40)]
    request = allocate_request(*ids)
    assert request.ByteSize() > h2grpc.MAX_MESSAGE
    options = [("grpc.max_send_message_length", 4 * h2grpc.MAX_MESSAGE)]
    with grpc.insecure_channel(served.target, options=options) as channel:
        stub = pb_grpc.DevicePluginStub(channel)
        error = rpc_error(lambda: stub.Allocate(request, timeout=WAIT_S))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not served.servicer.started.is_set()
        # The same connection, and a new one, still serve.
        assert stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S).container_responses
    with grpc.insecure_channel(served.target) as channel:
        assert pb_grpc.DevicePluginStub(channel).Allocate(allocate_request("GPU-1"), timeout=WAIT_S)


def test_many_concurrent_calls_are_all_answered(served: Served) -> None:
    async def calls() -> list[pb.AllocateResponse]:
        async with grpc.aio.insecure_channel(served.target) as channel:
            stub = pb_grpc.DevicePluginStub(channel)
            return await asyncio.gather(*(stub.Allocate(allocate_request(f"GPU-{i}"), timeout=WAIT_S)
                                          for i in range(200)))

    answers = asyncio.run(calls())
    assert [a.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] for a in answers] == \
        [f"GPU-{i}" for i in range(200)]


# -- large messages: flow control ------------------------------------------------------------------------


def test_answers_past_the_window_arrive_intact(served: Served) -> None:
    big = big_list()
    served.servicer.messages = [big, big_list(100_000)]
    served.servicer.hold = False

    async def big_allocate(request: Any, context: Any) -> pb.AllocateResponse:
        return pb.AllocateResponse(container_responses=[pb.ContainerAllocateResponse(
            envs={"IDS": ",".join(d.ID for d in big.devices)})])

    served.servicer.allocate = big_allocate

    async def calls() -> tuple[list[pb.AllocateResponse], list[list[pb.ListAndWatchResponse]]]:
        async with grpc.aio.insecure_channel(served.target) as channel:
            stub = pb_grpc.DevicePluginStub(channel)

            async def watched() -> list[pb.ListAndWatchResponse]:
                return [m async for m in stub.ListAndWatch(pb.Empty(), timeout=WAIT_S)]

            # Several at once on the connection: its window is shared by their writers.
            unary = asyncio.gather(*(stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S) for _ in range(3)))
            streams = asyncio.gather(*(watched() for _ in range(3)))
            return await unary, await streams

    unary, streams = asyncio.run(calls())
    ids = ",".join(d.ID for d in big.devices)
    assert all(a.container_responses[0].envs["IDS"] == ids for a in unary)
    assert all(s == [big, big_list(100_000)] for s in streams)


def test_client_that_does_not_read_gets_the_answer_once_it_does(served: Served, raw: Callable[..., RawClient]) -> None:
    big = big_list()
    served.servicer.messages = [big]
    served.servicer.hold = False
    client = raw(ack=False)
    sid = client.call(f"{SERVICE}/ListAndWatch")
    client.until(lambda: client.received(sid) == 65535, "the initial window's worth of data")
    assert client.status(sid) is None
    # The window opened: the rest comes, and the status.
    client.h2.increment_flow_control_window(1 << 20)
    client.h2.increment_flow_control_window(1 << 20, stream_id=sid)
    client.flush()
    client.until(lambda: client.status(sid) is not None, "the stream's end")
    assert client.status(sid)[b"grpc-status"] == b"0"  # type: ignore[index]
    body = b"".join(e.data or b"" for e in client.events if isinstance(e, DataReceived) and e.stream_id == sid)
    assert body[5:] == big.SerializeToString() and struct.unpack(">BI", body[:5]) == (0, big.ByteSize())


# -- streams -----------------------------------------------------------------------------------------------


def test_stream_delivers_every_message_then_ok(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    served.servicer.messages = [pb.ListAndWatchResponse(devices=[pb.Device(ID=f"GPU-{i}")]) for i in range(5)]
    served.servicer.hold = False
    stream = stub.ListAndWatch(pb.Empty(), timeout=WAIT_S)
    assert [m.devices[0].ID for m in stream] == [f"GPU-{i}" for i in range(5)]
    assert stream.code() == grpc.StatusCode.OK
    waited(served.servicer.closed, "the generator's end")


def test_stream_written_with_context_write(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
        for i in range(3):
            await context.write(pb.ListAndWatchResponse(devices=[pb.Device(ID=f"GPU-{i}")]))

    served.servicer.watch = writer
    stream = stub.ListAndWatch(pb.Empty(), timeout=WAIT_S)
    assert [m.devices[0].ID for m in stream] == ["GPU-0", "GPU-1", "GPU-2"]
    assert stream.code() == grpc.StatusCode.OK


def test_client_cancel_closes_the_generator(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    stream = stub.ListAndWatch(pb.Empty(), timeout=WAIT_S)
    assert next(stream).devices[0].ID == "GPU-0"
    assert not served.servicer.closed.is_set()
    stream.cancel()
    waited(served.servicer.closed, "the generator's finally")
    assert served.servicer.cancelled.is_set()
    assert served.servicer.context_cancelled is True
    assert stub.GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S).pre_start_required


def test_reset_while_blocked_on_flow_control_closes_the_generator(
        served: Served, raw: Callable[..., RawClient]) -> None:
    """The handler is not awaiting in its generator but in the server's write (the peer's window is
    shut): a reset must still close the generator, at once, not whenever it is garbage-collected."""
    served.servicer.messages = [big_list()]
    client = raw(ack=False)
    sid = client.call(f"{SERVICE}/ListAndWatch")
    client.until(lambda: client.received(sid) == 65535, "the initial window's worth of data")
    client.reset(sid)
    waited(served.servicer.closed, "the generator's finally")


def waiting_writers(served: Served) -> int:
    """Writers blocked on the peer's flow-control window, over the server's connections."""
    async def count() -> int:
        return sum(len(conn._waiters) for conn in served.server.connections)

    return served.run(count())


def test_resetting_one_blocked_stream_leaves_the_others_writing(
        served: Served, raw: Callable[..., RawClient]) -> None:
    """Two streams blocked on the connection's window; one is reset (or expires): the other must go on
    once the window opens, and end with its status (with one waiting future shared by the writers, the
    reset's cancellation took every waiting writer with it, and their streams stayed open for ever)."""
    served.servicer.messages = [big_list()]
    served.servicer.hold = False
    client = raw(ack=False)
    a = client.call(f"{SERVICE}/ListAndWatch")
    b = client.call(f"{SERVICE}/ListAndWatch")
    client.until(lambda: client.received(a) + client.received(b) == 65535, "the connection's window used up")
    wait_until(lambda: waiting_writers(served) == 2, WAIT_S, "both writers waiting for the window")
    client.reset(a)
    wait_until(lambda: waiting_writers(served) == 1, WAIT_S, "the reset stream's writer gone")
    client.h2.increment_flow_control_window(1 << 24)
    client.h2.increment_flow_control_window(1 << 24, stream_id=b)
    client.flush()
    client.until(lambda: client.status(b) is not None, "the other stream's end")
    assert client.status(b)[b"grpc-status"] == b"0"
    assert client.received(b) == len(big_list().SerializeToString()) + 5


def test_a_deadline_during_a_cut_message_resets_the_stream(served: Served, raw: Callable[..., RawClient]) -> None:
    """Trailers after half a message would read as a broken message: the stream is reset (CANCEL)."""
    served.servicer.messages = [big_list()]
    client = raw(ack=False)
    sid = client.call(f"{SERVICE}/ListAndWatch", headers=((b"grpc-timeout", b"300m"),))
    client.until(lambda: any(isinstance(e, StreamReset) and e.stream_id == sid for e in client.events),
                 "the stream reset at its deadline")
    reset = next(e for e in client.events if isinstance(e, StreamReset) and e.stream_id == sid)
    assert reset.error_code == ErrorCodes.CANCEL and client.status(sid) is None
    waited(served.servicer.closed, "the generator's finally")


def test_trailing_metadata_that_cannot_be_sent_ends_the_call_internal(
        served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no", trailing_metadata=(("x-why", "\u2713"),))

    served.servicer.allocate = refuse
    error = rpc_error(lambda: stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S))
    assert error.code() == grpc.StatusCode.INTERNAL and "trailing metadata" in (error.details() or "")


def test_an_early_answer_resets_the_rest_of_the_request(served: Served, raw: Callable[..., RawClient]) -> None:
    """Answered before the request ended (an unknown method): trailers, then RST_STREAM(NO_ERROR), so that
    the client stops sending and the stream does not count against the connection's limit."""
    client = raw()
    sid = client.call(f"{SERVICE}/Nope", message=None, end=False)
    client.until(lambda: any(isinstance(e, StreamReset) and e.stream_id == sid for e in client.events),
                 "the stream reset after its answer")
    assert dict(client.headers(sid))[b"grpc-status"] == b"12"
    reset = next(e for e in client.events if isinstance(e, StreamReset) and e.stream_id == sid)
    assert reset.error_code == ErrorCodes.NO_ERROR


def test_a_ping_is_answered_and_a_clients_goaway_ends_its_calls(
        served: Served, raw: Callable[..., RawClient]) -> None:
    client = raw()
    sid = client.call(f"{SERVICE}/ListAndWatch")
    client.until(lambda: client.received(sid) > 0, "the stream's first message")
    client.h2.ping(b"12345678")
    client.flush()
    client.until(lambda: any(isinstance(e, PingAckReceived) for e in client.events), "the ping's answer")
    client.h2.close_connection()
    client.flush()
    waited(served.servicer.closed, "the stream's generator closed with its connection")
    wait_until(lambda: served.connections() == 0, WAIT_S, "the connection closed")


# -- deadlines -------------------------------------------------------------------------------------------


def test_client_deadline_is_deadline_exceeded(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    async def slow(request: Any, context: Any) -> None:
        await forever()

    served.servicer.allocate = slow
    error = rpc_error(lambda: stub.Allocate(allocate_request("GPU-0"), timeout=0.2))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    waited(served.servicer.cancelled, "the handler's cancellation")


def test_server_enforces_grpc_timeout(served: Served, raw: Callable[..., RawClient]) -> None:
    """A client that does not reset the stream at its deadline (the server's own timer ends the call)."""
    seen: list[float | None] = []

    async def slow(request: Any, context: grpc.aio.ServicerContext) -> None:
        seen.append(context.time_remaining())
        await forever()

    served.servicer.allocate = slow
    client = raw()
    timeout = ((b"grpc-timeout", b"150m"),)
    started = time.monotonic()
    running = client.call(f"{SERVICE}/Allocate", allocate_request("GPU-0").SerializeToString(), headers=timeout)
    unsent = client.call(f"{SERVICE}/Allocate", b"", end=False, headers=timeout)  # its request never ends
    client.until(lambda: client.status(running) is not None and client.status(unsent) is not None, "both ends")
    assert time.monotonic() - started >= 0.15
    for sid in (running, unsent):
        assert client.status(sid)[b"grpc-status"] == b"4"  # type: ignore[index]
    waited(served.servicer.cancelled, "the handler's cancellation")
    assert seen and seen[0] is not None and 0 <= seen[0] <= 0.15


def test_malformed_grpc_timeout_is_refused(served: Served, raw: Callable[..., RawClient]) -> None:
    client = raw()
    sid = client.call(f"{SERVICE}/Allocate", b"", headers=((b"grpc-timeout", b"soon"),))
    client.until(lambda: client.status(sid) is not None, "the call's end")
    assert client.status(sid)[b"grpc-status"] == b"13"  # type: ignore[index]
    assert not served.servicer.started.is_set()


# -- broken peers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    # A valid preface and SETTINGS, then DATA on stream 0 (a connection error).
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + b"\x00\x00\x03\x00\x00\x00\x00\x00\x00abc",
], ids=["http1", "data-on-stream-0"])
def test_garbage_closes_only_its_connection(served: Served, garbage: bytes) -> None:
    with grpc.insecure_channel(served.target) as before:
        stub = pb_grpc.DevicePluginStub(before)
        assert stub.GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT_S)
            sock.connect(str(served.path))
            sock.sendall(garbage)
            received = b""
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)  # the socket's timeout fails the test if the server keeps it open
                if not chunk:
                    break
                received += chunk
            else:
                raise AssertionError("the server did not close the connection")
        assert b"\x07\x00\x00\x00\x00\x00" in received  # a GOAWAY frame (type 7, on stream 0) before the close
        # The connection that was there, and a new one, still get answers.
        assert stub.Allocate(allocate_request("GPU-0"), timeout=WAIT_S).container_responses
        with grpc.insecure_channel(served.target) as after:
            assert pb_grpc.DevicePluginStub(after).GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S)


def test_server_settings_admit_many_streams(served: Served, raw: Callable[..., RawClient]) -> None:
    client = raw()
    client.until(lambda: client.h2.remote_settings.max_concurrent_streams == h2grpc.MAX_STREAMS, "the SETTINGS")
    assert client.h2.remote_settings[SettingCodes.MAX_HEADER_LIST_SIZE] == h2grpc.MAX_HEADER_LIST


# -- stopping --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [None, 0.2])
def test_stop_ends_open_streams(served: Served, stub: pb_grpc.DevicePluginStub, grace: float | None) -> None:
    stream = stub.ListAndWatch(pb.Empty(), timeout=WAIT_S)
    assert next(stream).devices[0].ID == "GPU-0"
    stopped = served.stop_soon(grace)
    try:
        for _ in stream:
            pass
    except grpc.RpcError:
        pass
    assert stream.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # it ended, not ran out
    stopped.result(WAIT_S)
    waited(served.servicer.closed, "the generator's finally")


def test_stop_with_grace_lets_a_unary_call_finish(served: Served, stub: pb_grpc.DevicePluginStub) -> None:
    release = asyncio.Event()

    async def slow(request: Any, context: Any) -> pb.AllocateResponse:
        await release.wait()
        return pb.AllocateResponse(container_responses=[pb.ContainerAllocateResponse(envs={"DONE": "1"})])

    served.servicer.allocate = slow
    pending = stub.Allocate.future(allocate_request("GPU-0"), timeout=WAIT_S)
    waited(served.servicer.started, "the handler's start")
    grace = 3.0
    started = time.monotonic()
    stopped = served.stop_soon(grace)
    served.run(until(lambda: served.server.stopping, "the stop"))
    # A new call on the connection that is there is refused while the server stops.
    error = rpc_error(lambda: stub.GetDevicePluginOptions(pb.Empty(), timeout=WAIT_S))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert not stopped.done()
    served.call_soon(release.set)
    assert pending.result(WAIT_S).container_responses[0].envs["DONE"] == "1"
    stopped.result(WAIT_S)
    assert time.monotonic() - started < grace  # it returned when the last call ended, not at the grace's end
    assert not served.servicer.cancelled.is_set()


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_stop_returns_when_the_last_call_is_cancelled(served: Served, how: str) -> None:
    """A call that ends by the client's reset (or its connection's loss) during the grace ends the wait too."""
    channel = grpc.insecure_channel(served.target)
    try:
        stream = pb_grpc.DevicePluginStub(channel).ListAndWatch(pb.Empty(), timeout=WAIT_S)
        assert next(stream).devices[0].ID == "GPU-0"
        grace = 3.0
        started = time.monotonic()
        stopped = served.stop_soon(grace)
        served.run(until(lambda: served.server.stopping, "the stop"))
        if how == "cancel":
            stream.cancel()
        else:
            channel.close()
        waited(served.servicer.closed, "the generator's finally")
        stopped.result(WAIT_S)
        assert time.monotonic() - started < grace
    finally:
        channel.close()


# -- binding ---------------------------------------------------------------------------------------------


def test_add_insecure_port_refusals(short_tmp: Path) -> None:
    server = h2grpc.Server()
    with pytest.raises(OSError):
        server.add_insecure_port(f"unix:{short_tmp}/missing/dp.sock")
    for address in ("localhost:50051", "[::]:0", "dns:///localhost:1"):
        with pytest.raises(ValueError):
            server.add_insecure_port(address)
    assert server.add_insecure_port(f"unix://{short_tmp}/dp.sock") == 1
    assert (short_tmp / "dp.sock").is_socket()
    asyncio.run(server.stop(None))  # never started: releases its socket
