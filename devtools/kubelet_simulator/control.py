"""The simulator as a process: a JSON-lines control socket, and the client for it.

Tests, the demo and the benchmarks drive a simulator running in its own process the way
an operator would look at a node: what resources it holds, an allocation, a restart.
`wait` blocks in the simulator until its view matches, and answers with the time of the
update that made it so, which is what the latency benchmarks measure against.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from devtools.kubelet_simulator.simulator import KubeletSimulator

log = logging.getLogger(__name__)


def _matches(sim: KubeletSimulator, cond: dict[str, Any]) -> bool:
    view = sim.resources.get(cond["resource"])
    if view is None:
        return False
    if "connected" in cond and view.connected != cond["connected"]:
        return False
    if "device" in cond and view.devices.get(cond["device"]) != cond.get("health", "Healthy"):
        return False
    if "allocatable" in cond and sum(1 for h in view.devices.values() if h == "Healthy") != cond["allocatable"]:
        return False
    if "registrations" in cond and sum(1 for r in sim.registrations if r["ok"]) < cond["registrations"]:
        return False
    return not ("capacity" in cond and len(view.devices) != cond["capacity"])


async def handle(sim: KubeletSimulator, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    if op == "state":
        return {"ok": True, "state": sim.snapshot()}
    if op == "wait":
        ok = await sim.wait_for(lambda: _matches(sim, cmd), float(cmd.get("timeout", 10)))
        view = sim.resources.get(cmd["resource"])
        return {"ok": ok, "at": view.updated_at if view else 0.0, "state": sim.snapshot()}
    if op == "configure":
        if "refuse" in cmd:
            sim.refuse = cmd["refuse"] or None
        if "register_delay" in cmd:
            sim.register_delay = float(cmd["register_delay"])
        return {"ok": True}
    if op == "drop":
        await sim.drop(cmd["resource"])
        return {"ok": True}
    if op == "restart":
        # count > 1: a crash-looping kubelet, `interval` seconds between restarts
        for n in range(int(cmd.get("count", 1))):
            if n:
                await asyncio.sleep(float(cmd.get("interval", 0.0)))
            await sim.restart()
        return {"ok": True}
    try:
        if op == "allocate":
            resp = await sim.allocate(cmd["resource"], list(cmd["ids"]))
            return {"ok": True, "response": json_format.MessageToDict(resp)}
        if op == "preferred":
            ids = await sim.preferred(cmd["resource"], cmd["available"], cmd.get("must", []), int(cmd["size"]))
            return {"ok": True, "ids": ids}
    except grpc.aio.AioRpcError as e:
        return {"ok": False, "code": e.code().name, "error": e.details()}
    except LookupError as e:
        return {"ok": False, "code": "NOT_REGISTERED", "error": str(e)}
    return {"ok": False, "error": f"unknown op {op!r}"}


async def serve(directory: Path, control: Path, stop: asyncio.Event) -> None:
    sim = KubeletSimulator(directory)
    await sim.start()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = await handle(sim, json.loads(line))
                except (ValueError, KeyError, TypeError) as e:
                    reply = {"ok": False, "error": f"bad command: {e!r}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    control.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(on_conn, path=str(control), limit=64 * 1024 * 1024)
    os.chmod(control, 0o600)
    try:
        await stop.wait()
    finally:
        server.close()
        await sim.stop()
        control.unlink(missing_ok=True)


class KubeletSimClient:
    """Blocking client of a simulator process's control socket."""

    def __init__(self, control: Path, timeout: float = 30.0) -> None:
        self._path = control
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None

    def _connect(self) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self._path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # the simulator process is still starting
        s.settimeout(self._timeout + 5)
        self._sock, self._file = s, s.makefile("rb")

    def call(self, **cmd: Any) -> dict[str, Any]:
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._sock.sendall(json.dumps(cmd).encode() + b"\n")
        line = self._file.readline()
        if not line:
            self.close()
            raise ConnectionError("kubelet simulator closed the control connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.call(op="state")["state"]
        return state

    def wait(self, resource: str, timeout: float = 10.0, **cond: Any) -> dict[str, Any]:
        return self.call(op="wait", resource=resource, timeout=timeout, **cond)

    def allocate(self, resource: str, ids: list[str]) -> dict[str, Any]:
        return self.call(op="allocate", resource=resource, ids=ids)

    def preferred(self, resource: str, available: list[str], must: list[str], size: int) -> dict[str, Any]:
        return self.call(op="preferred", resource=resource, available=available, must=must, size=size)

    def restart(self, count: int = 1, interval: float = 0.0) -> None:
        self.call(op="restart", count=count, interval=interval)

    def close(self) -> None:
        if self._sock is not None:
            self._file.close()
            self._sock.close()
            self._sock = None
