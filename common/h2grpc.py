"""gRPC's server side on the service's own event loop: HTTP/2 (h2) over a unix socket, no gRPC core.

Why: grpc.aio's server runs gRPC core beside the loop: event-engine workers, a timer thread and a
lifeguard, ~10 wake-ups a second at idle (0.06 % of a core, most of the plugin-server's), and
every message crosses from the loop to those threads and back. Measured from a C++ client
(bench/run.py): a no-op call 0.51 ms where the transport itself costs 0.16 ms, and a health change
1.3 ms from the bus to the kubelet's stream. Here the loop that produced a message writes it, in
one write(2), and nothing runs while nothing happens.

What is served is what the kubelet's APIs use (device plugin, DRA): methods with one request
message, answered with one message or a stream of them; a client-streaming method answers
UNIMPLEMENTED. The wire is gRPC over HTTP/2 as grpc-go and grpc core speak it (PROTOCOL-HTTP2.md):
length-prefixed messages, no compression (none is advertised; a compressed message is refused),
`grpc-timeout` deadlines, status and message in trailers (trailers-only when nothing was sent),
a reset stream cancels its handler. Servicers and registration are grpc's own: the generated
`add_*Servicer_to_server` registers its handlers here as on a grpc.aio server, and handlers get a
`grpc.aio.ServicerContext` (`abort` and the rest as there).

Bounds, as gRPC's defaults where it has them: requests up to 4 MiB (RESOURCE_EXHAUSTED past it),
header lists up to 16 KiB, MAX_STREAMS calls at once on a connection (the client queues more).
A peer that breaks HTTP/2 loses its connection (GOAWAY) and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

log = logging.getLogger(__name__)

MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit
MAX_HEADER_LIST = 16 * 1024
MAX_STREAMS = 4096  # calls at once on one connection (the plugin-server's ListAndWatch limit is lower)
PREFIX = struct.Struct(">BI")  # compressed flag, message length
_CONFIG = H2Configuration(client_side=False, header_encoding=None)
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_RESERVED = (b"content-type", b"te", b"user-agent", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding")


class _Aborted(Exception):
    """A handler's `context.abort`: the call ends with the status set on its context."""


class _Gone(Exception):
    """The call's stream or connection is closed: nothing more can be sent on it."""


def _timeout(value: bytes) -> float | None:
    """A `grpc-timeout` header (up to 8 digits and a unit) in seconds; None when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def _percent_encoded(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII but '%' as is, every other byte of the UTF-8 as %XX."""
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode())


class _HandlerCallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


@dataclass(eq=False)
class _Call:
    stream_id: int
    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    deadline: float | None  # monotonic
    handler: grpc.RpcMethodHandler | None = None
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    expired: bool = False
    cancelled: bool = False  # reset by the client, or its connection lost
    request_ended: bool = False  # the client's END_STREAM came
    partial: bool = False  # part of a message sent, the rest waiting for the peer's window
    headers_sent: bool = False
    code: grpc.StatusCode | None = None
    details: str = ""
    trailing: tuple[tuple[str, str | bytes], ...] = ()


