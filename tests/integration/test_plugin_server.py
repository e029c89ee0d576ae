"""The plugin-server alone: a real process, fed by a test-side health publisher on the real
bus, dialled over its real unix socket as the kubelet would."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.bus.messages import UNHEALTHY, EndpointState, HealthState, Message, PluginState
from common.fswatch import file_id
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from tests.conftest import Procs, wait_until
from tests.integration.busclient import BusWatch
from tests.integration.fakes import FakeHealthMonitor, PluginClient, gpus


@dataclasses.dataclass
class Env:
    run: Path
    dp: Path
    health: FakeHealthMonitor
    procs: Procs

    @property
    def sock(self) -> Path:
        return self.dp / "nvidia-gpu.sock"

    def endpoint(self, predicate=lambda e: True, timeout: float = 10.0) -> EndpointState:  # type: ignore[no-untyped-def]
        def match(m: Message) -> bool:
            return isinstance(m, PluginState) and any(predicate(e) for e in m.endpoints)

        with BusWatch(self.run / "plugin.sock", ("plugin.state",)) as w:
            msg = w.wait(match, timeout)
        assert isinstance(msg, PluginState)
        return next(e for e in msg.endpoints if predicate(e))


@pytest.fixture
def env(procs: Procs, short_tmp: Path) -> Iterator[Env]:
    run, dp = short_tmp / "run", short_tmp / "dp"
    health = FakeHealthMonitor(run, gpus(4))
    procs.start("ps", "plugin-server", env={"GPU_PLUGIN_RUN_DIR": str(run), "KUBELET_SOCKET": str(dp / "kubelet.sock")})
    e = Env(run, dp, health, procs)
    yield e
    e.health.close()


def test_serves_the_published_devices_and_announces_the_endpoint(env: Env) -> None:
    ep = env.endpoint()
    assert (ep.resource, ep.endpoint) == ("nvidia.com/gpu", "nvidia-gpu.sock")
    assert ep.socket_id == file_id(env.sock) and ep.get_preferred_allocation_available
    assert (env.sock.stat().st_mode & 0o777) & 0o077 == 0, "the plugin socket is for the kubelet only"
    client = PluginClient(env.sock)
    try:
        client.watch()
        first = client.next_update()
        assert [d.ID for d in first.devices] == [d.id for d in env.health.devices]
        assert [d.topology.nodes[0].ID for d in first.devices] == [0, 0, 1, 1]
        assert all(d.health == "Healthy" for d in first.devices)
        assert env.endpoint(lambda e: e.streams == 1).healthy == 4
        opts = client.stub.GetDevicePluginOptions(pb.Empty())
        assert (opts.pre_start_required, opts.get_preferred_allocation_available) == (
            ep.pre_start_required, ep.get_preferred_allocation_available)
    finally:
        client.close()
    assert env.endpoint(lambda e: e.streams == 0)


def test_list_and_watch_resends_on_change_and_only_then(env: Env) -> None:
    env.endpoint()
    client = PluginClient(env.sock)
    try:
        client.watch()
        client.next_update()
        devs = list(env.health.devices)
        devs[1] = dataclasses.replace(devs[1], health=UNHEALTHY, reason="XID 79")
        env.health.publish(devs)
        second = client.next_update()
        assert [d.health for d in second.devices] == ["Healthy", "Unhealthy", "Healthy", "Healthy"]
        env.health.publish(devs)  # new seq, same content
        env.health.publish(devs, bump=False)  # a heartbeat
        # Heartbeats arrive every second; two and a half of them must not reach the kubelet.
        assert client.no_update_within(2.5)
        env.health.publish(devs[:3])
        assert len(client.next_update().devices) == 3
    finally:
        client.close()


def test_allocate_and_preferred_allocation(env: Env) -> None:
    env.endpoint()
    client = PluginClient(env.sock)
    ids = [d.id for d in env.health.devices]
    try:
        resp = client.stub.Allocate(pb.AllocateRequest(container_requests=[
            pb.ContainerAllocateRequest(devices_ids=ids[:2])]))
        assert dict(resp.container_responses[0].envs) == {"NVIDIA_VISIBLE_DEVICES": ",".join(ids[:2])}
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Allocate(pb.AllocateRequest(container_requests=[
                pb.ContainerAllocateRequest(devices_ids=[ids[0], "GPU-nope"])]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown device: GPU-nope" in err.value.details()
        pref = client.stub.GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[
            pb.ContainerPreferredAllocationRequest(available_deviceIDs=ids, must_include_deviceIDs=[ids[2]],
                                                   allocation_size=2)]))
        chosen = list(pref.container_responses[0].deviceIDs)
        assert len(chosen) == 2 and chosen[0] == ids[2] and set(chosen) <= set(ids)
        assert client.stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=ids[:1])) == \
            pb.PreStartContainerResponse()
    finally:
        client.close()


def test_deleted_socket_is_recreated_and_reannounced(env: Env) -> None:
    old = env.endpoint().socket_id
    env.sock.unlink()
    ep = env.endpoint(lambda e: e.socket_id not in ("", old))
    assert ep.socket_id == file_id(env.sock)
    client = PluginClient(env.sock)
    try:
        client.watch()
        assert len(client.next_update().devices) == 4
    finally:
        client.close()


def test_stale_health_keeps_the_last_state(env: Env) -> None:
    env.endpoint()
    env.health.close()
    with BusWatch(env.run / "plugin.sock", ("plugin.state",)) as w:
        w.wait(lambda m: isinstance(m, PluginState) and m.health_stale, timeout=10)
    env.health = FakeHealthMonitor(env.run, env.health.devices)  # for the fixture's teardown
    client = PluginClient(env.sock)
    try:
        client.watch()
        assert len(client.next_update().devices) == 4
    finally:
        client.close()


def test_sigterm_removes_the_socket_and_exits_zero(env: Env) -> None:
    env.endpoint()
    _, proc = env.procs.procs[-1]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not env.sock.exists()
    wait_until(lambda: not (env.run / "plugin.sock").exists(), 5, "the bus socket removed")


def test_sigterm_with_open_streams_ends_them_cleanly(env: Env) -> None:
    # A normal stop must not look like a failure in the log: the streams end, they are not
    # cancelled under gRPC (which logged an ERROR and a CancelledError traceback).
    env.endpoint()
    clients = [PluginClient(env.sock) for _ in range(2)]
    try:
        for c in clients:
            c.watch()
            c.next_update()
        env.endpoint(lambda e: e.streams == 2)
        _, proc = env.procs.procs[-1]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 0
        for c in clients:  # each stream ends with an OK status, as at the end of a stream
            wait_until(lambda c=c: c._stream is not None and c._stream.done(), 10, "the stream ended")
            assert c._stream.code() == grpc.StatusCode.OK
    finally:
        for c in clients:
            c.close()
    log = env.procs.log("ps")
    assert "ERROR" not in log and "Traceback" not in log, log


def test_nvml_lost_after_discovery_keeps_devices_listed_unhealthy(env: Env) -> None:
    env.endpoint()
    client = PluginClient(env.sock)
    try:
        client.watch()
        assert len(client.next_update().devices) == 4
        env.health.seq += 1
        env.health.send(HealthState(incarnation=env.health.incarnation, seq=env.health.seq, sent_at=0.0,
                                    nvml_ok=False, error="nvml init failed: Driver Not Loaded", driver_version="",
                                    devices=[]))
        update = client.next_update()
        assert [d.health for d in update.devices] == ["Unhealthy"] * 4, "listed, not forgotten"
        env.health.publish()  # NVML is back
        assert [d.health for d in client.next_update().devices] == ["Healthy"] * 4
    finally:
        client.close()
