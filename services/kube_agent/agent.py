"""The kube-agent: follows this node's config label and the mounted ConfigMap, writes the selected config.

It is the only process that talks to the Kubernetes API server (as the health-monitor is the only
NVML user), and it needs only get/list/watch on its own Node. It reads the Node once (a list, in
the API's terms, that gives the resourceVersion to watch from), then watches it; a watch that ends
is resumed by the client from the last version seen, and a 410 Gone (the version is too old) or
any error starts over with a fresh read. While the API is unreachable the active config stays as
it is (what the init container selected, or the last selection), and the agent retries with a
growing pause; the reason is on the bus (`kube.state`).

The services follow the file it writes (common.reload): the agent never signals them. The write is
atomic and skipped when the content is unchanged, so a label flapping between two names that hold
the same config costs the services nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.resources.core_v1 import Node

from common.bus.messages import KubeState
from common.bus.sockets import BusPublisher
from common.fswatch import DirWatcher
from services.kube_agent.selection import Rules, Selection, SelectionError, available, content, digest, select
from services.kube_agent.selection import write_atomically as write

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
RECHECK_S = 60.0  # backstop for ConfigMap changes inotify cannot see
# The client waits on a watch without a read timeout: a connection that dies silently (a node
# losing its route, a black-holing load balancer) would hang it for good. The server ends each
# watch at WATCH_SERVER_S (the client resumes it); one that outlives WATCH_RENEW_S is given up and
# the node read again, so a label change is missed for at most that long.
WATCH_SERVER_S = 240
WATCH_RENEW_S = 300.0
ClientFactory = Callable[[], AsyncClient]


def default_client() -> AsyncClient:
    """In-cluster (the pod's service account), else KUBECONFIG, as kubectl finds its cluster."""
    return AsyncClient(config=KubeConfig.from_env())


def label_of(node: Any, label: str) -> str | None:
    labels = (node.metadata.labels or {}) if node.metadata is not None else {}
    value = labels.get(label)
    return None if value is None else str(value)


class KubeAgent:
    def __init__(self, rules: Rules, node: str, dst: Path, publisher: BusPublisher | None,
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
        client: AsyncClient | None = None
        pause = RETRY_MIN_S
        try:
            while True:
                try:
                    if client is None:
                        client = self._client_factory()
                    # A list, not a get: its version is the collection's (now), which a watch can
                    # resume from; a Node's own version may be older than the server's history.
                    listed = client.list(Node, fields={"metadata.name": self.node})
                    nodes = [n async for n in listed]
                    if not nodes:
                        await self._unreachable(f"node {self.node} not found")
                        await asyncio.sleep(pause)  # a pause between attempts, not a wait for a condition
                        pause = min(pause * 2, RETRY_MAX_S)
                        continue
                    if not self.api_reachable:
                        log.info("API server reachable; node %s", self.node)
                    self.api_reachable, self.api_error = True, ""
                    await self._label_is(label_of(nodes[0], self.rules.label))
                    self._publish()
                    version = listed.resourceVersion
                    try:
                        async with asyncio.timeout(self._renew_s):
                            async for kind, obj in client.watch(
                                    Node, fields={"metadata.name": self.node}, resource_version=version,
                                    server_timeout=min(WATCH_SERVER_S, max(1, int(self._renew_s * 0.8)))):
                                pause = RETRY_MIN_S  # the watch works: the next failure is retried soon
                                if kind in ("ADDED", "MODIFIED"):
                                    await self._label_is(label_of(obj, self.rules.label))
                                # BOOKMARK: only a newer version (kept by the client); DELETED: a node
                                # being removed keeps its config until this pod goes too.
                    except TimeoutError:
                        log.debug("watch of node %s renewed after %.0f s", self.node, self._renew_s)
                        continue
                except ApiError as e:
                    code = e.status.code if e.status is not None else 0
                    if code == 410 and pause == RETRY_MIN_S:
                        log.info("watch of node %s: 410 Gone (version too old): reading it again", self.node)
                        pause *= 2  # at once this time; a second 410 in a row waits like any error
                        continue
                    await self._unreachable(f"HTTP {code}: {e.status.message if e.status else e}")
                except ConfigError as e:
                    await self._unreachable(f"no API access configured: {e}")
                    client = None
                except (httpx2.HTTPError, OSError) as e:
                    await self._unreachable(f"{type(e).__name__}: {e}")
                # A pause between attempts, growing while the API stays away; not a wait for a condition.
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)
        finally:
            if client is not None:
                await client.close()

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
            client = self._client_factory()
            try:
                node = await client.get(Node, name=self.node)
            finally:
                await client.close()
        except (ApiError, ConfigError, httpx2.HTTPError, OSError) as e:
            log.warning("node label %s of node %s is not read: API server not reachable (%s); %s", self.rules.label,
                        self.node, e, "keeping the config in place" if self.dst.exists()
                        else "selecting without the node label")
            self.api_error = f"{type(e).__name__}: {e}"
            if not self.dst.exists():
                await self.reselect()
            else:
                self._publish()
            return
        self.api_reachable = True
        await self._label_is(label_of(node, self.rules.label))