class _Context(grpc.aio.ServicerContext):  # type: ignore[misc]
    """What a handler gets: grpc.aio's ServicerContext over one call of ours."""

    def __init__(self, conn: _Connection, call: _Call) -> None:
        self._conn = conn
        self._call = call

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> NoReturn:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs an error code, not OK")
        self._call.code, self._call.details = code, details
        if trailing_metadata:
            self._call.trailing = tuple(trailing_metadata)
        raise _Aborted()

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)

    async def write(self, message: Any) -> None:
        assert self._call.handler is not None
        await self._conn.send_message(self._call, message, self._call.handler.response_serializer)

    async def read(self) -> NoReturn:
        raise RuntimeError("read() is for client-streaming calls, which this server does not serve")

    async def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        if self._call.headers_sent:
            raise RuntimeError("initial metadata was already sent")
        self._conn.send_headers(self._call, tuple(initial_metadata))
        self._conn.flush()

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._call.trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.trailing

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self._call.code = code

    def code(self) -> grpc.StatusCode | None:
        return self._call.code

    def set_details(self, details: str) -> None:
        self._call.details = details

    def details(self) -> str:
        return self._call.details

    def set_compression(self, compression: grpc.Compression) -> None:
        if compression != grpc.Compression.NoCompression:
            raise ValueError("this server does not compress")

    def disable_next_message_compression(self) -> None:
        pass  # nothing is compressed

    def peer(self) -> str:
        return "unix:"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        return None if self._call.deadline is None else max(0.0, self._call.deadline - time.monotonic())

    def cancelled(self) -> bool:
        return self._call.expired or self._call.cancelled or self._conn.closed


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._h2 = H2Connection(config=_CONFIG)
        self._transport: asyncio.Transport | None = None
        self._calls: dict[int, _Call] = {}
        self._can_write = asyncio.Event()
        self._can_write.set()
        # Writers waiting for the peer's flow-control window, each on a future of its own (one shared
        # future would be cancelled with the first of its waiters that is: a reset or deadline of one
        # call would end every other blocked call's writer, and leave their streams open for ever).
        self._waiters: set[asyncio.Future[None]] = set()
        self.closed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)
        # In the connection's first SETTINGS: h2 holds a peer to them at once (its own default is 100 calls).
        self._h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS, SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
        # Current at once, so the peer's ACK changes nothing and h2 never applies it to its decoder: set it there.
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST
        self._h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as e:  # a connection error: GOAWAY with its code (h2's, when it queued one), hang up
            log.debug("HTTP/2 protocol error from a client: %s", e)
            pending = self._h2.data_to_send()
            if not pending:  # nothing queued (a bad preface): the GOAWAY is ours to send
                with contextlib.suppress(ProtocolError):
                    self._h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
                pending = self._h2.data_to_send()
            if pending and self._transport is not None and not self._transport.is_closing():
                self._transport.write(pending)
            self._hang_up()
            return
        try:
            for event in events:
                self._on_event(event)
        except Exception:  # a bug of ours (or a handler's lookup): this connection, not the server
            log.exception("handling a client's HTTP/2 frames failed; closing its connection")
            self.close()
            return
        self.flush()

    def pause_writing(self) -> None:
        # The peer is not reading: read nothing from it either, or what it sends (pings, settings, calls)
        # would pile answers up in the transport's buffer without bound.
        self._can_write.clear()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        for call in list(self._calls.values()):
            self._cancel(call)
        self._calls.clear()
        self._ended()
        self._can_write.set()  # writers waiting see the connection closed
        self._wake_writers()

    # HTTP/2 events

    def _on_event(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            self._on_data(event)
        elif isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, StreamEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.request_ended = True
                if call.task is None and call.code is None:
                    self._start(call)
        elif isinstance(event, StreamReset):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                self._cancel(call)
                self._ended()
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            self._wake_writers()
        elif isinstance(event, ConnectionTerminated):
            # The client's GOAWAY: h2 can send nothing more on this connection (no answer, no trailers), so the
            # calls still open are cancelled with it, as the client's own transport does once it has sent one.
            self.close()

    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        headers = dict(event.headers or ())
        if headers.get(b":method") != b"POST":
            self._refuse_http(sid, b"405", event.stream_ended is not None)
            return
        if not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            self._refuse_http(sid, b"415", event.stream_ended is not None)
            return
        seconds = None
        if b"grpc-timeout" in headers:
            seconds = _timeout(headers[b"grpc-timeout"])
            if seconds is None:
                self._refuse(sid, grpc.StatusCode.INTERNAL, "malformed grpc-timeout")
                return
        try:
            metadata = tuple((k.decode("latin-1"), _header_value(k, v)) for k, v in event.headers or ()
                             if not k.startswith((b":", b"grpc-")) and k not in _RESERVED)
        except ValueError:
            self._refuse(sid, grpc.StatusCode.INTERNAL, "a -bin metadata value is not base64")
            return
        method = headers.get(b":path", b"").decode("latin-1")
        call = _Call(sid, method, metadata, None if seconds is None else time.monotonic() + seconds)
        self._calls[sid] = call
        if self._server.stopping:
            self._finish(call, grpc.StatusCode.UNAVAILABLE, "the server is stopping")
            return
        handler = call.handler = self._server.handler(method, metadata)
        if handler is None:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {method}")
        elif handler.request_streaming:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, f"{method}: client-streaming calls are not served")
        elif headers.get(b"grpc-encoding", b"identity") != b"identity":
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED,
                         f"grpc-encoding {headers[b'grpc-encoding'].decode('latin-1')} is not accepted")
        elif seconds is not None:
            call.timer = asyncio.get_running_loop().call_later(seconds, self._expire, call)

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        with contextlib.suppress(StreamClosedError, ProtocolError):  # answered or reset already
            self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
        call = self._calls.get(sid)
        if call is None or call.task is not None or call.code is not None:
            return  # answered already (an error) or reset: the rest of its body is of no use
        call.body += event.data or b""
        if len(call.body) > PREFIX.size + MAX_MESSAGE:
            self._finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"request larger than the limit ({len(call.body)} > {MAX_MESSAGE})")

    # calls

    def _start(self, call: _Call) -> None:
        handler = call.handler
        assert handler is not None  # checked when the call began
        body = bytes(call.body)
        call.body = bytearray()
        if len(body) < PREFIX.size:
            self._finish(call, grpc.StatusCode.INTERNAL, "no request message")
            return
        compressed, length = PREFIX.unpack_from(body)
        if length > MAX_MESSAGE:
            self._finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"request larger than the limit ({length} > {MAX_MESSAGE})")
            return
        if len(body) != PREFIX.size + length:
            self._finish(call, grpc.StatusCode.INTERNAL, "expected one request message")
            return
        if compressed:
            self._finish(call, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted")
            return
        try:
            request = handler.request_deserializer(body[PREFIX.size:]) if handler.request_deserializer \
                else body[PREFIX.size:]
        except Exception as e:
            self._finish(call, grpc.StatusCode.INTERNAL, f"the request could not be decoded: {e}")
            return
        call.task = asyncio.get_running_loop().create_task(self._run(call, handler, request))

    async def _run(self, call: _Call, handler: grpc.RpcMethodHandler, request: Any) -> None:
        context = _Context(self, call)
        serialize = handler.response_serializer
        try:
            if handler.response_streaming:
                answers: AsyncIterator[Any] | Awaitable[None] = handler.unary_stream(request, context)
                if inspect.isawaitable(answers):  # a handler that writes with context.write
                    await answers
                else:
                    try:
                        async for message in answers:
                            await self.send_message(call, message, serialize)
                    finally:  # a write cut off (reset, deadline, stop) left it at a yield: closed now, not at its GC
                        aclose = getattr(answers, "aclose", None)
                        if aclose is not None:
                            await aclose()
            else:
                message = await handler.unary_unary(request, context)
                if message is None and call.code in (None, grpc.StatusCode.OK):
                    raise TypeError("the handler returned no message")
                if message is not None:
                    await self.send_message(call, message, serialize, flush=False)
        except _Aborted:
            pass
        except _Gone:
            self._calls.pop(call.stream_id, None)
            self._ended()
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():  # the handler's own (a future it awaited was cancelled)
                log.error("%s: the handler was cancelled from within", call.method)
                self._finish(call, grpc.StatusCode.CANCELLED, "the handler was cancelled")
                return
            if not call.expired:
                raise  # reset by the client, its connection lost, or the server stopping: nobody to answer
            if call.partial:  # trailers after half a message would read as a broken one: reset, as gRPC does
                self._reset(call, ErrorCodes.CANCEL)
                return
            call.code, call.details = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except Exception as e:
            log.exception("%s failed", call.method)
            call.code, call.details = grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}: {e}"
        self._finish(call, call.code or grpc.StatusCode.OK, call.details)

    def send_headers(self, call: _Call, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        headers = [(b":status", b"200"), (b"content-type", b"application/grpc"), *_metadata(metadata)]
        try:
            self._h2.send_headers(call.stream_id, headers)
        except (StreamClosedError, ProtocolError) as e:
            raise _Gone() from e
        call.headers_sent = True

    async def send_message(self, call: _Call, message: Any, serialize: Any, flush: bool = True) -> None:
        """One message on the call's stream, as the peer's flow-control windows allow."""
        payload = serialize(message) if serialize is not None else message
        if not call.headers_sent:
            self.send_headers(call)
        data = memoryview(PREFIX.pack(0, len(payload)) + payload)
        while data:
            if self.closed or call.stream_id not in self._calls:
                raise _Gone()
            try:
                room = min(self._h2.local_flow_control_window(call.stream_id), self._h2.max_outbound_frame_size)
                if room > 0:
                    self._h2.send_data(call.stream_id, bytes(data[:room]))
                    data = data[room:]
                    continue
            except (StreamClosedError, ProtocolError) as e:
                raise _Gone() from e
            self.flush()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            call.partial = True  # a message cut here and never finished: its call is reset, not answered
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)
        call.partial = False
        if flush:
            self.flush()
            if not self._can_write.is_set():  # the peer is not reading: wait until it does
                await self._can_write.wait()

    def _finish(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        """The call's status, in trailers (or trailers-only), and its end."""
        if call.timer is not None:
            call.timer.cancel()
        if self._calls.pop(call.stream_id, None) is None or self.closed:
            return
        status = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            status.append((b"grpc-message", _percent_encoded(details)))
        try:
            status += _metadata(call.trailing)
        except (UnicodeEncodeError, AttributeError, TypeError) as e:  # a handler's trailing metadata
            log.error("%s: trailing metadata not sent (%s)", call.method, e)
            status = [(b"grpc-status", str(grpc.StatusCode.INTERNAL.value[0]).encode()),
                      (b"grpc-message", _percent_encoded(f"invalid trailing metadata: {e}"))]
        try:
            if call.headers_sent:
                self._h2.send_headers(call.stream_id, status, end_stream=True)
            else:
                self._h2.send_headers(call.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                                       *status], end_stream=True)
            if not call.request_ended:
                # Answered before the request ended (an error): the rest of it is not wanted (gRPC's
                # "early server closure"), and the stream would otherwise count against MAX_STREAMS.
                self._h2.reset_stream(call.stream_id, ErrorCodes.NO_ERROR)
        except (StreamClosedError, ProtocolError):
            pass
        else:
            call.code = code
        self.flush()
        self._ended()

    def _reset(self, call: _Call, code: ErrorCodes) -> None:
        """The call's stream reset (no status can follow what was sent of it), and its end."""
        if call.timer is not None:
            call.timer.cancel()
        if self._calls.pop(call.stream_id, None) is None or self.closed:
            return
        with contextlib.suppress(StreamClosedError, ProtocolError):
            self._h2.reset_stream(call.stream_id, code)
        self.flush()
        self._ended()

    def _ended(self) -> None:
        """A call left `_calls` (answered, reset, or its connection lost): while the server stops, the
        last one ends the stop's wait."""
        if self._server.stopping and not self._calls:
            self._server.drained(self)

    def _refuse(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        call = _Call(sid, "", (), None)
        self._calls[sid] = call
        self._finish(call, code, details)

    def _refuse_http(self, sid: int, status: bytes, request_ended: bool) -> None:
        with contextlib.suppress(StreamClosedError, ProtocolError):
            self._h2.send_headers(sid, [(b":status", status)], end_stream=True)
            if not request_ended:  # the rest of the request is not wanted (as after any early answer)
                self._h2.reset_stream(sid, ErrorCodes.NO_ERROR)

    def _expire(self, call: _Call) -> None:
        call.expired = True
        call.timer = None
        if call.task is not None:
            call.task.cancel()
        else:
            self._finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _cancel(self, call: _Call) -> None:
        call.cancelled = True
        if call.timer is not None:
            call.timer.cancel()
        if call.task is not None:
            call.task.cancel()

    def _wake_writers(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def calls(self) -> list[_Call]:
        return list(self._calls.values())

    def _hang_up(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def close(self) -> None:
        """GOAWAY, then the connection closed; the calls still open are cancelled."""
        if self._transport is None or self._transport.is_closing():
            return
        with contextlib.suppress(ProtocolError):
            self._h2.close_connection(ErrorCodes.NO_ERROR)
        self.flush()
        self._transport.close()


def _metadata(pairs: Iterable[tuple[str, str | bytes]]) -> list[tuple[bytes, bytes]]:
    out = []
    for k, v in pairs:
        key = k.lower().encode("latin-1")
        value = v if isinstance(v, bytes) else v.encode("latin-1")
        out.append((key, base64.b64encode(value).rstrip(b"=") if key.endswith(b"-bin") else value))
    return out


def _header_value(key: bytes, value: bytes) -> str | bytes:
    """A metadata value as grpc gives it to a handler: a `-bin` key's bytes (base64 on the wire, padded
    or not), any other key's text."""
    if key.endswith(b"-bin"):
        return base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    return value.decode("latin-1")


class Server:
    """The part of grpc.aio.Server the services use: register, add a unix port, start, stop(grace)."""

    def __init__(self) -> None:
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._sockets: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self.connections: set[_Connection] = set()
        self.stopping = False
        self._drained: asyncio.Event | None = None

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    def handler(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> grpc.RpcMethodHandler | None:
        found = self._methods.get(method)
        if found is None:
            for generic in self._generic:
                found = generic.service(_HandlerCallDetails(method, metadata))
                if found is not None:
                    break
        return found

    def add_insecure_port(self, address: str) -> int:
        """Binds `unix:<path>`: the file is created now, with the caller's umask (OSError when it cannot be)."""
        if not address.startswith("unix:"):
            raise ValueError(f"only unix sockets are served, not {address!r}")
        path = address.removeprefix("unix:").removeprefix("//")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sockets.append(sock)
        return 1

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            self._servers.append(await loop.create_unix_server(lambda: _Connection(self), sock=sock, backlog=128))
        self._sockets = []

    async def stop(self, grace: float | None) -> None:
        """Stops accepting; calls in progress get `grace` seconds (None or 0: none) to end, then are cancelled."""
        self.stopping = True
        for server in self._servers:
            server.close()  # the socket file stays: its owner removes it (a new server's may be there by now)
        self._servers = []
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        busy = [c for c in self.connections if c.calls()]
        if grace and busy:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        tasks = [call.task for conn in list(self.connections) for call in conn.calls() if call.task is not None]
        for conn in list(self.connections):
            conn.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def drained(self, conn: _Connection) -> None:
        """A connection's last call ended while stopping."""
        if self._drained is not None and not any(c.calls() for c in self.connections):
            self._drained.set()


def server() -> Server:
    return Server()

