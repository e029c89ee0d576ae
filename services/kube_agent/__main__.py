"""kube-agent: wiring only. It runs a set of optional parts, each off unless configured: per-node
configuration (CONFIG_FILE_SRCDIR: the node label and the mounted ConfigMap), the pod's metrics
endpoint (METRICS_PORT) and the node's GPU health in the API (HEALTH_NODE_CONDITION,
HEALTH_NODE_EVENTS). With none of them it exits 0 at once, before importing the Kubernetes client,
and supervisord leaves it alone: it costs nothing."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from common.logs import configure_logging
from common.settings import Settings
from services.kube_agent.board import CONFIG_PART, HEALTH_PART, METRICS_PART
from services.kube_agent.selection import DST, NODE_NAME, SRCDIR, Rules, SelectionError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping

    from services.kube_agent.agent import KubeAgent
    from services.kube_agent.board import KubeBoard, StatePublisher
    from services.kube_agent.metrics import Metrics
    from services.kube_agent.reporter import NodeHealth

log = logging.getLogger(__name__)

# What a config reload changes in a running kube-agent (nothing yet), and what it uses but cannot change:
# a change is named in a warning and applies at the next start.
LIVE: frozenset[str] = frozenset()
RESTART = frozenset({"metrics_port", "node_condition", "node_events"})


def parts(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """The parts this configuration enables, named as the log says them."""
    enabled = []
    if environ.get(SRCDIR):
        enabled.append(CONFIG_PART)
    if settings.metrics_port:
        enabled.append(METRICS_PART)
    if settings.node_condition or settings.node_events:
        enabled.append(HEALTH_PART)
    return enabled


def _config_part(environ: Mapping[str, str], node: str, publisher: StatePublisher) -> KubeAgent:
    """Per-node configuration, its settings checked (a bad one is permanent: raised before any part runs)."""
    from common.lifecycle import PermanentError
    from services.kube_agent.agent import KubeAgent

    dst = environ.get(DST) or environ.get("CONFIG_FILE") or ""
    if not dst:
        raise PermanentError(f"kube-agent: {SRCDIR} is set but neither {DST} nor CONFIG_FILE says where the "
                             "services read their config")
    try:
        rules = Rules.from_env(environ)
    except SelectionError as e:
        raise PermanentError(f"kube-agent: {e}") from e
    if not node:
        log.warning("%s is not set: the node label is not followed; selecting from DEFAULT_CONFIG and the "
                    "fallback strategies, following the ConfigMap", NODE_NAME)
    return KubeAgent(rules, node, Path(dst), publisher)


async def _follow_config(agent: KubeAgent) -> None:
    """The first selection at once (the services may be waiting for its file), then the ConfigMap and
    the node label followed. A task beside the other parts: the first read of the Node may take the
    API up to a minute, which the metrics, node health and the kube bus's heartbeat do not wait for."""
    import asyncio

    from common.lifecycle import run_until_stopped

    await agent.start()
    follow = [asyncio.create_task(agent.follow_configs(), name="configmap")]
    if agent.node:
        follow.append(asyncio.create_task(agent.follow_node(), name="node"))
    # Never stopped from here: both are cancelled with this task, and one that ends or fails ends it.
    await run_until_stopped(asyncio.Event(), *follow)


def _health_part(settings: Settings, node: str, board: KubeBoard) -> NodeHealth:
    """Node health: the GPUUnhealthy condition and the Events on this Node, from the health bus."""
    from common.bus.messages import HEALTH_SOCKET
    from common.lifecycle import PermanentError
    from services.kube_agent.node_health import silent_after
    from services.kube_agent.reporter import NodeHealth

    if not node:
        on = [name for name, value in (("HEALTH_NODE_CONDITION", settings.node_condition),
                                       ("HEALTH_NODE_EVENTS", settings.node_events)) if value]
        raise PermanentError(f"kube-agent: node health ({', '.join(on)}) writes on this node's Node, but {NODE_NAME} "
                             "is not set: set it from the pod's spec.nodeName (the chart does)")
    return NodeHealth(node, settings.bus_path(HEALTH_SOCKET), board, condition=settings.node_condition,
                      events=settings.node_events, silent_s=silent_after(settings.stale_after))


async def main(settings: Settings, stop: asyncio.Event) -> None:
    """The parts; a failure soon after the start is a crash loop, paused before the exit (common.restarts)."""
    from common.restarts import paced

    await paced("kube-agent", _run_parts)(settings, stop)


async def _run_parts(settings: Settings, stop: asyncio.Event) -> None:
    import asyncio

    from common.bus.messages import KUBE_SOCKET
    from common.bus.sockets import BusPublisher
    from common.lifecycle import ensure_private_dir, run_until_stopped
    from common.reload import Reloader
    from services.kube_agent.board import KubeBoard

    environ = os.environ
    reloader = Reloader.current()
    if reloader is not None:
        async def nothing_live(_new: Settings) -> None:
            pass

        reloader.serve(LIVE, RESTART, nothing_live)
    node = environ.get(NODE_NAME, "")
    enabled = parts(settings, environ)
    log.info("running: %s", ", ".join(enabled))
    # The client logs every request at info: a watch line per reconnect is noise on every node.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(KUBE_SOCKET), heartbeat_s=settings.heartbeat_s)
    # The parts share the kube bus's one state: each fills in its own fields.
    board = KubeBoard(publisher, node, enabled)
    board.publish_state(board.state)
    metrics: Metrics | None = None
    try:
        # Every part's settings checked first: a part refused (PermanentError) leaves no coroutine of
        # another one made and never run.
        health = _health_part(settings, node, board) if HEALTH_PART in enabled else None
        agent = _config_part(environ, node, board) if CONFIG_PART in enabled else None
        if METRICS_PART in enabled:
            from services.kube_agent.metrics import Metrics

            metrics = Metrics(settings)
        tasks = [asyncio.create_task(publisher.run(), name="bus-heartbeat")]
        if metrics is not None:
            tasks.append(asyncio.create_task(metrics.run(), name="metrics"))
        if health is not None:
            tasks.append(asyncio.create_task(health.run(), name="node-health"))
        if agent is not None:
            tasks.append(asyncio.create_task(_follow_config(agent), name="per-node-config"))
        await run_until_stopped(stop, *tasks)
    finally:
        if metrics is not None:
            metrics.close()
        publisher.close()


def run(settings: Settings) -> int:
    if not parts(settings, os.environ):
        configure_logging("kube-agent", settings.log_level)  # without the services' machinery (asyncio, the bus)
        log.info("nothing to do: per-node configuration is off (%s is not set), as are metrics (METRICS_PORT) "
                 "and node health (HEALTH_NODE_CONDITION, HEALTH_NODE_EVENTS)", SRCDIR)
        return 0
    from common.lifecycle import run_service
    from common.watchdog import watched

    return run_service("kube-agent", watched("kube-agent", main), settings)


if __name__ == "__main__":
    from common.lifecycle import service_entry

    sys.exit(service_entry("kube-agent", run, sys.argv[1:]))
