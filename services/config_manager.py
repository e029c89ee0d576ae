"""`config-manager`: NVIDIA's config-manager interface, served by the kube-agent's code.

NVIDIA's chart and the GPU Operator run it as an init container (ONESHOT=true) that copies the
config selected for this node from CONFIG_FILE_SRCDIR (a mounted ConfigMap) to CONFIG_FILE_DST,
where the plugin reads it (CONFIG_FILE), and as a sidecar (ONESHOT=false) that follows the node
label NODE_LABEL and the ConfigMap, rewrites the file and sends SIGNAL to PROCESS_TO_SIGNAL after
each change. The selection is NVIDIA's (services.kube_agent.selection): the label's config, else
DEFAULT_CONFIG, else FALLBACK_STRATEGIES (named, single, empty). The selected file is validated as
the plugin would read it (a bad config fails here, naming it). The API is reached as kubectl does
(in-cluster service account, else KUBECONFIG); without it the label is not read, said on the log.

Our services reload the file when it changes, so the signal is not needed by our image; it is sent
when SEND_SIGNAL=true and a process of that name exists (with the pod's shared process namespace).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.logs import configure_logging
from services.kube_agent.selection import (
    DST,
    ENV,
    NODE_NAME,
    ONESHOT,
    PROCESS_TO_SIGNAL,
    SEND_SIGNAL,
    SIGNAL,
    Rules,
    SelectionError,
)

__all__ = ["ENV", "main"]

log = logging.getLogger("config-manager")


class ConfigManagerError(Exception):
    pass


def _bool(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "false", "0", "no"):
        return False
    if raw in ("true", "1", "yes"):
        return True
    raise ConfigManagerError(f"{name}={environ[name]!r}: expected true or false")


def _signal_number(raw: str) -> int:
    raw = raw.strip().upper()
    if raw.isdigit():
        return int(raw)
    try:
        return int(signal.Signals[raw if raw.startswith("SIG") else f"SIG{raw}"])
    except KeyError:
        raise ConfigManagerError(f"{SIGNAL}={raw!r}: not a signal number or name") from None


def processes_named(name: str) -> list[int]:
    """PIDs whose command (comm, or argv[0]'s basename) is `name`, as pkill matches them."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            comm = Path(entry.path, "comm").read_text().strip()
            argv0 = Path(entry.path, "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if name in (comm, os.path.basename(argv0)):
            found.append(int(entry.name))
    return found


def send_signal(environ: Mapping[str, str]) -> None:
    name = environ.get(PROCESS_TO_SIGNAL, "")
    number = _signal_number(environ.get(SIGNAL) or "SIGHUP")
    pids = processes_named(name) if name else []
    if not pids:
        log.info("no process named %r to signal: our services follow the config file themselves", name)
    for pid in pids:
        try:
            os.kill(pid, number)
            log.info("sent signal %d to %s (pid %d)", number, name, pid)
        except OSError as e:
            log.warning("could not signal %s (pid %d): %s", name, pid, e.strerror)


async def _run(environ: Mapping[str, str], oneshot: bool, signal_after: bool) -> int:
    from services.kube_agent.agent import KubeAgent

    if not environ.get(DST):
        raise ConfigManagerError(f"{DST} is not set (where the plugin reads its config)")
    try:
        rules = Rules.from_env(environ)
    except SelectionError as e:
        raise ConfigManagerError(str(e)) from e
    agent = KubeAgent(rules, environ.get(NODE_NAME, ""), Path(environ[DST]), None)
    await agent.start()
    # Nothing selected is fine when the label was not read (no API server) and a config is in place:
    # it stays, as the kube-agent keeps it (a sidecar that exited here restarted for as long as the
    # API was away); the agent has said so on the log.
    if agent.selection is None and (agent.select_error or not agent.dst.exists()):
        raise ConfigManagerError(agent.select_error or "no config selected")
    if oneshot:
        return 0
    log.info("following the node label and %s", rules.srcdir)
    tasks = [asyncio.create_task(agent.follow_configs())]
    if agent.node:
        tasks.append(asyncio.create_task(agent.follow_node()))
    agent.changed.clear()
    try:
        while True:
            waiter = asyncio.create_task(agent.changed.wait())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t in done:
                    t.result()
                    raise ConfigManagerError("the config follower ended")
            agent.changed.clear()
            if signal_after:
                send_signal(environ)
    finally:
        for t in tasks:
            t.cancel()


def run(environ: Mapping[str, str]) -> int:
    oneshot = _bool(environ, ONESHOT)
    signal_after = _bool(environ, SEND_SIGNAL)
    if signal_after and not oneshot:
        _signal_number(environ.get(SIGNAL) or "SIGHUP")  # a bad SIGNAL fails at start, not at the first change
    logging.getLogger("httpx2").setLevel(logging.WARNING)

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        main = asyncio.create_task(_run(environ, oneshot, signal_after))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([main, stopper], return_when=asyncio.FIRST_COMPLETED)
        if main.done():
            stopper.cancel()
            return main.result()
        main.cancel()
        await asyncio.gather(main, return_exceptions=True)
        return 0

    return asyncio.run(guarded())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(f"config-manager: error: arguments {args} are not accepted; the interface is the environment "
              f"({', '.join(ENV)})", file=sys.stderr)
        return 2
    configure_logging("config-manager", "info", "config-manager: %(message)s")
    try:
        return run(os.environ)
    except (ConfigManagerError, OSError) as e:
        print(f"config-manager: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
