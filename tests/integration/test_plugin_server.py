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
    procs.start("ps", "plugin-server", env={"GPU_PLUGIN_RUN_DIR": str(run), "KUBELET_SOCKET": str(dp / "kubelet.sock"),
                                            "GPU_PLUGIN_STALE_AFTER": "3s"})
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
    # Counted by method and code for the metrics, on the bus within a second (not a state per call).
    counted = {("Allocate", "OK", 1), ("Allocate", "INVALID_ARGUMENT", 1), ("GetPreferredAllocation", "OK", 1)}
    with BusWatch(env.run / "plugin.sock", ("plugin.state",)) as w:
        w.wait(lambda m: isinstance(m, PluginState)
               and {(c.method, c.code, c.count) for c in m.calls if c.resource == "nvidia.com/gpu"} == counted)


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


def _refusal(client: PluginClient, request: pb.PreferredAllocationRequest) -> str:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetPreferredAllocation(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    details: str = err.value.details()
    assert details.startswith('invalid preferred allocation request for "nvidia.com/gpu"'), details
    return details


def test_preferred_allocation_refuses_what_the_kubelet_never_sends(env: Env) -> None:
    # The kubelet asks with allocation_size >= 1, IDs it was given by ListAndWatch, must_include
    # inside available, no ID twice and a size that `available` can fill. Anything else was
    # answered: IDs we do not serve, more IDs than there are, an empty OK for size -1.
    env.endpoint()
    ids = [d.id for d in env.health.devices]
    client = PluginClient(env.sock)

    def ask(available: list[str], must: list[str], size: int) -> pb.PreferredAllocationRequest:
        return pb.PreferredAllocationRequest(container_requests=[pb.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size)])

    many = [f"GPU-nope-{i:03d}" for i in range(300)]
    cases: list[tuple[pb.PreferredAllocationRequest, str]] = [
        (ask(ids, [], -1), "allocation_size must be at least 1; got -1"),
        (ask(ids, [], 0), "allocation_size must be at least 1; got 0"),
        (ask(ids, [], -(2**31)), f"got {-(2**31)}"),
        (ask([*ids, "GPU-nope"], [], 2), "unknown device: GPU-nope"),
        (ask(ids, ["GPU-nope"], 2), "unknown device: GPU-nope"),
        (ask([ids[0], ids[1], ids[0]], [], 2), f"duplicate device: {ids[0]}"),
        (ask(ids, [ids[2], ids[2]], 2), f"duplicate device: {ids[2]}"),
        (ask(ids[:2], [ids[3]], 2), f"must_include_deviceIDs not in available_deviceIDs: {ids[3]}"),
        (ask(ids, ids[:3], 2), "must_include_deviceIDs holds 3 devices, more than allocation_size 2"),
        (ask(ids[:2], [], 3), "allocation_size 3 is more than the 2 available devices"),
        (ask(ids, [], 2**31 - 1), f"allocation_size {2**31 - 1} is more than the 4 available devices"),
        (pb.PreferredAllocationRequest(), "no container requests"),
        (ask([*ids, *many], [], 2), "unknown device: GPU-nope-000, GPU-nope-001"),
    ]
    try:
        for request, expected in cases:
            details = _refusal(client, request)
            assert expected in details, (expected, details)
            assert len(details) < 2000, "a few IDs, then a count"
        assert "(and 290 more)" in _refusal(client, ask([*ids, *many], [], 2))
        # A second container request that is bad fails the whole call, as Allocate does.
        bad_second = pb.PreferredAllocationRequest(container_requests=[
            pb.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=1),
            pb.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=9)])
        assert "allocation_size 9" in _refusal(client, bad_second)
        # What the kubelet does send is answered, up to a size equal to everything available.
        for size in range(1, 5):
            resp = client.stub.GetPreferredAllocation(ask(ids, [ids[3]], size), timeout=5)
            chosen = list(resp.container_responses[0].deviceIDs)
            assert len(chosen) == size and chosen[0] == ids[3] and set(chosen) <= set(ids)
        resp = client.stub.GetPreferredAllocation(ask(ids[:2], ids[:2], 2), timeout=5)
        assert list(resp.container_responses[0].deviceIDs) == ids[:2], "must_include filling the size"
    finally:
        client.close()


def test_preferred_allocation_passes_over_a_device_turned_unhealthy_meanwhile(env: Env) -> None:
    # The kubelet offers what it last saw Healthy; a device may have turned Unhealthy since. That
    # race must not fail the pod: it is answered, without the device while enough others remain.
    env.endpoint()
    ids = [d.id for d in env.health.devices]
    client = PluginClient(env.sock)
    try:
        client.watch()
        client.next_update()
        devs = list(env.health.devices)
        devs[0] = dataclasses.replace(devs[0], health=UNHEALTHY, reason="XID 79")
        env.health.publish(devs)
        assert client.next_update().devices[0].health == "Unhealthy"

        def preferred(must: list[str], size: int) -> list[str]:
            resp = client.stub.GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[
                pb.ContainerPreferredAllocationRequest(available_deviceIDs=ids, must_include_deviceIDs=must,
                                                       allocation_size=size)]), timeout=5)
            return list(resp.container_responses[0].deviceIDs)

        for size in (1, 2, 3):
            chosen = preferred([], size)
            assert len(chosen) == size and ids[0] not in chosen, chosen
        assert sorted(preferred([], 4)) == sorted(ids), "no healthy set that big: the kubelet's Allocate says why"
        assert preferred([ids[0]], 2)[0] == ids[0], "the kubelet's own choice is kept"
    finally:
        client.close()


