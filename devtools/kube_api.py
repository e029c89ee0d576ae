"""An emulated Kubernetes API server for tests: Nodes (their status and Events, and NFD's NodeFeatures,
in sections of their own), over plain HTTP/1.1, as the real one answers.

What the kube-agent uses, with the real server's behaviour at the edges: `GET /api/v1/nodes/<name>`
(404 as a Status), `GET /api/v1/nodes?watch=true&fieldSelector=metadata.name=<name>&resourceVersion=N`
(a chunked stream of JSON watch events after version N; 410 Gone as an ERROR event when N is older
than the compacted history; BOOKMARK events when `allowWatchBookmarks=true`), failures injected as
Status answers (403, 500, 503...), watches dropped mid-stream, and the whole server going away and
coming back on the same port. Every request is recorded (method, path, query) so that tests can
check the agent asks for nothing beyond its RBAC (get/list/watch of its own Node).

And answers the real server never gives, but a client can still get (a proxy's error page, a
connection cut mid-body, a misrouted or corrupted answer, an object grown huge): `fault` makes every
GET and list answer one of FAULTS until it is cleared, `bad_event` sends one to the open watches.
The huge object is written as it is generated, a MiB at a time: the test stays frugal, and a client
that stops reading stops the writing.

Development tool only: the product never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes = b""  # what a write sent


@dataclass
class _Watch:
    node: str
    version: int
    bookmarks: bool
    # An event; a fault's name (a bad event, devtools only); {} ends the watch cleanly; None cuts it.
    queue: asyncio.Queue[dict[str, Any] | str | None] = field(default_factory=asyncio.Queue)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


REASONS = {403: "Forbidden", 404: "NotFound", 410: "Expired", 500: "InternalError", 503: "ServiceUnavailable",
           201: "Created", 400: "BadRequest", 409: "Conflict", 415: "UnsupportedMediaType", 422: "Invalid",
           429: "TooManyRequests"}

# What a fault answers instead of the Node (in a list: of the NodeList; in a watch: of the event):
FAULTS = (
    "pod",           # a Pod of the same name (kind Pod; in a list, a PodList)
    "status",        # a Status with code 200 (a Status where an object was due)
    "other-name",    # another Node, without the label
    "two-nodes",     # a NodeList of this Node and another (a GET or an event: a NodeList)
    "labels-list",   # metadata.labels a list of "key=value"
    "label-number",  # every label value a number
    "invalid",       # metadata.resourceVersion a number (what the client library refused to decode)
    "not-json",      # a proxy's HTML error page, with 200 and Content-Type application/json
    "truncated",     # the first half of the JSON, its length declared as such
    "cut",           # the full length declared, half of it sent, the connection closed
    "huge",          # this Node with 200 MB of annotations (huge_bytes), chunked, generated while sent
)
EVENT_FAULTS = (*FAULTS, "unknown-type")  # unknown-type: an event of type RENAMED
NOT_JSON = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


_PATCH_TYPES = {"application/strategic-merge-patch+json": "strategic", "application/merge-patch+json": "merge"}
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)")


def _health_path(method: str, path: str) -> bool:
    """A Node's status, or an Event (the kube-agent's node health)."""
    if path.startswith("/api/v1/nodes/") and path.endswith("/status"):
        return method in ("GET", "PATCH")
    parts = path[len("/api/v1/namespaces/"):].split("/") if path.startswith("/api/v1/namespaces/") else []
    return len(parts) in (2, 3) and parts[1] == "events" and all(parts) and (
        method in ("GET", "PATCH") if len(parts) == 3 else method in ("GET", "POST"))


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _patch_body(body: bytes, kind: str) -> tuple[str, Any]:
    """The kind of merge ("strategic", "merge": from the request's Content-Type) and the patch."""
    if kind not in ("strategic", "merge"):
        raise _Refused(415, "the body's content type is not a patch this resource takes")
    try:
        return kind, json.loads(body)
    except ValueError as e:
        raise _Refused(400, f"not JSON: {e}") from None


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 into `target`: objects merged, null removes, anything else (a list) replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = json.loads(json.dumps(value))


class KubeApiEmulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.version = 100
        self.nodes: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (version, event type, node)
        self.compacted = 0  # watches from a version below this get 410 Gone
        self.requests: list[Request] = []
        self.failures: list[int] = []  # HTTP codes to answer the next requests with, in order
        self.gone = 0  # watches answered 410 Gone
        self.black_hole = False  # watches opened now get headers, then nothing ever (a dead route)
        self.fault: str | None = None  # every GET and list is answered with this one of FAULTS while set
        self.faulted = 0  # answers given with a fault (GET, list, watch event)
        self.huge_bytes = 200 << 20
        self.nodefeatures = NodeFeatures()  # NFD's objects, which gpu-feature-discovery writes
        self.resourceslices = ResourceSlices()  # resource.k8s.io, which the dra-plugin publishes (its section)
        self.claims = ResourceClaims()  # resource.k8s.io ResourceClaims, which the dra-plugin reads
        # Node status and Events (the kube-agent's node health; see their section)
        self.events: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> Event
        self.forbidden: set[str] = set()  # "nodes/status", "events": answered 403 while named (RBAC not granted)
        self.write_delay_s = 0.0  # status and Event writes answered this late (a slow server)
        self.cuts = 0  # the next status and Event writes are applied, then their connection cut unanswered
        self.retry_after: int | None = None  # sent with injected 429 and 503 answers
        self._watches: list[_Watch] = []
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    # -- control ----------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """The server goes away: listener closed, every connection cut."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.drop_watches()
        await self.resourceslices.drop_watches()
        for w in list(self._conns):
            w.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self) -> str:
        return json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "emu",
                           "clusters": [{"name": "emu", "cluster": {"server": self.url}}],
                           "users": [{"name": "emu", "user": {}}],
                           "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}]})

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.version += 1
        self.nodes[name] = {"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": name, "labels": dict(labels or {}), "uid": f"uid-{name}",
                                         "resourceVersion": str(self.version)}}
        self._event("ADDED", name)

    def set_label(self, name: str, key: str, value: str | None) -> None:
        node = self.nodes[name]
        labels = node["metadata"]["labels"]
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
        self.version += 1
        node["metadata"]["resourceVersion"] = str(self.version)
        self._event("MODIFIED", name)

    def touch(self, name: str) -> None:
        """A change that is not the label (status heartbeats make most of a Node's events)."""
        self.nodes[name]["metadata"].setdefault("annotations", {})["touched"] = str(self.version)
        self.version += 1
        self.nodes[name]["metadata"]["resourceVersion"] = str(self.version)
        self._event("MODIFIED", name)

    def delete_node(self, name: str) -> None:
        node = self.nodes.pop(name)
        self.version += 1
        node["metadata"]["resourceVersion"] = str(self.version)
        obj = json.loads(json.dumps(node))
        self.history.append((self.version, "DELETED", obj))
        for w in self._watches:
            if w.node == name:
                w.queue.put_nowait({"type": "DELETED", "object": obj})

    def bad_event(self, fault: str) -> None:
        """One of EVENT_FAULTS to every open watch, as the next event."""
        if fault not in EVENT_FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(EVENT_FAULTS)}")
        for w in self._watches:
            w.queue.put_nowait(fault)

    def compact(self) -> None:
        """Other objects changed, then history before now was compacted away: a watch resuming
        from an older version gets 410 (the Node's own version may be older still)."""
        self.version += 1
        self.compacted = self.version
        self.history.clear()

    def bookmark(self) -> None:
        for w in self._watches:
            if w.bookmarks:
                w.queue.put_nowait({"type": "BOOKMARK", "object": {
                    "apiVersion": "v1", "kind": "Node", "metadata": {"resourceVersion": str(self.version)}}})

    async def drop_watches(self) -> None:
        """Cut every watch mid-stream (a load balancer or the server dying)."""
        for w in self._watches:
            w.queue.put_nowait(None)
        await asyncio.sleep(0)

    async def end_watches(self) -> None:
        """End every watch cleanly, as the server does at its timeout: clients resume from their version."""
        for w in self._watches:
            w.queue.put_nowait({})
        await asyncio.sleep(0)

    @property
    def watching(self) -> int:
        return len(self._watches)

    def _event(self, kind: str, name: str) -> None:
        obj = json.loads(json.dumps(self.nodes[name]))
        self.history.append((self.version, kind, obj))
        for w in self._watches:
            if w.node == name:
                w.queue.put_nowait({"type": kind, "object": obj})

    # -- HTTP -------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                content_type = ""
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                    elif line.lower().startswith("content-type:"):
                        content_type = line.split(":", 1)[1].strip().lower()
                body = await reader.readexactly(length) if length else b""
                url = urlsplit(target)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                self.requests.append(Request(method, url.path, query, body))
                if not await self._answer(method, url.path, query, writer, body, content_type):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, code: int, body: dict[str, Any], headers: str = "") -> bool:
        return await self._send_bytes(writer, code, json.dumps(body).encode(), headers=headers)

    async def _send_bytes(self, writer: asyncio.StreamWriter, code: int, data: bytes,
                          length: int | None = None, headers: str = "") -> bool:
        """`length`: the Content-Length declared, when it is not the data's (a body cut short);
        `headers`: more header lines, each ending with CRLF."""
        writer.write(f"HTTP/1.1 {code} {REASONS.get(code, 'OK')}\r\nContent-Type: application/json\r\n{headers}"
                     f"Content-Length: {len(data) if length is None else length}\r\n\r\n".encode() + data)
        await writer.drain()
        return length is None  # a body cut short ends the connection

    # -- faults -----------------------------------------------------------------------
    def _stub(self) -> dict[str, Any]:
        """What a fault is made from when the Node asked for does not exist."""
        return {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": "unknown", "labels": {}, "uid": "uid-unknown", "resourceVersion": str(self.version)}}

    def _other(self, node: dict[str, Any]) -> dict[str, Any]:
        other: dict[str, Any] = json.loads(json.dumps(node))
        other["metadata"].update(name=node["metadata"]["name"] + "-other", labels={},
                                 uid=node["metadata"]["uid"] + "-other")
        return other

    def _bad_object(self, fault: str, node: dict[str, Any]) -> dict[str, Any]:
        """The object a fault answers instead of `node` (for the faults that are well-formed JSON)."""
        meta = node["metadata"]
        if fault == "pod":
            return {"apiVersion": "v1", "kind": "Pod", "spec": {"nodeName": meta["name"]},
                    "metadata": {"name": meta["name"], "namespace": "default", "uid": "uid-pod",
                                 "resourceVersion": meta["resourceVersion"]}}
        if fault == "status":
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}
        if fault == "other-name":
            return self._other(node)
        if fault == "two-nodes":
            return self._list([node, self._other(node)])
        bad: dict[str, Any] = json.loads(json.dumps(node))
        if fault == "labels-list":
            bad["metadata"]["labels"] = [f"{k}={v}" for k, v in meta["labels"].items()]
        elif fault == "label-number":
            bad["metadata"]["labels"] = {**{k: len(v) for k, v in meta["labels"].items()}, "example.com/gpus": 8}
        elif fault == "invalid":
            bad["metadata"]["resourceVersion"] = int(meta["resourceVersion"])
        else:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        return bad

    def _list(self, items: list[dict[str, Any]], kind: str = "NodeList") -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": kind, "items": items, "metadata": {"resourceVersion": str(self.version)}}

    def _huge(self, node: dict[str, Any], before: bytes, after: bytes) -> Iterator[bytes]:
        """`node` with huge_bytes of annotations, between `before` and `after`, a MiB per piece."""
        meta = {**node["metadata"], "annotations": {}}
        head, tail = json.dumps({**node, "metadata": meta}).encode().split(b'"annotations": {}')
        yield before + head + b'"annotations": {'
        filler = b"x" * (1 << 20)
        for i in range(max(1, self.huge_bytes >> 20)):
            yield b'%s"example.com/blob-%d": "%s"' % (b"," if i else b"", i, filler)
        yield b"}" + tail + after

    async def _send_fault(self, writer: asyncio.StreamWriter, fault: str, node: dict[str, Any] | None,
                          listed: bool) -> bool:
        """A GET (or, `listed`, a list) answered with `fault`; False when the connection is to end."""
        self.faulted += 1
        node = node or self._stub()
        if fault == "huge":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            before = b'{"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "%d"}, "items": [' % (
                self.version) if listed else b""
            for piece in self._huge(node, before, b"]}" if listed else b""):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if fault == "not-json":
            return await self._send_bytes(writer, 200, NOT_JSON)
        if fault in ("truncated", "cut"):
            full = json.dumps(self._list([node]) if listed else node).encode()
            declared = None if fault == "truncated" else len(full)
            return await self._send_bytes(writer, 200, full[:len(full) // 2], declared)
        if listed and fault == "pod":
            return await self._send(writer, 200, self._list([self._bad_object(fault, node)], "PodList"))
        bad = self._bad_object(fault, node)
        if listed and fault not in ("status", "two-nodes"):
            bad = self._list([bad])
        return await self._send(writer, 200, bad)

    async def _answer(self, method: str, path: str, query: dict[str, str], writer: asyncio.StreamWriter,
                      body: bytes = b"", content_type: str = "") -> bool:
        if self.failures:
            code = self.failures.pop(0)
            wait = f"Retry-After: {self.retry_after}\r\n" if self.retry_after is not None and code in (429, 503) else ""
            return await self._send(writer, code, status(code, REASONS.get(code, "Error"), f"injected {code}"), wait)
        if path.startswith(NODEFEATURES_PREFIX):
            return await self._send(writer, *self.nodefeatures.answer(method, path, body))
        if ResourceSlices.handles(path):
            return await self.resourceslices.serve(self, method, path, query, writer, body)
        if is_claim_path(path):
            if self.claims.delay_s:
                await self.claims.slow()
            answer = self.claims.answer(method, path)
            if answer is None:  # a group version the server does not serve: its mux's plain 404, not a Status
                return await self._send_bytes(writer, 404, b"404 page not found\n")
            return await self._send(writer, *answer)
        if _health_path(method, path):
            return await self._node_health(method, path, writer, body, content_type)
        if method != "GET" or not path.startswith("/api/v1/nodes"):
            return await self._send(writer, 403, status(403, "Forbidden", f"{method} {path} is forbidden"))
        name = path[len("/api/v1/nodes/"):] if path.startswith("/api/v1/nodes/") else ""
        selector = query.get("fieldSelector", "")
        wanted = selector.removeprefix("metadata.name=") if selector.startswith("metadata.name=") else None
        if self.fault is not None and query.get("watch") not in ("true", "1"):
            return await self._send_fault(writer, self.fault, self.nodes.get(name or wanted or ""), not name)
        if name:
            if name not in self.nodes:
                return await self._send(writer, 404, status(404, "NotFound", f'nodes "{name}" not found'))
            return await self._send(writer, 200, self.nodes[name])
        if query.get("watch") not in ("true", "1"):
            return await self._send(writer, 200, self._list([n for k, n in self.nodes.items() if wanted in (None, k)]))
        if wanted is None:
            return await self._send(writer, 403, status(403, "Forbidden", "watching every node is forbidden"))
        await self._watch(writer, wanted, int(query.get("resourceVersion") or 0),
                          query.get("allowWatchBookmarks") == "true", float(query.get("timeoutSeconds") or 0))
        return False

    async def _watch(self, writer: asyncio.StreamWriter, node: str, since: int, bookmarks: bool,
                     timeout: float) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")

        def raw(data: bytes) -> None:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        def chunk(event: dict[str, Any]) -> None:
            raw(json.dumps(event).encode() + b"\n")

        if since and since < self.compacted:
            self.gone += 1
            chunk({"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since} "
                                                                     f"({self.compacted})")})
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        if self.black_hole:
            await writer.drain()
            await asyncio.Event().wait()  # until the connection is cut or the server stops
        watch = _Watch(node, since, bookmarks)
        self._watches.append(watch)
        try:
            if not since and node in self.nodes:  # no version: the current state first, as the real one
                chunk({"type": "ADDED", "object": self.nodes[node]})
            for version, kind, obj in self.history:
                if since and version > since and obj["metadata"]["name"] == node:
                    chunk({"type": kind, "object": obj})
            await writer.drain()
            while True:
                try:
                    # The server's own end of a watch (timeoutSeconds): a clean end the client resumes.
                    async with asyncio.timeout(timeout or None):
                        event = await watch.queue.get()
                except TimeoutError:
                    event = {}
                if event is None:
                    break  # dropped: the connection is cut without the final chunk
                if isinstance(event, str):
                    if not await self._bad_event(raw, writer, event, self.nodes.get(node)):
                        break
                    continue
                if not event:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    break
                chunk(event)
                await writer.drain()
        finally:
            self._watches.remove(watch)

    async def _bad_event(self, raw: Callable[[bytes], None], writer: asyncio.StreamWriter, fault: str,
                         node: dict[str, Any] | None) -> bool:
        """One bad watch event through `raw` (a chunk writer); False when the watch is to be cut."""
        self.faulted += 1
        node = node or self._stub()
        if fault == "huge":
            for piece in self._huge(node, b'{"type": "MODIFIED", "object": ', b"}\n"):
                raw(piece)
                await writer.drain()
            return True
        line = json.dumps({"type": "MODIFIED", "object": node}).encode()
        if fault == "not-json":
            raw(NOT_JSON + b"\n")
        elif fault in ("truncated", "cut"):
            raw(line[:len(line) // 2] + (b"\n" if fault == "truncated" else b""))
        elif fault == "unknown-type":
            raw(json.dumps({"type": "RENAMED", "object": node}).encode() + b"\n")
        else:
            raw(json.dumps({"type": "MODIFIED", "object": self._bad_object(fault, node)}).encode() + b"\n")
        await writer.drain()
        return fault != "cut"

    # -- Node status and Events ---------------------------------------------------------------
    # What the kube-agent's node health writes, as the real server answers. GET and PATCH of
    # /api/v1/nodes/<name>/status: a strategic merge patch (status.conditions merge by type: a
    # condition sent replaces the fields it names in the condition of its type, the others and other
    # types' stay) or a JSON merge patch (RFC 7386: a list is replaced whole), any other content type
    # 415; conditions with a status other than True/False/Unknown, or a time that is not RFC 3339, 422;
    # the Node's resourceVersion moves and its watchers get MODIFIED. Events (core/v1) under
    # /api/v1/namespaces/<ns>/events: POST (201; 409 AlreadyExists; 400 when the body names another
    # namespace; 422 without a name, or when the involvedObject's namespace is not the Event's), PATCH
    # by name (strategic merge; 404 when gone), GET by name and list. `forbidden` names the resources
    # ("nodes/status", "events") this identity may not touch (403, as missing RBAC); `write_delay_s`
    # answers writes late; `cuts` applies the next writes, then cuts their connection unanswered (the
    # client cannot tell whether they landed); `retry_after` goes with injected 429 and 503 answers.

    def condition(self, node: str, kind: str) -> dict[str, Any] | None:
        """The Node's condition of this type, as stored."""
        for c in self.nodes[node].get("status", {}).get("conditions", []):
            if c.get("type") == kind:
                return dict(c)
        return None

    def events_of(self, namespace: str = "default") -> list[dict[str, Any]]:
        return [e for (ns, _), e in self.events.items() if ns == namespace]

    def writes(self) -> list[Request]:
        """The status and Event writes received (answered or not), in order."""
        return [r for r in self.requests if r.method != "GET" and _health_path(r.method, r.path)]

    async def _node_health(self, method: str, path: str, writer: asyncio.StreamWriter, body: bytes,
                           content_type: str) -> bool:
        resource = "events" if path.startswith("/api/v1/namespaces/") else "nodes/status"
        if resource in self.forbidden:
            return await self._send(writer, 403, status(
                403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:x:y" cannot '
                                  f"{method.lower()} {resource}"))
        if method != "GET" and self.write_delay_s:
            await asyncio.sleep(self.write_delay_s)  # the emulated server's slowness, not a wait in a test
        patch = _PATCH_TYPES.get(content_type, "other")
        code, answer = (self._status_write(method, path, body, patch) if resource == "nodes/status"
                        else self._event_write(method, path, body, patch))
        if method != "GET" and self.cuts > 0:
            self.cuts -= 1
            return False  # applied; the connection is closed without an answer
        return await self._send(writer, code, answer)

    def _status_write(self, method: str, path: str, body: bytes, patch_type: str) -> tuple[int, dict[str, Any]]:
        name = path[len("/api/v1/nodes/"):-len("/status")]
        node = self.nodes.get(name)
        if node is None:
            return 404, status(404, "NotFound", f'nodes "{name}" not found')
        if method == "GET":
            return 200, node
        try:
            kind, patch = _patch_body(body, patch_type)
        except _Refused as e:
            return e.code, status(e.code, REASONS[e.code], str(e))
        if not isinstance(patch, dict) or not isinstance(patch.get("status", {}), dict):
            return 400, status(400, "BadRequest", "the patch is not an object with a status object")
        new = json.loads(json.dumps(node))
        new_status = new.setdefault("status", {})
        sent = patch.get("status", {})
        if kind == "strategic":
            conditions = sent.get("conditions")
            rest = {k: v for k, v in sent.items() if k != "conditions"}
            _merge(new_status, rest)
            if conditions is not None:
                if not isinstance(conditions, list) or not all(isinstance(c, dict) and "type" in c for c in conditions):
                    return 422, status(422, "Invalid", "status.conditions: each needs a type")
                stored = new_status.setdefault("conditions", [])
                for c in conditions:
                    same = next((old for old in stored if old.get("type") == c["type"]), None)
                    if same is None:
                        stored.append(dict(c))
                    else:
                        same.update(c)
        else:
            _merge(new_status, sent)
        for c in new_status.get("conditions") or []:
            if c.get("status") not in ("True", "False", "Unknown"):
                return 422, status(422, "Invalid", f"status.conditions[{c.get('type')}].status: Unsupported value: "
                                                   f"{c.get('status')!r}")
            for t in ("lastHeartbeatTime", "lastTransitionTime"):
                if t in c and not (isinstance(c[t], str) and _RFC3339.fullmatch(c[t])):
                    return 422, status(422, "Invalid", f"status.conditions[{c.get('type')}].{t}: not RFC 3339")
        node["status"] = new_status
        self.version += 1
        node["metadata"]["resourceVersion"] = str(self.version)
        self._event("MODIFIED", name)
        return 200, node

    def _event_write(self, method: str, path: str, body: bytes, patch_type: str) -> tuple[int, dict[str, Any]]:
        parts = path[len("/api/v1/namespaces/"):].split("/")
        namespace, name = parts[0], parts[2] if len(parts) == 3 else ""
        if method == "GET":
            if not name:
                return 200, {"apiVersion": "v1", "kind": "EventList", "items": self.events_of(namespace),
                             "metadata": {"resourceVersion": str(self.version)}}
            found = self.events.get((namespace, name))
            return (200, found) if found else (404, status(404, "NotFound", f'events "{name}" not found'))
        try:
            sent = _patch_body(body, patch_type)[1] if method == "PATCH" else json.loads(body)
        except _Refused as e:
            return e.code, status(e.code, REASONS[e.code], str(e))
        except ValueError as e:
            return 400, status(400, "BadRequest", f"not JSON: {e}")
        if not isinstance(sent, dict):
            return 400, status(400, "BadRequest", "the body is not an object")
        self.version += 1
        if method == "PATCH":
            stored = self.events.get((namespace, name))
            if stored is None:
                return 404, status(404, "NotFound", f'events "{name}" not found')
            _merge(stored, {k: v for k, v in sent.items() if k != "metadata"})
            stored["metadata"]["resourceVersion"] = str(self.version)
            return 200, stored
        meta = sent.get("metadata")
        if not isinstance(meta, dict) or meta.get("namespace", namespace) != namespace:
            return 400, status(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")
        if not meta.get("name"):
            return 422, status(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        involved = sent.get("involvedObject")
        if not isinstance(involved, dict) or involved.get("namespace", "") not in ("", namespace):
            return 422, status(422, "Invalid", "involvedObject.namespace: Invalid value: does not match "
                                               "event.namespace")
        if (namespace, meta["name"]) in self.events:
            return 409, status(409, "AlreadyExists", f'events "{meta["name"]}" already exists')
        created = {**sent, "metadata": {**meta, "namespace": namespace, "uid": f"uid-event-{self.version}",
                                        "resourceVersion": str(self.version)}}
        self.events[(namespace, meta["name"])] = created
        return 201, created


# -- NodeFeatures ----------------------------------------------------------------------------------
# NFD's custom resource (nfd.k8s-sigs.io/v1alpha1, namespaced), which gpu-feature-discovery creates and
# updates with its labels, as the real server answers: GET (404 as a Status), a list, POST (201;
# 409 AlreadyExists), PUT (the resourceVersion sent must be the stored one, else 409 Conflict; none
# at all is 422 Invalid, as for every custom resource). Any other verb is answered 403, as NVIDIA's
# RBAC (get, list, watch, create, update) would. Injected `failures` come first, as for Nodes.
# `races` makes the next writes lose a race to another writer (the object created, or its
# resourceVersion moved on, just before), so that a client's re-read can be seen; `fault` answers
# every NodeFeature with one of NODEFEATURE_FAULTS.

NODEFEATURES_PREFIX = "/apis/nfd.k8s-sigs.io/v1alpha1/namespaces/"
NODEFEATURE_API_VERSION = "nfd.k8s-sigs.io/v1alpha1"
NODE_NAME_LABEL = "nfd.node.kubernetes.io/node-name"
_RESOURCE = "nodefeatures.nfd.k8s-sigs.io"
NODEFEATURE_FAULTS = (
    "other-name",    # a NodeFeature of another name
    "node",          # a Node of the same name (a misrouted answer)
    "no-version",    # the NodeFeature without metadata.resourceVersion
    "labels-list",   # spec.labels a list of "key=value"
    "other-labels",  # spec.labels not the ones stored (a write's answer that does not show the write)
)
_REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid"}
Answer = tuple[int, dict[str, Any]]


def _failure(code: int, message: str, reason: str = "") -> Answer:
    return code, status(code, reason or _REASONS.get(code, "Error"), message)


def _faulted(fault: str, obj: dict[str, Any]) -> dict[str, Any]:
    bad: dict[str, Any] = json.loads(json.dumps(obj))
    meta = bad["metadata"]
    if fault == "other-name":
        meta["name"] += "-other"
    elif fault == "node":
        bad = {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": meta["name"], "uid": "uid-node", "resourceVersion": meta["resourceVersion"], "labels": {}}}
    elif fault == "no-version":
        del meta["resourceVersion"]
    elif fault == "labels-list":
        bad["spec"]["labels"] = [f"{k}={v}" for k, v in (bad["spec"].get("labels") or {}).items()]
    elif fault == "other-labels":
        bad["spec"]["labels"] = {"example.com/other": "true"}
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(NODEFEATURE_FAULTS)}")
    return bad


class NodeFeatures:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> NodeFeature
        self.version = 5000  # their own resourceVersions (opaque to clients, as the real ones)
        self.races = 0
        self.fault: str | None = None

    def add(self, namespace: str, name: str, labels: dict[str, str] | None = None, node: str = "") -> dict[str, Any]:
        """A NodeFeature as another writer (or an earlier pod) left it."""
        self.version += 1
        obj = {"apiVersion": NODEFEATURE_API_VERSION, "kind": "NodeFeature",
               "metadata": {"name": name, "namespace": namespace, "uid": f"uid-nf-{name}",
                            "resourceVersion": str(self.version), "generation": 1,
                            "labels": {NODE_NAME_LABEL: node} if node else {}},
               "spec": {"features": {"flags": {}, "attributes": {}, "instances": {}},
                        "labels": dict(labels or {})}}
        self.objects[(namespace, name)] = obj
        return obj

    def _race(self, namespace: str, name: str) -> None:
        """Another writer goes first: creates the object, or moves its resourceVersion on."""
        self.races -= 1
        current = self.objects.get((namespace, name))
        if current is None:
            self.add(namespace, name, {"example.com/other-writer": "true"})
        else:
            self.version += 1
            current["metadata"]["resourceVersion"] = str(self.version)

    def _object(self, code: int, obj: dict[str, Any]) -> Answer:
        return code, obj if self.fault is None else _faulted(self.fault, obj)

    def answer(self, method: str, path: str, body: bytes) -> Answer:
        parts = path[len(NODEFEATURES_PREFIX):].split("/")
        if len(parts) not in (2, 3) or parts[1] != "nodefeatures" or not all(parts):
            return _failure(404, "the server could not find the requested resource")
        namespace, name = parts[0], parts[2] if len(parts) == 3 else ""
        if method == "GET" and name:
            found = self.objects.get((namespace, name))
            return _failure(404, f'{_RESOURCE} "{name}" not found') if found is None else self._object(200, found)
        if method == "GET":
            return 200, {"apiVersion": NODEFEATURE_API_VERSION, "kind": "NodeFeatureList",
                         "metadata": {"resourceVersion": str(self.version)},
                         "items": [obj for (ns, _), obj in self.objects.items() if ns == namespace]}
        if (method, bool(name)) not in (("POST", False), ("PUT", True)):
            return _failure(403, f"{method} {path} is forbidden")
        try:
            sent = json.loads(body)
        except ValueError as e:
            return _failure(400, f"not JSON: {e}")
        meta = sent.get("metadata") if isinstance(sent, dict) else None
        if not isinstance(meta, dict) or sent.get("kind") != "NodeFeature" or \
                sent.get("apiVersion") != NODEFEATURE_API_VERSION or not isinstance(meta.get("name"), str) or \
                meta.get("namespace", namespace) != namespace or (name and meta["name"] != name):
            return _failure(400, "the body is not a NodeFeature of this name and namespace")
        name = meta["name"]
        if self.races > 0:
            self._race(namespace, name)
        stored = self.objects.get((namespace, name))
        self.version += 1
        if method == "POST":
            if stored is not None:
                return _failure(409, f'{_RESOURCE} "{name}" already exists', "AlreadyExists")
            created = {**sent, "metadata": {**meta, "namespace": namespace, "uid": f"uid-nf-{name}-{self.version}",
                                            "resourceVersion": str(self.version), "generation": 1}}
            self.objects[(namespace, name)] = created
            return self._object(201, created)
        if stored is None:
            return _failure(404, f'{_RESOURCE} "{name}" not found')
        if not meta.get("resourceVersion"):
            return _failure(422, f'{_RESOURCE} "{name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
                                 "must be specified for an update")
        if meta["resourceVersion"] != stored["metadata"]["resourceVersion"]:
            return _failure(409, f'Operation cannot be fulfilled on {_RESOURCE} "{name}": the object has been '
                                 "modified; please apply your changes to the latest version and try again")
        old = stored["metadata"]
        generation = old.get("generation", 1) + (sent.get("spec") != stored.get("spec"))
        updated = {**sent, "metadata": {**meta, "namespace": namespace, "uid": old["uid"],
                                        "resourceVersion": str(self.version), "generation": generation}}
        self.objects[(namespace, name)] = updated
        return self._object(200, updated)


# -- ResourceClaims --------------------------------------------------------------------------------
# resource.k8s.io ResourceClaims, which the dra-plugin reads by namespace and name to prepare them, as the
# real server answers: GET of /apis/resource.k8s.io/<version>/namespaces/<ns>/resourceclaims/<name> (the
# claim in that version's apiVersion; 404 as a Status with reason NotFound when there is none), a version
# the server does not serve (`versions`: v1 from Kubernetes 1.34, v1beta1 for 1.32 and 1.33) answered with
# the plain "404 page not found" of its mux, not a Status. Any other verb is 403: the plugin's RBAC is get.
# `delay_s` answers late (a slow server) until `release()`; `reads` counts the GETs answered. Injected
# `failures` come first, as for Nodes.

CLAIMS_GROUP = "/apis/resource.k8s.io/"


def is_claim_path(path: str) -> bool:
    parts = path[len(CLAIMS_GROUP):].split("/") if path.startswith(CLAIMS_GROUP) else []
    return len(parts) in (4, 5) and parts[1] == "namespaces" and parts[3] == "resourceclaims"


class ResourceClaims:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> claim, as v1 holds it
        self.versions = {"v1"}
        self.delay_s = 0.0
        self.reads = 0
        self._uids = 0
        self._released = asyncio.Event()

    async def slow(self) -> None:
        """The emulated server's slowness (not a wait in a test): delay_s, or until released."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.delay_s):
                await self._released.wait()

    def release(self) -> None:
        """Answers at once from now on, the reads held back too."""
        self.delay_s = 0.0
        self._released.set()
        self._released = asyncio.Event()

    def add(self, namespace: str, name: str, devices: list[str] | None, *, driver: str = "gpu.nvidia.com",
            pool: str = "node-1", request: str = "gpus", uid: str = "", results: list[dict[str, Any]] | None = None
            ) -> dict[str, Any]:
        """A claim allocated `devices` of `driver` in `pool` for `request` (`results` as given instead, for
        other drivers' or odd ones); `devices` None: not allocated. Returns it (its UID is the kubelet's)."""
        self._uids += 1
        claim: dict[str, Any] = {
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(7000 + self._uids),
                         "uid": uid or str(uuid.uuid4())},
            "spec": {"devices": {"requests": [{"name": request, "exactly": {
                "deviceClassName": "gpu.nvidia.com", "count": len(devices or [])}}]}},
            "status": {}}
        if devices is not None or results is not None:
            listed = results if results is not None else [
                {"request": request, "driver": driver, "pool": pool, "device": d} for d in devices or []]
            claim["status"]["allocation"] = {"devices": {"results": listed}, "nodeSelector": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [pool]}]}]}}
        self.objects[(namespace, name)] = claim
        return claim

    def answer(self, method: str, path: str) -> Answer | None:
        version, _, namespace, _, *name = path[len(CLAIMS_GROUP):].split("/")
        if version not in self.versions:
            return None
        if method != "GET" or not name or not name[0]:
            return _failure(403, f"{method} {path} is forbidden")
        self.reads += 1
        found = self.objects.get((namespace, name[0]))
        if found is None:
            return _failure(404, f'resourceclaims.resource.k8s.io "{name[0]}" not found')
        return 200, {**json.loads(json.dumps(found)), "apiVersion": f"resource.k8s.io/{version}"}


# -- ResourceSlices (resource.k8s.io) ----------------------------------------------------------------
# What the dra-plugin publishes, as the real server answers: discovery of the group (GET
# /apis/resource.k8s.io: an APIGroup listing the versions served, 404 when none is), and ResourceSlices
# under each served version (v1, v1beta2: devices flat; v1beta1: each device's fields under `basic`),
# stored once and shown in the version asked for. List with fieldSelector (spec.nodeName, spec.driver,
# metadata.name; another field is 400), watch (from a resourceVersion; 410 Gone as an ERROR event before
# the compacted history), POST (generateName; 409 AlreadyExists; dryRun=All answers without storing),
# PUT (the resourceVersion sent must be the stored one, else 409 Conflict; none is 422; driver and
# nodeName immutable), DELETE (preconditions.resourceVersion, else 409) and DELETE of the collection by
# field selector (what the kubelet does to a node's slices when it starts, and to a driver's when its
# socket goes: `wipe`). Validation as the API's: at most 128 devices a slice, 64 when one has a taint,
# 32 attributes and capacities a device, 4 taints, DNS-label device names, one value per attribute.
# Switches: `served` (the versions, in the server's order of preference), `taints` (False: device taints
# dropped without a word, as a server without DRADeviceTaints does), `taint_none` (False: effect None
# refused, 422, as before 1.35), `forbidden` (403: no RBAC). Injected `failures` come first, as for Nodes.

RESOURCE_GROUP = "resource.k8s.io"
RESOURCE_VERSIONS = ("v1", "v1beta2", "v1beta1")
_SLICES_PATH = re.compile(r"/apis/resource\.k8s\.io/(v1|v1beta1|v1beta2)/resourceslices(?:/([^/]+))?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
_SLICE_FIELDS = {"spec.nodeName": ("spec", "nodeName"), "spec.driver": ("spec", "driver"),
                 "metadata.name": ("metadata", "name")}
SLICE_FAULTS = ("other-node",)  # every slice answered names another node (a selector not honoured)


def _field(obj: dict[str, Any], path: tuple[str, str]) -> Any:
    part = obj.get(path[0])
    return part.get(path[1]) if isinstance(part, dict) else None


@dataclass
class _SliceWatch:
    selector: dict[tuple[str, str], str]
    version: str  # the API version asked for
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


class ResourceSlices:
    def __init__(self) -> None:
        self.served: list[str] = list(RESOURCE_VERSIONS)
        self.taints = True
        self.taint_none = True
        self.forbidden = False
        self.fault: str | None = None
        self.objects: dict[str, dict[str, Any]] = {}  # name -> ResourceSlice, stored in v1's layout
        self.version = 9000  # their own resourceVersions
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.compacted = 0
        self._generated = 0
        self._watches: list[_SliceWatch] = []

    # -- control ----------------------------------------------------------------------
    @staticmethod
    def handles(path: str) -> bool:
        return path.rstrip("/") == f"/apis/{RESOURCE_GROUP}" or _SLICES_PATH.fullmatch(path) is not None

    def of_node(self, node: str, driver: str = "") -> list[dict[str, Any]]:
        """The node's slices as stored (v1 layout), by name."""
        return [json.loads(json.dumps(o)) for _, o in sorted(self.objects.items())
                if o["spec"].get("nodeName") == node and driver in ("", o["spec"].get("driver"))]

    def create_behind(self, node: str, driver: str, metadata: dict[str, Any]) -> str:
        """Another client (NVIDIA's DRA driver) creates a slice of the node's pool, with its `metadata` (labels,
        ownerReferences); its name."""
        meta = {"generateName": f"{node}-{driver}-", **metadata}
        spec = {"driver": driver, "nodeName": node, "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                "devices": [{"name": "gpu-0"}]}
        self._create("v1", {"apiVersion": f"{RESOURCE_GROUP}/v1", "kind": "ResourceSlice", "metadata": meta,
                            "spec": spec}, meta, False)
        return str(meta["name"])

    def delete_behind(self, name: str) -> None:
        """Another client deletes one slice."""
        self._remove(name)

    def wipe(self, node: str, driver: str = "") -> int:
        """The kubelet's DeleteCollection of a node's slices (of one driver, or all)."""
        names = [o["metadata"]["name"] for o in self.of_node(node, driver)]
        for name in names:
            self._remove(name)
        return len(names)

    def compact(self) -> None:
        self.version += 1
        self.compacted = self.version
        self.history.clear()

    async def drop_watches(self) -> None:
        for w in self._watches:
            w.queue.put_nowait(None)
        await asyncio.sleep(0)

    async def end_watches(self) -> None:
        for w in self._watches:
            w.queue.put_nowait({})
        await asyncio.sleep(0)

    @property
    def watching(self) -> int:
        return len(self._watches)

    # -- state ------------------------------------------------------------------------
    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((self.version, kind, json.loads(json.dumps(obj))))
        for w in self._watches:
            if self._selected(obj, w.selector):
                w.queue.put_nowait({"type": kind, "object": self._wire(w.version, obj)})

    def _remove(self, name: str) -> dict[str, Any]:
        obj = self.objects.pop(name)
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self._event("DELETED", obj)
        return obj

    @staticmethod
    def _selected(obj: dict[str, Any], selector: dict[tuple[str, str], str]) -> bool:
        return all(_field(obj, path) == value for path, value in selector.items())

    @staticmethod
    def _selector(query: dict[str, str]) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        for term in filter(None, query.get("fieldSelector", "").split(",")):
            key, sep, value = term.partition("==") if "==" in term else term.partition("=")
            if not sep or key not in _SLICE_FIELDS:
                raise _Refused(400, f'"{key}" is not a known field selector: only "spec.nodeName", "spec.driver", '
                                    '"metadata.name"')
            out[_SLICE_FIELDS[key]] = value
        return out

    def _wire(self, version: str, stored: dict[str, Any]) -> dict[str, Any]:
        """A stored slice as the API version asked for shows it."""
        obj: dict[str, Any] = json.loads(json.dumps(stored))
        obj["apiVersion"] = f"{RESOURCE_GROUP}/{version}"
        if version == "v1beta1":
            obj["spec"]["devices"] = [{"name": d.get("name"), "basic": {k: v for k, v in d.items() if k != "name"}}
                                      for d in obj["spec"].get("devices") or []]
        if self.fault == "other-node":
            obj["spec"]["nodeName"] = f"{obj['spec'].get('nodeName')}-other"
        return obj

    def _stored(self, version: str, sent: dict[str, Any]) -> dict[str, Any]:
        """What a write sent, in v1's layout, checked as the API validates it."""
        if sent.get("kind") != "ResourceSlice" or sent.get("apiVersion") != f"{RESOURCE_GROUP}/{version}":
            raise _Refused(400, f"the object is not a ResourceSlice of {RESOURCE_GROUP}/{version}")
        meta, spec = sent.get("metadata"), sent.get("spec")
        if not isinstance(meta, dict) or not isinstance(spec, dict):
            raise _Refused(400, "metadata and spec must be objects")
        devices = spec.get("devices") or []
        if not isinstance(devices, list):
            raise _Refused(422, "spec.devices: must be a list")
        flat = []
        for i, d in enumerate(devices):
            if not isinstance(d, dict):
                raise _Refused(422, f"spec.devices[{i}]: must be an object")
            if version == "v1beta1":
                if not isinstance(d.get("basic"), dict):
                    raise _Refused(422, f"spec.devices[{i}].basic: Required value")
                d = {"name": d.get("name"), **d["basic"]}
            flat.append(dict(d))
        checked = {**spec, "devices": flat}
        self._validate(checked)
        return {"apiVersion": f"{RESOURCE_GROUP}/v1", "kind": "ResourceSlice", "metadata": dict(meta), "spec": checked}

    def _validate(self, spec: dict[str, Any]) -> None:
        def bad(message: str) -> _Refused:
            return _Refused(422, f"ResourceSlice is invalid: {message}")

        if not isinstance(spec.get("driver"), str) or not spec["driver"]:
            raise bad("spec.driver: Required value")
        if not isinstance(spec.get("nodeName"), str) or not spec["nodeName"]:
            raise bad("spec.nodeName: Required value (the emulator serves node-local slices only)")
        pool = spec.get("pool")
        if not isinstance(pool, dict) or not isinstance(pool.get("name"), str) or not pool["name"]:
            raise bad("spec.pool.name: Required value")
        for key, least in (("generation", 0), ("resourceSliceCount", 1)):
            value = pool.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise bad(f"spec.pool.{key}: Invalid value: {value!r}: must be an integer of at least {least}")
        devices = spec["devices"]
        names: set[str] = set()
        for i, d in enumerate(devices):
            where = f"spec.devices[{i}]"
            if not self.taints:
                d.pop("taints", None)  # the field is off: dropped, and the client is not told
            name = d.get("name")
            if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name) or name in names:
                raise bad(f"{where}.name: Invalid value: {name!r}: a unique DNS label")
            names.add(name)
            attrs, caps = d.get("attributes") or {}, d.get("capacity") or {}
            if not isinstance(attrs, dict) or not isinstance(caps, dict) or len(attrs) + len(caps) > 32:
                raise bad(f"{where}: at most 32 attributes and capacities together")
            for key, value in attrs.items():
                kinds = [k for k in ("int", "bool", "string", "version") if isinstance(value, dict) and k in value]
                if len(kinds) != 1 or len(value) != 1:
                    raise bad(f"{where}.attributes[{key}]: exactly one value is required")
                if kinds[0] in ("string", "version") and (not isinstance(value[kinds[0]], str)
                                                          or len(value[kinds[0]]) > 64):
                    raise bad(f"{where}.attributes[{key}]: a string of at most 64 characters")
            for key, value in caps.items():
                if not isinstance(value, dict) or not isinstance(value.get("value"), str) or \
                        not _QUANTITY.fullmatch(value["value"]):
                    raise bad(f"{where}.capacity[{key}].value: a quantity is required")
            taints = d.get("taints") or []
            if not isinstance(taints, list) or len(taints) > 4:
                raise bad(f"{where}.taints: at most 4")
            for j, t in enumerate(taints):
                effects = ("NoSchedule", "NoExecute", "None") if self.taint_none else ("NoSchedule", "NoExecute")
                if not isinstance(t, dict) or not isinstance(t.get("key"), str) or not t["key"]:
                    raise bad(f"{where}.taints[{j}].key: Required value")
                if t.get("effect") not in effects:
                    raise bad(f"{where}.taints[{j}].effect: Unsupported value: {t.get('effect')!r}: supported values: "
                              + ", ".join(f'"{e}"' for e in effects))
                t.setdefault("timeAdded", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        limit = 64 if any(d.get("taints") for d in devices) else 128
        if len(devices) > limit:
            raise bad(f"spec.devices: Too many: {len(devices)}: must have at most {limit} items")

    # -- HTTP ---------------------------------------------------------------------------
    async def serve(self, emu: KubeApiEmulator, method: str, path: str, query: dict[str, str],
                    writer: asyncio.StreamWriter, body: bytes) -> bool:
        if path.rstrip("/") == f"/apis/{RESOURCE_GROUP}":
            if method != "GET" or not self.served:
                return await emu._send(writer, 404, status(404, "NotFound", "the server could not find the requested "
                                                                            "resource"))
            return await emu._send(writer, 200, {
                "kind": "APIGroup", "apiVersion": "v1", "name": RESOURCE_GROUP,
                "versions": [{"groupVersion": f"{RESOURCE_GROUP}/{v}", "version": v} for v in self.served],
                "preferredVersion": {"groupVersion": f"{RESOURCE_GROUP}/{self.served[0]}", "version": self.served[0]}})
        m = _SLICES_PATH.fullmatch(path)
        assert m is not None
        version, name = m.group(1), m.group(2) or ""
        if version not in self.served:
            return await emu._send(writer, 404, status(404, "NotFound", "the server could not find the requested "
                                                                        "resource"))
        if self.forbidden:
            return await emu._send(writer, 403, status(403, "Forbidden", f'resourceslices.{RESOURCE_GROUP} is '
                                                                         f'forbidden: User "system:serviceaccount:x:y"'
                                                                         f" cannot {method.lower()} resourceslices"))
        try:
            if method == "GET" and not name and query.get("watch") in ("true", "1"):
                await self._watch(writer, version, self._selector(query), query.get("resourceVersion", ""),
                                  float(query.get("timeoutSeconds") or 0))
                return False
            code, answer = self._answer(method, version, name, query, body)
        except _Refused as e:
            code, answer = e.code, status(e.code, REASONS.get(e.code, "Invalid"), str(e))
        return await emu._send(writer, code, answer)

    def _answer(self, method: str, version: str, name: str, query: dict[str, str],
                body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "GET" and name:
            if name not in self.objects:
                raise _Refused(404, f'resourceslices.{RESOURCE_GROUP} "{name}" not found')
            return 200, self._wire(version, self.objects[name])
        if method in ("GET", "DELETE") and not name:
            selector = self._selector(query)
            items = [o for _, o in sorted(self.objects.items()) if self._selected(o, selector)]
            if method == "DELETE":
                items = [self._remove(o["metadata"]["name"]) for o in items]
            return 200, {"apiVersion": f"{RESOURCE_GROUP}/{version}", "kind": "ResourceSliceList",
                         "metadata": {"resourceVersion": str(self.version)},
                         "items": [self._wire(version, o) for o in items]}
        if method == "DELETE":
            stored = self.objects.get(name)
            if stored is None:
                raise _Refused(404, f'resourceslices.{RESOURCE_GROUP} "{name}" not found')
            options = json.loads(body) if body else {}
            pre = options.get("preconditions") if isinstance(options, dict) else None
            held = stored["metadata"]
            if isinstance(pre, dict) and (pre.get("resourceVersion") not in (None, held["resourceVersion"])
                                          or pre.get("uid") not in (None, held["uid"])):
                raise _Refused(409, f'Operation cannot be fulfilled on resourceslices.{RESOURCE_GROUP} "{name}": '
                                    "the precondition does not match the object")
            return 200, self._wire(version, self._remove(name))
        if method not in ("POST", "PUT") or (method == "POST") == bool(name):
            raise _Refused(405, f"{method} is not allowed here")
        try:
            sent = json.loads(body)
        except ValueError as e:
            raise _Refused(400, f"not JSON: {e}") from None
        if not isinstance(sent, dict):
            raise _Refused(400, "the body is not an object")
        new = self._stored(version, sent)
        meta = new["metadata"]
        if method == "POST":
            return self._create(version, new, meta, query.get("dryRun") == "All")
        if meta.get("name") != name:
            raise _Refused(400, "the name of the object does not match the name on the URL")
        stored = self.objects.get(name)
        if stored is None:
            raise _Refused(404, f'resourceslices.{RESOURCE_GROUP} "{name}" not found')
        if not meta.get("resourceVersion"):
            raise _Refused(422, "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
        if meta["resourceVersion"] != stored["metadata"]["resourceVersion"]:
            raise _Refused(409, f'Operation cannot be fulfilled on resourceslices.{RESOURCE_GROUP} "{name}": the '
                                "object has been modified; please apply your changes to the latest version and try "
                                "again")
        for key in ("driver", "nodeName"):
            if new["spec"].get(key) != stored["spec"].get(key):
                raise _Refused(422, f"ResourceSlice is invalid: spec.{key}: Invalid value: field is immutable")
        self.version += 1
        old = stored["metadata"]
        new["metadata"] = {**meta, "uid": old["uid"], "creationTimestamp": old["creationTimestamp"],
                           "resourceVersion": str(self.version),
                           "generation": old["generation"] + (new["spec"] != stored["spec"])}
        self.objects[name] = new
        self._event("MODIFIED", new)
        return 200, self._wire(version, new)

    def _create(self, version: str, new: dict[str, Any], meta: dict[str, Any],
                dry_run: bool) -> tuple[int, dict[str, Any]]:
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _Refused(422, "metadata.name: Required value: name or generateName is required")
            self._generated += 1
            meta["name"] = f"{meta['generateName']}{self._generated:05x}"
        if meta["name"] in self.objects:
            raise _Refused(409, f'resourceslices.{RESOURCE_GROUP} "{meta["name"]}" already exists')
        if dry_run:
            new["metadata"] = {**meta, "uid": "uid-dry-run", "generation": 1}
            return 201, self._wire(version, new)
        self.version += 1
        new["metadata"] = {**meta, "uid": f"uid-slice-{self.version}", "resourceVersion": str(self.version),
                           "generation": 1, "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.objects[meta["name"]] = new
        self._event("ADDED", new)
        return 201, self._wire(version, new)

    async def _watch(self, writer: asyncio.StreamWriter, version: str, selector: dict[tuple[str, str], str],
                     since: str, timeout: float) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")

        def chunk(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        start = int(since) if since.isdigit() else 0
        if start and start < self.compacted:
            chunk({"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {start} "
                                                                     f"({self.compacted})")})
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        watch = _SliceWatch(selector, version)
        self._watches.append(watch)
        try:
            if not start:  # no version: the current state first, as the real one
                for obj in [o for _, o in sorted(self.objects.items()) if self._selected(o, selector)]:
                    chunk({"type": "ADDED", "object": self._wire(version, obj)})
            for at, kind, obj in self.history:
                if start and at > start and self._selected(obj, selector):
                    chunk({"type": kind, "object": self._wire(version, obj)})
            await writer.drain()
            while True:
                try:
                    async with asyncio.timeout(timeout or None):
                        event = await watch.queue.get()
                except TimeoutError:
                    event = {}
                if event is None:
                    break  # cut without the final chunk
                if not event:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    break
                chunk(event)
                await writer.drain()
        finally:
            self._watches.remove(watch)
