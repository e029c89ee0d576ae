"""The kube-agent's metrics part on real sockets: a health publisher on the real bus, the part on its own
loop, and HTTP as a scraper speaks it."""

from __future__ import annotations

import dataclasses
import select
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.bus.messages import UNHEALTHY, HealthEvent
from common.settings import Settings
from devtools.loop_thread import LoopThread
from services.kube_agent.metrics import MAX_CLIENTS, Metrics
from tests.conftest import wait_until
from tests.integration.conftest import MakeNode
from tests.integration.fakes import FakeHealthMonitor, gpus


def scrape(port: int, path: str = "/metrics", method: str = "GET", host: str = "127.0.0.1") -> tuple[int, str]:
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serves_what_the_buses_say_and_waits_out_a_taken_port(short_tmp: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    run = short_tmp / "run"
    devices = gpus(2)
    health = FakeHealthMonitor(run, devices)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    lt = LoopThread()
    try:
        part = lt.call(lambda: Metrics(Settings(run_dir=run, metrics_port=port), address="127.0.0.1",
                                       hostname="node-1", bind_retry_s=0.05))
        lt.spawn(part.run())
        # Another process holds the port: said once, the part runs on and takes the port once it is free.
        wait_until(lambda: "cannot listen on port" in caplog.text, 10, "the taken port named")
        taken.close()
        wait_until(part.listening.is_set, 10, "the port taken once free")
        assert caplog.text.count("cannot listen on port") == 1

        sick = dataclasses.replace(devices[1], health=UNHEALTHY, reason="XID 79", xid_count=1)
        health.publish([devices[0], sick])
        health.send(HealthEvent(time=time.time(), device=sick.id, event="xid", xid=79, reason="fatal"))

        def scraped() -> str | None:
            status, text = scrape(port)
            # The event went out after the state, on the same socket: with it, the state has come too.
            return text if status == 200 and 'xid="79"' in text else None

        text = wait_until(scraped, 10, "the XID and the unhealthy GPU in a scrape")
        labels = (f'gpu="1",UUID="{sick.id}",pci_bus_id="{sick.pci_bus_id}",device="nvidia1",'
                  f'modelName="NVIDIA H100",Hostname="node-1"')
        lines = text.splitlines()
        assert f"gpu_plugin_device_healthy{{{labels}}} 0" in lines
        assert f'gpu_plugin_device_xid_by_code_total{{{labels},xid="79",verdict="fatal"}} 1' in lines
        assert f"gpu_plugin_device_xid_errors_total{{{labels}}} 1" in lines
        assert scrape(port, "/")[0] == 404
        assert scrape(port, "/metrics", method="POST")[0] == 405
        status, body = scrape(port, "/metrics", method="HEAD")
        assert (status, body) == (200, "")
    finally:
        lt.close()
        health.close()
        taken.close()


def free_port() -> int:
    """A port free on both families (the kernel's pick for IPv4, checked on IPv6)."""
    while True:
        with socket.socket() as s4, socket.socket(socket.AF_INET6) as s6:
            s4.bind(("0.0.0.0", 0))
            port: int = s4.getsockname()[1]
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s6.bind(("::", port))
            except OSError:
                continue
            return port


def test_served_on_ipv4_and_ipv6_and_on_ipv4_alone_when_ipv6_cannot_be_had(
        short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pod in an IPv6 or dual-stack cluster is scraped on its IPv6 address. Where IPv6 cannot be
    had (off in the pod, or the port taken there) IPv4 serves on: no retry loop, said once."""
    run = short_tmp / "run"
    health = FakeHealthMonitor(run, gpus(1))
    lt = LoopThread()
    held = socket.socket(socket.AF_INET6)
    try:
        port = free_port()
        part = lt.call(lambda: Metrics(Settings(run_dir=run, metrics_port=port), hostname="node-1"))
        lt.spawn(part.run())
        wait_until(part.listening.is_set, 10, "the port bound")
        for host in ("127.0.0.1", "[::1]"):
            assert scrape(port, host=host)[0] == 200, host

        port = free_port()  # another part beside it, on another port
        held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        held.bind(("::", port))
        held.listen()
        part = lt.call(lambda: Metrics(Settings(run_dir=run, metrics_port=port), hostname="node-1",
                                       bind_retry_s=0.05))
        lt.spawn(part.run())
        wait_until(part.listening.is_set, 10, "the port bound on IPv4")
        assert scrape(port)[0] == 200
        assert caplog.text.count("not on IPv6") == 1 and "cannot listen on port" not in caplog.text
    finally:
        lt.close()
        held.close()
        health.close()


def test_idle_connections_do_not_lock_scrapers_out(short_tmp: Path) -> None:
    """Connections that never send a request (a port scanner, a client that connects ahead) take the
    places of the oldest of them, not those of the scrapers: every scrape is answered."""
    run = short_tmp / "run"
    health = FakeHealthMonitor(run, gpus(1))
    lt = LoopThread()
    idle: list[socket.socket] = []
    try:
        port = free_port()
        part = lt.call(lambda: Metrics(Settings(run_dir=run, metrics_port=port), address="127.0.0.1",
                                       hostname="node-1"))
        lt.spawn(part.run())
        wait_until(part.listening.is_set, 10, "the port bound")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CLIENTS + 4)]
        for _ in range(3):
            assert scrape(port)[0] == 200
        closed: set[int] = set()

        def count_closed() -> int:
            for i, s in enumerate(idle):
                if i not in closed and select.select([s], [], [], 0)[0] and s.recv(1) == b"":
                    closed.add(i)
            return len(closed)

        # The 4 beyond the limit took the 4 oldest idle ones' places, the first scrape the next one's
        # (the others found the place it left); the rest are held.
        wait_until(lambda: count_closed() == 4 + 1, 10, "the oldest idle connections closed")
        assert closed == set(range(5))
    finally:
        for s in idle:
            s.close()
        lt.close()
        health.close()


def test_the_kube_agent_serves_every_services_metrics(make_node: MakeNode) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = make_node(METRICS_PORT=str(port))
    node.start("kube-agent")
    ids = list(node.wait_devices())
    assert node.lt.run(node.sim.allocate("nvidia.com/gpu", ids[:1])).envs
    node.inject("xid", ids[1], "79")
    node.wait_health(ids[1], "Unhealthy")

    def scraped() -> str | None:
        try:
            _, text = scrape(port)
        except OSError:
            return None  # not listening yet
        done = ('method="Allocate"' in text and 'xid="79"' in text and "gpu_plugin_registrations_total" in text
                and f'gpu_plugin_device_healthy{{gpu="1",UUID="{ids[1]}"' in text)
        return text if done else None

    # One endpoint for the pod: the health-monitor's devices, the plugin-server's calls and the
    # registrar's registrations, each from its own bus.
    text = wait_until(scraped, 15, "every service's series in one scrape")
    lines = text.splitlines()
    assert any(line.startswith(f'gpu_plugin_device_healthy{{gpu="1",UUID="{ids[1]}",') and line.endswith(" 0")
               for line in lines)
    assert any(line.startswith(f'gpu_plugin_device_xid_by_code_total{{gpu="1",UUID="{ids[1]}",')
               and 'xid="79",verdict="fatal"} 1' in line for line in lines)
    assert any(line.startswith('gpu_plugin_grpc_calls_total{resource="nvidia.com/gpu",method="Allocate",code="OK"')
               and line.endswith(" 1") for line in lines)
    assert any(line.startswith("gpu_plugin_registrations_total{") and line.endswith(" 1") for line in lines)