def test_allocate_refuses_a_device_given_to_two_containers(env: Env) -> None:
    env.endpoint()
    ids = [d.id for d in env.health.devices]
    client = PluginClient(env.sock)

    def allocate(*containers: list[str]) -> pb.AllocateResponse:
        resp: pb.AllocateResponse = client.stub.Allocate(pb.AllocateRequest(container_requests=[
            pb.ContainerAllocateRequest(devices_ids=c) for c in containers]), timeout=5)
        return resp

    try:
        for containers in ([[ids[0]], [ids[0]]], [[ids[0], ids[1]], [ids[2]], [ids[1], ids[3]]]):
            with pytest.raises(grpc.RpcError) as err:
                allocate(*containers)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            shared = ids[0] if len(containers) == 2 else ids[1]
            assert err.value.details() == ('invalid allocation request for "nvidia.com/gpu": invalid request: '
                                           f"device requested by more than one container: {shared}")
        with pytest.raises(grpc.RpcError) as err:
            allocate([ids[0]], ["GPU-nope"])
        assert "unknown device: GPU-nope" in err.value.details(), "unknown IDs: refused as before"
        assert len(allocate([ids[0], ids[1]], [ids[2]]).container_responses) == 2
    finally:
        client.close()


def _stream_ends(log: str) -> list[str]:
    return [line.split(" ListAndWatch ", 1)[1] for line in log.splitlines() if " ListAndWatch stream" in line]


def test_every_stream_end_is_logged_with_its_cause(env: Env) -> None:
    old = env.endpoint().socket_id
    gone, replaced = PluginClient(env.sock), PluginClient(env.sock)
    try:
        for c in (gone, replaced):
            c.watch()
            c.next_update()
        gone.close()
        wait_until(lambda: any("ended (the client went away)" in e for e in _stream_ends(env.procs.log("ps"))), 10,
                   "the client's leaving in the log")
        env.sock.unlink()
        env.endpoint(lambda e: e.socket_id not in ("", old))
        wait_until(lambda: replaced._stream is not None and replaced._stream.done(), 10, "the old stream ended")
        assert replaced._stream.code() == grpc.StatusCode.OK
    finally:
        gone.close()
        replaced.close()
    stopping = PluginClient(env.sock)
    try:
        stopping.watch()
        stopping.next_update()
        _, proc = env.procs.procs[-1]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stopping.close()
    ends = _stream_ends(env.procs.log("ps"))
    assert len(ends) == 3, ends
    assert ends[0].startswith("stream on nvidia.com/gpu ended (the client went away) after "), ends
    assert ends[1].startswith("stream on nvidia.com/gpu ended (its socket was removed or replaced: "
                              "the endpoint is re-created) after "), ends
    assert ends[2].startswith("stream on nvidia.com/gpu ended (the plugin-server is stopping) after "), ends


def test_gpus_dra_claims_hold_are_offered_only_once_the_claims_are_gone(procs: Procs, short_tmp: Path) -> None:
    """The dra-plugin's record lists GPU 1 as prepared for a claim (the split changed under it): the plugin-server
    leaves it out of nvidia.com/gpu, and offers it again when the record no longer lists it. An admin's look
    holds nothing."""
    from common.dra_checkpoint import COMPLETED, Checkpoint, Entry, PreparedDevice

    run, dp, state_dir = short_tmp / "run", short_tmp / "dp", short_tmp / "state"
    devices = gpus(4)
    record = Checkpoint(state_dir)
    uid = "7e5a3c1d-0000-4000-8000-000000000001"
    record.put(Entry(uid, "default", "gpus", COMPLETED, (PreparedDevice(("gpus",), "node-1", "gpu-1", devices[1].id,
                                                                        (f"k8s.gpu.nvidia.com/claim={uid}-gpu-1",)),)))
    record.put(Entry("admin", "default", "look", COMPLETED, (PreparedDevice(
        ("gpus",), "node-1", "gpu-2", devices[2].id, ("k8s.gpu.nvidia.com/claim=admin-gpu-2",), admin_access=True),)))
    health = FakeHealthMonitor(run, devices)
    procs.start("ps", "plugin-server", env={"GPU_PLUGIN_RUN_DIR": str(run), "KUBELET_SOCKET": str(dp / "kubelet.sock"),
                                            "GPU_PLUGIN_STATE_DIR": str(state_dir)})
    wait_until(lambda: (dp / "nvidia-gpu.sock").exists(), 10, "the plugin socket")
    client = PluginClient(dp / "nvidia-gpu.sock")
    try:
        client.watch()
        first = client.next_update()
        assert sorted(d.ID for d in first.devices) == sorted(d.id for i, d in enumerate(devices) if i != 1)
        record.remove(uid)  # the claim was unprepared
        assert sorted(d.ID for d in client.next_update().devices) == sorted(d.id for d in devices)
    finally:
        client.close()
        health.close()
