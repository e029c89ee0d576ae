"""`gpu-plugin`: one command for the services and the operator's tools on a node.

    gpu-plugin health-monitor | plugin-server | registrar     the three supervised services
    gpu-plugin mps-control                                     the MPS control daemons (sharing.mps only)
    gpu-plugin kube-agent                                      per-node configuration (the node label)
    gpu-plugin feature-labels                                  GPU feature labels from the health bus (gfd.enabled)
    gpu-plugin dra-plugin                                      the GPUs through DRA, gpu.nvidia.com (DRA_ENABLED)
    gpu-plugin bus tail [--topic T] [--device ID]              decoded bus traffic
    gpu-plugin status                                          a table of devices from the bus
    gpu-plugin cordon <uuid> [--reason R] | uncordon <uuid>    take a device out of / back into service

The simulators and fault injection are development tools (`gpu-plugin-dev`, devtools/).
Settings come from flags, then the environment, then the config file (see common.settings).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from common.heartbeat import SERVICES
from common.settings import Settings, SettingsError, add_arguments, resolve
from common.version import VersionAction

if TYPE_CHECKING:  # the services never load the bus's message types through here
    from common.bus.messages import DraState, HealthState, KubeState, PluginState, StateMessage




def _parser(service: str | None = None) -> argparse.ArgumentParser:
    """The command line; `service`: that service's subcommand alone. Each subcommand takes every
    setting (~50 options), and building the eleven cost every service start ~10 ms of CPU, at the
    pod's start four programs' worth at once for the ones that find nothing to do."""
    p = argparse.ArgumentParser(prog="gpu-plugin", description="Kubernetes device plugin for NVIDIA GPUs")
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", required=True)
    for name in SERVICES if service is None else (service,):
        add_arguments(sub.add_parser(name, help=f"run the {name} service"))
    if service is not None:
        return p

    bus = sub.add_parser("bus", help="look at the buses")
    bus_sub = bus.add_subparsers(dest="bus_command", required=True)
    tail = bus_sub.add_parser("tail", help="print decoded bus messages")
    tail.add_argument("--topic", action="append", default=[], help="topic prefix (repeatable), e.g. health.event")
    tail.add_argument("--device", help="only messages about this device ID")
    tail.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    tail.add_argument("--timeout", type=float, default=0.0, help="stop after S seconds (0: never)")
    add_arguments(tail)

    status = sub.add_parser("status", help="print the devices and their health")
    status.add_argument("--timeout", type=float, default=3.0, help="how long to wait for the health state")
    add_arguments(status)

    for verb, text in (("cordon", "take a device out of service"), ("uncordon", "put a device back in service")):
        c = sub.add_parser(verb, help=f"{text} (kept in the state dir; survives restarts)")
        c.add_argument("uuid", help="GPU or MIG device UUID")
        if verb == "cordon":
            c.add_argument("--reason", default="", help="shown in status, events and the device's reason")
        c.add_argument("--force", action="store_true", help="do not check the device against the health bus")
        add_arguments(c)

    return p


def _fail(message: str) -> int:
    print(f"gpu-plugin: error: {message}", file=sys.stderr)
    return 2


def _drop_stdout() -> None:
    """Points stdout at /dev/null so that the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        rc = _main(argv)
        sys.stdout.flush()  # here, not at exit: a full disk is then one line, not a traceback
        return rc
    except BrokenPipeError:
        # `gpu-plugin status | head -1`: the reader is gone, which is not an error of ours.
        _drop_stdout()
        return 128 + signal.SIGPIPE  # what a shell shows for a tool ended by SIGPIPE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO) or e.filename is not None:
            raise
        # `gpu-plugin status > /dev/full`: the output cannot be written; say so, once.
        _drop_stdout()
        print(f"gpu-plugin: error: cannot write the output: {e.strerror}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv[0] if argv and argv[0] in SERVICES else None).parse_args(argv)
    if args.command == "kube-agent":
        # It writes the config file the others read: a bad or missing one must not stop it.
        args.config_file = None
        os.environ["CONFIG_FILE_DST"] = os.environ.get("CONFIG_FILE_DST") or os.environ.get("CONFIG_FILE", "")
        os.environ.pop("CONFIG_FILE", None)
    try:
        settings = resolve(args)
    except SettingsError as e:
        if args.command in SERVICES:
            from common.lifecycle import bad_setting

            return bad_setting(args.command, e)
        # The tools need only the paths, which no config file sets; a bad file (one the services
        # refused to reload) is what `status` must be able to show.
        try:
            settings = resolve(argparse.Namespace(**{**vars(args), "config_file": None}),
                               {**os.environ, "CONFIG_FILE": ""})
        except SettingsError:
            return _fail(str(e))
        print(f"gpu-plugin: warning: {e} (read without the config file)", file=sys.stderr)
    if args.command in SERVICES:
        from common.lifecycle import remember_args

        remember_args(args)
        return _run_service(args.command, settings)
    import asyncio  # the tools only: a service's own module imports what it runs on

    if args.command == "bus":
        return asyncio.run(_tail(settings, args))
    if args.command == "status":
        return asyncio.run(_status(settings, args.timeout))
    if args.command in ("cordon", "uncordon"):
        return asyncio.run(_cordon(settings, args))
    return _fail(f"unknown command {args.command}")


def _run_service(name: str, settings: Settings) -> int:
    if name == "health-monitor":
        from services.health_monitor.__main__ import run
    elif name == "plugin-server":
        from services.plugin_server.__main__ import run
    elif name == "mps-control":
        from services.mps_control.__main__ import run
    elif name == "kube-agent":
        from services.kube_agent.__main__ import run
    elif name == "feature-labels":
        from services.feature_labels.__main__ import run
    elif name == "dra-plugin":
        from services.dra_plugin.__main__ import run
    else:
        from services.registrar.__main__ import run
    return run(settings)


S = TypeVar("S", bound="StateMessage")


async def _state(settings: Settings, socket: str, kind: type[S], timeout: float) -> S | None:
    """The state `kind` on the bus `socket`, as replayed on subscribe; None after `timeout`."""
    from common.bus.sockets import BusSubscriber

    sub = BusSubscriber([settings.bus_path(socket)], topics=[kind.TOPIC])
    try:
        msg = await sub.recv_timeout(timeout)
    finally:
        sub.close()
    return msg if isinstance(msg, kind) else None


async def _health_state(settings: Settings, timeout: float) -> HealthState | None:
    from common.bus.messages import HEALTH_SOCKET, HealthState

    return await _state(settings, HEALTH_SOCKET, HealthState, timeout)


async def _plugin_state(settings: Settings, timeout: float) -> PluginState | None:
    from common.bus.messages import PLUGIN_SOCKET, PluginState

    return await _state(settings, PLUGIN_SOCKET, PluginState, timeout)


def _node_health_line(kube: KubeState) -> str:
    """The kube-agent's node health: the condition as last written, the Events, and why writes fail."""
    condition = (f"condition GPUUnhealthy={kube.node_condition} ({kube.node_condition_reason})"
                 if kube.node_condition else "condition GPUUnhealthy not written (yet, or off)")
    line = (f"node health: node {kube.node or '?'}, {condition}; Events {kube.node_events_written} written, "
            f"{kube.node_events_pending} waiting, {kube.node_events_dropped} dropped")
    if kube.node_health_error:
        line += f"\nnode health: API WRITES FAILING (the node serves on; retrying): {kube.node_health_error}"
    return line


def _dra_lines(dra: DraState) -> list[str]:
    """The dra-plugin's registration with the kubelet, its devices and prepared claims, and what went wrong."""
    if dra.registered:
        registration = "registered with the kubelet"
    elif dra.registration_error:
        registration = f"REFUSED by the kubelet: {dra.registration_error}"
    else:
        registration = "not registered with the kubelet (yet: it registers plugins as their sockets appear)"
    health = "health state STALE (devices reported Unknown)" if dra.health_stale else f"{dra.unhealthy} unhealthy"
    names = [f"{c.namespace}/{c.name}" + ("" if c.phase == "PrepareCompleted" else " (preparing)") for c in dra.claims]
    shown = ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")
    lines = [f"dra: {dra.driver or '?'} on node {dra.node or '?'}, {registration}; {dra.devices} devices ({health}); "
             f"{len(dra.claims)} claims prepared{': ' + shown if shown else ''}; {dra.health_streams} health "
             f"stream{'s' if dra.health_streams != 1 else ''}"]
    sl = dra.slices
    if sl is None:
        lines.append("dra: ResourceSlices: not written yet")
    else:
        where = f"resource.k8s.io/{sl.api_version}" if sl.api_version else "API version not found yet"
        taints = f"; device taints: {sl.taints}" if sl.taints else ""
        lines.append(f"dra: ResourceSlices ({where}): {'published' if sl.published else 'NOT up to date'}, "
                     f"generation {sl.generation} in {sl.slices} slices, {sl.devices} devices ({sl.tainted} tainted"
                     f"{taints}), {sl.writes} writes, {sl.deleted_behind} rewritten after someone deleted them")
        if sl.left_out:
            lines.append(f"dra: ResourceSlices: left out, Unhealthy where no taint is kept: {', '.join(sl.left_out)}")
        if sl.error:
            lines.append(f"dra: ResourceSlices: API WRITES FAILING (retrying): {sl.error}")
    if dra.last_error:
        lines.append(f"dra: last claim error: {dra.last_error}")
    if dra.checkpoint_error:
        lines.append(f"dra: CHECKPOINT: {dra.checkpoint_error}")
    return lines


async def _dra_state(settings: Settings) -> DraState | None:
    """The dra-plugin's state, where one runs (its socket exists): else nothing, at once."""
    from common.bus.messages import DRA_SOCKET, DraState

    if not settings.bus_path(DRA_SOCKET).exists():
        return None
    return await _state(settings, DRA_SOCKET, DraState, 2.0)


async def _kube_state(settings: Settings) -> KubeState | None:
    """The kube-agent's state, where one runs (its socket exists): else nothing, at once."""
    from common.bus.messages import KUBE_SOCKET, KubeState

    if not settings.bus_path(KUBE_SOCKET).exists():
        return None
    return await _state(settings, KUBE_SOCKET, KubeState, 2.0)


def _services_line(settings: Settings) -> str:
    """Each service's heartbeat (its watchdog's file): a stale one is a loop or a process stuck."""
    from common.heartbeat import check_interval, process_lives, read_heartbeat, silence_limit

    now = time.time()
    parts = []
    for name in SERVICES:
        beat = read_heartbeat(settings.run_dir, name)
        if beat is None or not process_lives(beat[0], name):
            parts.append(f"{name} not running")
            continue
        pid, answered, limit = beat
        age = now - answered
        if age > 2 * check_interval(limit) + 1:
            parts.append(f"{name} STALE (pid {pid}: loop last answered {age:.0f} s ago; restarted at "
                         f"{limit:.0f} s if hung, {silence_limit(limit):.0f} s if frozen)")
        else:
            parts.append(f"{name} ok")
    return "services: " + ", ".join(parts)


async def _cordon(settings: Settings, args: argparse.Namespace) -> int:
    from common.cordons import CordonFileError, CordonStore

    if not args.force:
        state = await _health_state(settings, 3.0)
        if state is None:
            return _fail("no health state on the bus to check the device against (is the health-monitor "
                         "running?); use --force to write the cordon anyway")
        known = {d.id for d in state.devices}
        if args.uuid not in known:
            return _fail(f"unknown device {args.uuid}; this node has: {', '.join(sorted(known)) or 'none'}")
    store = CordonStore(settings.state_dir)
    try:
        if args.command == "cordon":
            store.cordon(args.uuid, args.reason)
            print(f"cordoned {args.uuid}" + (f": {args.reason}" if args.reason else ""))
        elif store.uncordon(args.uuid):
            print(f"uncordoned {args.uuid}")
        else:
            print(f"{args.uuid} was not cordoned")
    except (OSError, CordonFileError) as e:
        return _fail(f"cannot update cordons in {settings.state_dir}: {e}")
    return 0


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    import dataclasses

    from common.bus.messages import DRA_SOCKET, HEALTH_SOCKET, MPS_SOCKET, PLUGIN_SOCKET, REGISTRAR_SOCKET
    from common.bus.sockets import MAX_SUBSCRIPTION, BusSubscriber

    # A longer subscription frame makes the publisher drop the connection: tail would wait forever.
    too_long = [t for t in args.topic if len(t.encode()) >= MAX_SUBSCRIPTION]
    if too_long:
        return _fail(f"--topic {too_long[0][:40]!r}...: topics are at most {MAX_SUBSCRIPTION - 1} bytes")

    paths = [settings.bus_path(n) for n in (HEALTH_SOCKET, PLUGIN_SOCKET, REGISTRAR_SOCKET, MPS_SOCKET, DRA_SOCKET)]
    sub = BusSubscriber(paths, topics=args.topic or [""])
    deadline = time.monotonic() + args.timeout if args.timeout else None
    shown = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            msg = await sub.recv_timeout(wait)
            if msg is None:
                continue
            body = dataclasses.asdict(msg)
            if args.device and args.device not in json.dumps(body):
                continue
            print(f"{msg.TOPIC} {json.dumps(body, sort_keys=True)}", flush=True)
            shown += 1
            if args.count and shown >= args.count:
                break
    finally:
        sub.close()
    return 0


async def _status(settings: Settings, timeout: float) -> int:
    from common.bus.messages import DRA_SOCKET, KUBE_SOCKET
    from services.kube_agent.board import CONFIG_PART, HEALTH_PART

    msg = await _health_state(settings, timeout)
    if msg is None:
        from common.heartbeat import process_lives, read_heartbeat

        # A frozen publisher replays nothing: tell "none there" from "there but silent" by its
        # watchdog's file (the pid, and the time its loop last answered).
        alive = read_heartbeat(settings.run_dir, "health-monitor")
        if alive is not None and process_lives(alive[0], "health-monitor"):
            pid, answered, _ = alive
            print(f"health-monitor STALE: process {pid} lives but sent no state within {timeout:.0f} s; its loop "
                  f"last answered {time.time() - answered:.0f} s ago (hung? its watchdog restarts it)")
            return 1
        return _fail(f"no health state on {settings.run_dir}/health.sock within {timeout:.0f} s "
                     "(is the health-monitor running?)")
    age = time.time() - msg.sent_at
    print(f"driver {msg.driver_version or '?'}  nvml {'ok' if msg.nvml_ok else 'FAILED: ' + msg.error}  "
          f"state seq {msg.seq} ({'STALE, ' if age > settings.stale_after else ''}{age:.1f} s old)  "
          f"plugin {msg.plugin_version or '?'}")
    for reason in msg.degraded:
        print(f"degraded: {reason}")
    plugin = await _plugin_state(settings, 2.0)
    configs = [("", msg.config)]
    if plugin is not None and plugin.config != msg.config and (plugin.config.file or plugin.config.refused):
        # The plugin-server also refuses what the node cannot serve (a MIG layout), so it may differ.
        configs = [(" (health-monitor)", msg.config), (" (plugin-server)", plugin.config)]
    for who, cfg in configs:
        if cfg.file:
            print(f"config{who} {cfg.file} (sha256 {cfg.digest or '?'}, {cfg.reloads} reloads applied)")
        if cfg.refused:
            print(f"config{who} REFUSED (sha256 {cfg.refused_digest or '?'}; the config above stays in effect): "
                  f"{cfg.refused}")
    print(_services_line(settings))
    kube = await _kube_state(settings)
    if kube is None and settings.bus_path(KUBE_SOCKET).exists():
        # Its bus is bound but replays nothing: a frozen (or just restarting) kube-agent.
        print("per-node config: NO STATE from the kube-agent within 2 s (see its heartbeat above); "
              "the config in place stays")
    if kube is not None and (not kube.parts or CONFIG_PART in kube.parts):  # []: an older agent
        api = "API reachable" if kube.api_reachable else f"API NOT reachable ({kube.error})"
        print(f"per-node config: node {kube.node or '?'}, label {kube.label or '(none)'}, selected "
              f"{kube.config or '(empty)'} ({kube.why}); {api}")
        if kube.unknown:
            print(f"per-node config: label value {kube.unknown!r} names no config: not applied")
        if kube.error and kube.api_reachable:
            print(f"per-node config: {kube.error}")
    if kube is not None and HEALTH_PART in kube.parts:
        print(_node_health_line(kube))
    dra = await _dra_state(settings)
    if dra is not None:
        print("\n".join(_dra_lines(dra)))
    elif settings.bus_path(DRA_SOCKET).exists():
        print("dra: NO STATE from the dra-plugin within 2 s (see its heartbeat above)")
    rows = [("INDEX", "DEVICE", "HEALTH", "REASON", "SINCE", "MIG PARENT", "NUMA", "XID", "SBE", "DBE")]
    for d in msg.devices:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.since))
        numa = "-" if d.numa_node is None else str(d.numa_node)
        rows.append((d.index, d.id, d.health, d.reason or "-", since, d.parent or "-", numa,
                     str(d.xid_count), str(d.sbe_count), str(d.dbe_count)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
