"""`gpu-plugin-dev`: the development tools' command (not installed with the product).

    gpu-plugin-dev inject xid|ecc|lost|remap|hang|recover <uuid> [value]   faults for the simulated driver
    gpu-plugin-dev kubelet-sim --dir D --control C                        the kubelet simulator
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from common.settings import SettingsError, add_arguments, resolve

FAULTS = ("xid", "ecc", "lost", "remap", "retired_pending", "event_error", "hang", "recover")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-plugin-dev", description="development tools for gpu-device-plugin")
    sub = p.add_subparsers(dest="command", required=True)
    inject = sub.add_parser("inject", help="inject a fault into the simulated NVML driver")
    inject.add_argument("fault", choices=FAULTS, help="hang: calls on the GPU block until recover")
    inject.add_argument("uuid", help="GPU or MIG device UUID")
    inject.add_argument("value", nargs="?", help="xid: the XID number; ecc: sbe or dbe; remap: pending")
    inject.add_argument("--count", type=int, default=1, help="ecc: how many errors")
    add_arguments(inject)

    ks = sub.add_parser("kubelet-sim", help="run the kubelet simulator")
    ks.add_argument("--dir", required=True, type=Path, help="device-plugin directory (kubelet.sock goes here)")
    ks.add_argument("--control", required=True, type=Path, help="control socket path")
    ks.add_argument("--log-level", default="info")
    return p


def _fail(message: str) -> int:
    print(f"gpu-plugin-dev: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "kubelet-sim":
        return _kubelet_sim(args)
    return _inject(args)


def _kubelet_sim(args: argparse.Namespace) -> int:
    from common.logs import configure_logging
    from devtools.kubelet_simulator.control import serve

    configure_logging("kubelet-sim", args.log_level)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, stop.set)
        await serve(args.dir, args.control, stop)

    asyncio.run(runner())
    return 0


def _inject(args: argparse.Namespace) -> int:
    from devtools.nvml_sim import SIM_CONTROL_SOCKET, FaultClient

    try:
        settings = resolve(args)
    except SettingsError as e:
        return _fail(str(e))
    cmd: dict[str, object] = {"op": args.fault, "uuid": args.uuid}
    if args.fault == "xid":
        if args.value is None or not args.value.isdigit():
            return _fail("inject xid needs the XID number, e.g. gpu-plugin-dev inject xid GPU-... 79")
        cmd["xid"] = int(args.value)
    elif args.fault == "remap":
        cmd["failed"] = args.value != "pending"
    elif args.fault == "ecc":
        if args.value not in ("sbe", "dbe"):
            return _fail("inject ecc needs sbe or dbe, e.g. gpu-plugin-dev inject ecc GPU-... dbe")
        cmd["kind"], cmd["count"] = args.value, args.count
    try:
        FaultClient(settings.run_dir / SIM_CONTROL_SOCKET).send(cmd)
    except (ConnectionError, ValueError) as e:
        return _fail(str(e))
    print(f"injected {args.fault} into {args.uuid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
