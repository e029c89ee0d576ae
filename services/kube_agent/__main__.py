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
from services.kube_agent.selection import DST, NODE_NAME, SRCDIR, Rules, SelectionError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Coroutine, Mapping
    from typing import Any

    from common.bus.sockets import BusPublisher
    from services.kube_agent.metrics import Metrics

log = logging.getLogger(__name__)

# What a config reload changes in a running kube-agent (nothing yet), and what it uses but cannot change:
# a change is named in a warning and applies at the next start.
LIVE: frozenset[str] = frozenset()
RESTART = frozenset({"metrics_port"})


def parts(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """The parts this configuration enables, named as the log says them."""
    enabled = []
    if environ.get(SRCDIR):
        enabled.append("per-node configuration")
    if settings.metrics_port:
        enabled.append("metrics")
    if settings.node_condition or settings.node_events:
        enabled.append("node health")
    return enabled


async def _config_part(environ: Mapping[str, str], node: str,
                       publisher: BusPublisher) -> list[tuple[str, Coroutine[Any, Any, None]]]:
    """Per-node configuration: the first selection now (the services may be waiting for its file),
    then the ConfigMap and the node label followed."""
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
    agent = KubeAgent(rules, node, Path(dst), publisher)
    await agent.start()
    return [("configmap", agent.follow_configs()), *([("node", agent.follow_node())] if node else [])]


async def main(settings: Settings, stop: asyncio.Event) -> None:
    import asyncio

    from common.bus.messages import KUBE_SOCKET
    from common.bus.sockets import BusPublisher
    from common.lifecycle import ensure_private_dir, run_until_stopped
    from common.reload import Reloader

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
    metrics: Metrics | None = None
    try:
        work: list[tuple[str, Coroutine[Any, Any, None]]] = [("bus-heartbeat", publisher.run())]
        if settings.metrics_port:
            from services.kube_agent.metrics import Metrics

            metrics = Metrics(settings)
            work.append(("metrics", metrics.run()))
        if environ.get(SRCDIR):
            work += await _config_part(environ, node, publisher)
        await run_until_stopped(stop, *(asyncio.create_task(c, name=name) for name, c in work))
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
