"""The kube-agent: follows this node's config label and the mounted ConfigMap, writes the selected config.

It is the only process that talks to the Kubernetes API server (as the health-monitor is the only
NVML user), and it needs only get/list/watch on its own Node. It reads the Node once (a list, in
the API's terms, that gives the resourceVersion to watch from), then watches it; a watch that ends
is resumed from the last version seen, and a 410 Gone (the version is too old) or any error starts
over with a fresh read. While the API is unreachable the active config stays as it is (what the
init container selected, or the last selection), and the agent retries with a growing pause; the
reason is on the bus (`kube.state`).

Every answer is checked before it is used, and one that fails a check is a failed read like an
unreachable server (the config stays, the reason is on the bus, retried): read within the bounds
of common.kubeapi, it must be JSON of the kind asked for (a Node, a NodeList of at most one item,
a watch event of a known type) and name this node, and its labels must be strings. The client
library's Node model is not used: it turned any object into a Node (a Pod or a Status read as a
Node without the label switched a node to the default config) or raised a validation error the
agent exited on.

The services follow the file it writes (common.reload): the agent never signals them. The write is
atomic and skipped when the content is unchanged, so a label flapping between two names that hold
the same config costs the services nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from common.bus.messages import KubeState
from common.fswatch import DirWatcher
from common.kubeapi import (
    HEADERS,
    MAX_ANSWER_BYTES,
    READ_ERRORS,
    WATCH_TIMEOUT,
    ApiStatus,
    Backoff,
    BadAnswer,
    ClientFactory,
    ConfigError,
    Http,
    body_of,
    default_client,
    json_type,
    kind_of,
    lines_of,
    parse_json,
    plain,
    reason,
    request,
    show,
    status_of,
)
from services.kube_agent.board import StatePublisher
from services.kube_agent.selection import Rules, Selection, SelectionError, available, content, digest, select
from services.kube_agent.selection import write_atomically as write

__all__ = ["KubeAgent", "NodeApi", "Seen"]

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
RECHECK_S = 60.0  # backstop for ConfigMap changes inotify cannot see
# The client waits on a watch without a read timeout: a connection that dies silently (a node
# losing its route, a black-holing load balancer) would hang it for good. The server ends each
# watch at WATCH_SERVER_S (it is resumed); one that outlives WATCH_RENEW_S is given up and
# the node read again, so a label change is missed for at most that long.
WATCH_SERVER_S = 240
WATCH_RENEW_S = 300.0
# A label value as the API server accepts one (it refuses any other): 63 characters at most.
LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class Seen:
    """What the agent takes from an answer about its Node."""

    label: str | None  # the config label's value; None: no such label
    version: str  # the resourceVersion, to watch from


class NodeApi:
    """get, list and watch of one Node: the requests the agent's RBAC allows, each answer read
    within bounds and checked before anything is taken from it."""

    def __init__(self, http: Http, node: str, label: str, limit: int = MAX_ANSWER_BYTES) -> None:
        self._http = http
        self.node = node
        self.label = label
        self.limit = limit
        self._selector = {"fieldSelector": f"metadata.name={node}"}

    async def get(self) -> Seen:
        what = f"GET of node {self.node}"
        return self._node(await self._read_json(f"/api/v1/nodes/{quote(self.node, safe='')}", {}, what), what)

    async def list(self) -> tuple[Seen | None, str]:
        """The node (None: there is none of that name) and the list's version (now, to watch from)."""
        what = f"list of node {self.node}"
        answer = await self._read_json("/api/v1/nodes", self._selector, what)
        if not isinstance(answer, dict) or answer.get("kind", "NodeList") != "NodeList":
            raise BadAnswer(f"{what}: {kind_of(answer)} where a NodeList was expected")
        meta, items = answer.get("metadata"), answer.get("items")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version:
            raise BadAnswer(f"{what}: the NodeList has no metadata.resourceVersion to watch from")
        if items is None:  # an empty list's items may be null
            items = []
        if not isinstance(items, list):
            raise BadAnswer(f"{what}: the NodeList's items are {json_type(items)}, not an array")
        if len(items) > 1:
            raise BadAnswer(f"{what}: {len(items)} items in the NodeList, where one node name was asked for")
        return (self._node(items[0], what, listed=True) if items else None), version

    async def watch(self, version: str, server_timeout: int) -> AsyncGenerator[tuple[str, Seen | None], None]:
        """(event type, what it says of the node) from `version` on: None for a BOOKMARK, which
        only moves the version. A watch the server ends (at `server_timeout`) is resumed from the
        last version seen, as the client library did; an ERROR event raises its Status."""
        what = f"watch of node {self.node}"
        params = {**self._selector, "watch": "true", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(server_timeout)}
        while True:
            params["resourceVersion"] = version
            # No read timeout: a watch is silent while the node does not change (the caller bounds it).
            async with self._http.stream("GET", "/api/v1/nodes", params=params, headers=HEADERS,
                                         timeout=WATCH_TIMEOUT) as resp:
                if resp.status_code != 200:
                    raise status_of(resp.status_code, resp.reason_phrase, await body_of(resp, what, self.limit))
                async for line in lines_of(resp, what, self.limit):
                    kind, seen = self._event(line, what)
                    version = seen.version
                    yield kind, (None if kind == "BOOKMARK" else seen)

    # -- reading ----------------------------------------------------------------------
    async def _read_json(self, path: str, params: dict[str, str], what: str) -> Any:
        return await request(self._http, "GET", path, what, params=params, limit=self.limit)

    # -- checking ---------------------------------------------------------------------
    def _node(self, obj: Any, what: str, listed: bool = False) -> Seen:
        """A Node's label and version, when `obj` is this Node. Kind and apiVersion where given (a
        list's items may go without them), the name, no namespace (a Node has none: a Pod of the
        same name does), the labels a mapping of strings, the config label a valid label value."""
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or kind not in ("Node", *((None,) if listed else ())):
            raise BadAnswer(f"{what}: {kind_of(obj)} where a Node was expected")
        if obj.get("apiVersion", "v1") != "v1":
            raise BadAnswer(f"{what}: a Node of apiVersion {show(obj['apiVersion'])}, where v1 was asked for")
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            raise BadAnswer(f"{what}: metadata is {json_type(meta)}, not an object")
        if meta.get("name") != self.node:
            raise BadAnswer(f"{what}: the Node is named {show(meta.get('name'))}")
        if meta.get("namespace"):
            raise BadAnswer(f"{what}: the Node has a namespace ({show(meta['namespace'])}): not a Node")
        version = self._version(meta, what)
        labels = meta.get("labels")
        if labels is None:
            labels = {}
        if not isinstance(labels, dict):
            raise BadAnswer(f"{what}: metadata.labels is {json_type(labels)}, not an object")
        for key, value in labels.items():
            if not isinstance(value, str):
                raise BadAnswer(f"{what}: label {show(key)} has {json_type(value)}, not a string")
        value = labels.get(self.label)
        if value is not None and not LABEL_VALUE.fullmatch(value):
            raise BadAnswer(f"{what}: label {self.label}={show(value)} is not a label value the API server accepts")
        return Seen(value, version)

    @staticmethod
    def _version(meta: dict[str, Any], what: str) -> str:
        version = meta.get("resourceVersion")
        if not isinstance(version, str) or not version:
            raise BadAnswer(f"{what}: metadata.resourceVersion is {show(version)}, not a version")
        return version

    def _event(self, line: bytes, what: str) -> tuple[str, Seen]:
        event = parse_json(line, what)
        kind = event.get("type") if isinstance(event, dict) else None
        if not isinstance(event, dict) or not isinstance(kind, str) or "object" not in event:
            raise BadAnswer(f"{what}: {json_type(event)} that is not a watch event")
        obj = event["object"]
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = obj.get("message") if isinstance(obj, dict) else None
            if not isinstance(code, int) or not isinstance(message, str):
                raise BadAnswer(f"{what}: an ERROR event without a Status")
            raise ApiStatus(code, plain(message))
        if kind == "BOOKMARK":  # only a version: the object is a Node with nothing but metadata.resourceVersion
            if not isinstance(obj, dict) or obj.get("kind", "Node") != "Node" or not isinstance(obj.get("metadata"),
                                                                                                 dict):
                raise BadAnswer(f"{what}: a BOOKMARK of {kind_of(obj)}, not of a Node")
            return kind, Seen(None, self._version(obj["metadata"], what))
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise BadAnswer(f"{what}: an event of type {show(kind)}")
        return kind, self._node(obj, f"{what}, {kind} event")


