"""An emulated Kubernetes API server for tests: Nodes only, over plain HTTP/1.1, as the real one answers.

What the kube-agent uses, with the real server's behaviour at the edges: `GET /api/v1/nodes/<name>`
(404 as a Status), `GET /api/v1/nodes?watch=true&fieldSelector=metadata.name=<name>&resourceVersion=N`
(a chunked stream of JSON watch events after version N; 410 Gone as an ERROR event when N is older
than the compacted history; BOOKMARK events when `allowWatchBookmarks=true`), failures injected as
Status answers (403, 500, 503...), watches dropped mid-stream, and the whole server going away and
coming back on the same port. Every request is recorded (method, path, query) so that tests can
check the agent asks for nothing beyond its RBAC (get/list/watch of its own Node).

Development tool only: the product never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]


@dataclass
class _Watch:
    node: str
    version: int
    bookmarks: bool
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


REASONS = {403: "Forbidden", 404: "NotFound", 410: "Expired", 500: "InternalError", 503: "ServiceUnavailable"}


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
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                if length:
                    await reader.readexactly(length)
                url = urlsplit(target)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                self.requests.append(Request(method, url.path, query))
                if not await self._answer(method, url.path, query, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, code: int, body: dict[str, Any]) -> bool:
        data = json.dumps(body).encode()
        writer.write(f"HTTP/1.1 {code} {REASONS.get(code, 'OK')}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return True

    async def _answer(self, method: str, path: str, query: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        if self.failures:
            code = self.failures.pop(0)
            return await self._send(writer, code, status(code, REASONS.get(code, "Error"), f"injected {code}"))
        if method != "GET" or not path.startswith("/api/v1/nodes"):
            return await self._send(writer, 403, status(403, "Forbidden", f"{method} {path} is forbidden"))
        name = path[len("/api/v1/nodes/"):] if path.startswith("/api/v1/nodes/") else ""
        if name:
            if name not in self.nodes:
                return await self._send(writer, 404, status(404, "NotFound", f'nodes "{name}" not found'))
            return await self._send(writer, 200, self.nodes[name])
        selector = query.get("fieldSelector", "")
        wanted = selector.removeprefix("metadata.name=") if selector.startswith("metadata.name=") else None
        if query.get("watch") not in ("true", "1"):
            items = [n for k, n in self.nodes.items() if wanted in (None, k)]
            return await self._send(writer, 200, {"apiVersion": "v1", "kind": "NodeList", "items": items,
                                                  "metadata": {"resourceVersion": str(self.version)}})
        if wanted is None:
            return await self._send(writer, 403, status(403, "Forbidden", "watching every node is forbidden"))
        await self._watch(writer, wanted, int(query.get("resourceVersion") or 0),
                          query.get("allowWatchBookmarks") == "true", float(query.get("timeoutSeconds") or 0))
        return False

    async def _watch(self, writer: asyncio.StreamWriter, node: str, since: int, bookmarks: bool,
                     timeout: float) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")

        def chunk(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

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
                if not event:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    break
                chunk(event)
                await writer.drain()
        finally:
            self._watches.remove(watch)
