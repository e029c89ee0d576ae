"""kube-agent: wiring only. Without per-node configuration (no CONFIG_FILE_SRCDIR) it exits 0 at
once, before importing the Kubernetes client, and supervisord leaves it alone: it costs nothing."""

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

log = logging.getLogger(__name__)


async def main(settings: Settings, stop: asyncio.Event) -> None:
    import asyncio

    from common.bus.messages import KUBE_SOCKET
    from common.bus.sockets import BusPublisher
    from common.lifecycle import PermanentError, ensure_private_dir, run_until_stopped
    from services.kube_agent.agent import KubeAgent

    environ = os.environ
    dst = environ.get(DST) or environ.get("CONFIG_FILE") or ""
    if not dst:
        raise PermanentError(f"kube-agent: {SRCDIR} is set but neither {DST} nor CONFIG_FILE says where the "
                             "services read their config")
    try:
        rules = Rules.from_env(environ)
    except SelectionError as e:
        raise PermanentError(f"kube-agent: {e}") from e
    node = environ.get(NODE_NAME, "")
    if not node:
        log.warning("%s is not set: the node label is not followed; selecting from DEFAULT_CONFIG and the "
                    "fallback strategies, following the ConfigMap", NODE_NAME)
    # The client logs every request at info: a watch line per reconnect is noise on every node.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    ensure_private_dir(settings.run_dir)
    publisher = BusPublisher(settings.bus_path(KUBE_SOCKET))
    try:
        agent = KubeAgent(rules, node, Path(dst), publisher)
        await agent.start()
        tasks = [asyncio.create_task(publisher.run(), name="bus-heartbeat"),
                 asyncio.create_task(agent.follow_configs(), name="configmap")]
        if node:
            tasks.append(asyncio.create_task(agent.follow_node(), name="node"))
        await run_until_stopped(stop, *tasks)
    finally:
        publisher.close()


def run(settings: Settings) -> int:
    if not os.environ.get(SRCDIR):
        configure_logging("kube-agent", settings.log_level)  # without the services' machinery (asyncio, the bus)
        log.info("per-node configuration is off (%s is not set): nothing to do", SRCDIR)
        return 0
    from common.lifecycle import run_service
    from common.watchdog import watched

    return run_service("kube-agent", watched("kube-agent", main), settings)


if __name__ == "__main__":
    from common.lifecycle import service_entry

    sys.exit(service_entry("kube-agent", run, sys.argv[1:]))