class KubeAgent:
    def __init__(self, rules: Rules, node: str, dst: Path, publisher: StatePublisher | None,
                 client: ClientFactory = default_client, renew_s: float = WATCH_RENEW_S) -> None:
        self._renew_s = renew_s
        self.rules = rules
        self.node = node
        self.dst = dst
        self._pub = publisher
        self._client_factory = client
        self.label: str | None = None
        self.label_known = False  # read from the API at least once
        self.api_reachable = False
        self.api_error = ""
        self.select_error = ""
        self.selection: Selection | None = None
        self.digest = ""
        self.unknown = ""
        self.changed = asyncio.Event()  # set after every write (the config-manager's sidecar signals then)

    # -- selection --------------------------------------------------------------------
    async def reselect(self) -> None:
        """Selects again from the current label and ConfigMap; writes the result if it changed."""
        if self.node and not self.label_known and self.selection is None and self.dst.exists():
            # Started while the API is away or answers badly, with a config in place (selected with
            # the label, by the init container or before a restart): a selection without the label
            # would replace it (a node went from 64 devices to 8). It stays until the label is read.
            return
        try:
            sel = select(self.rules, available(self.rules.srcdir), self.label)
            self.unknown = sel.unknown
            if sel.unknown:
                log.error("node label %s=%s names no config in %s: %s", self.rules.label, sel.unknown,
                          self.rules.srcdir, "keeping the active config" if self.selection else f"using {sel.why}")
                if self.selection is not None:
                    self._publish()
                    return
            text = content(self.rules, sel.name)
        except SelectionError as e:
            self.select_error = str(e)
            log.error("config not changed: %s", e)
            self._publish()
            return
        self.select_error = ""
        if write(self.dst, text):
            log.info("wrote config %s to %s (%s)", sel.name or "(empty)", self.dst, sel.why)
            self.changed.set()
        self.selection, self.digest = sel, digest(text)
        self._publish()

    def _publish(self) -> None:
        if self._pub is None:
            return
        sel = self.selection
        self._pub.publish_state(KubeState(
            api_reachable=self.api_reachable, node=self.node, label=self.label or "",
            config=(sel.name or "") if sel else "", why=sel.why if sel else "", digest=self.digest,
            unknown=self.unknown, error=self.select_error or self.api_error))

    # -- the API ----------------------------------------------------------------------
    async def _label_is(self, value: str | None) -> None:
        first = not self.label_known
        self.label_known = True
        if first or value != self.label:
            if not first:
                log.info("node %s: label %s %s", self.node, self.rules.label,
                         f"is now {value}" if value is not None else "was removed")
            self.label = value
            await self.reselect()

    async def _unreachable(self, why: str) -> None:
        if self.api_reachable or why != self.api_error:
            log.warning("API server: %s (the active config stays; retrying)", why)
        self.api_reachable, self.api_error = False, why
        self._publish()

    async def follow_node(self) -> None:
        """Forever: read the Node, watch it, and on any failure start over after a pause."""
        http: Http | None = None
        backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        try:
            while True:
                try:
                    if http is None:
                        http = self._client_factory()
                    api = NodeApi(http, self.node, self.rules.label)
                    # A list, not a get: its version is the collection's (now), which a watch can
                    # resume from; a Node's own version may be older than the server's history.
                    seen, version = await api.list()
                    if seen is None:
                        await self._unreachable(f"node {self.node} not found")
                        await asyncio.sleep(backoff.failed())  # a pause between attempts, not a wait for a condition
                        continue
                    if not self.api_reachable:
                        log.info("API server reachable; node %s", self.node)
                    self.api_reachable, self.api_error = True, ""
                    await self._label_is(seen.label)
                    self._publish()
                    try:
                        async with asyncio.timeout(self._renew_s), aclosing(api.watch(
                                version, min(WATCH_SERVER_S, max(1, int(self._renew_s * 0.8))))) as events:
                            async for kind, event in events:
                                backoff.succeeded()  # the watch works: the next failure is retried soon
                                if kind in ("ADDED", "MODIFIED") and event is not None:
                                    await self._label_is(event.label)
                                # BOOKMARK: only a newer version (kept by the watch); DELETED: a node
                                # being removed keeps its config until this pod goes too.
                    except TimeoutError:
                        log.debug("watch of node %s renewed after %.0f s", self.node, self._renew_s)
                        continue
                except ApiStatus as e:
                    if e.code == 410 and backoff.fresh:
                        log.info("watch of node %s: 410 Gone (version too old): reading it again", self.node)
                        backoff.failed()  # counted, not waited: a second 410 in a row waits like any error
                        continue
                    await self._unreachable(reason(e))
                except ConfigError as e:
                    await self._unreachable(reason(e))
                    if http is not None:
                        await http.aclose()
                    http = None
                except READ_ERRORS as e:
                    await self._unreachable(reason(e))
                # A pause between attempts, growing while the API stays away; not a wait for a condition.
                await asyncio.sleep(backoff.failed())
        finally:
            if http is not None:
                await http.aclose()

    # -- the ConfigMap ----------------------------------------------------------------
    async def follow_configs(self) -> None:
        watcher = DirWatcher(self.rules.srcdir)
        watcher.start()
        try:
            await self.reselect()  # a change between the first selection and the watch
            while True:
                names = await watcher.next(timeout=RECHECK_S)
                if names or self.selection is None:
                    await self.reselect()
        finally:
            watcher.close()

    async def start(self) -> None:
        """The first selection: with the label when the API answers at once, else without it only
        when no config is in place yet (a node must come up; one that has a config keeps it)."""
        if not self.node:
            await self.reselect()
            return
        try:
            http = self._client_factory()
            try:
                seen = await NodeApi(http, self.node, self.rules.label).get()
            finally:
                await http.aclose()
        except READ_ERRORS as e:
            log.warning("node label %s of node %s is not read (%s); %s", self.rules.label, self.node, reason(e),
                        "keeping the config in place" if self.dst.exists() else "selecting without the node label")
            self.api_error = reason(e)
            if not self.dst.exists():
                await self.reselect()
            else:
                self._publish()
            return
        self.api_reachable = True
        await self._label_is(seen.label)
