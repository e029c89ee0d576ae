"""The dra-plugin's rules, without processes: DRA names, the claim references and API answers it accepts,
the devices it prepares or refuses, and its checkpoint (format, bounds, an unreadable one, a prepare left
half done by a restart)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from common import dra_checkpoint as cp
from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, Message, StateMessage
from common.dra_checkpoint import Checkpoint, CheckpointError, Entry, PreparedDevice
from common.settings import resolve
from services.dra_plugin.claims import Allocated, ClaimError, ClaimRef, Toleration, allocated, choose, claim_path
from services.dra_plugin.names import cdi_device_id, cdi_spec_file, device_names, offered
from tests.fakedriver import make_driver_root

REF = ClaimRef("default", "7e5a3c1d-0000-4000-8000-000000000001", "gpus")


def gpu(i: int, **kw: Any) -> DeviceState:
    fields: dict[str, Any] = {"health": HEALTHY, "reason": "", "minor": i, **kw}
    return DeviceState(id=f"GPU-{i:08x}-0000-4000-8000-000000000000", kind="gpu", index=str(i), name="NVIDIA H100",
                       since=0.0, **fields)


def mig(parent: DeviceState, gi: int, ci: int, **kw: Any) -> DeviceState:
    return DeviceState(id=f"MIG-{gi:08x}-{ci:04x}-4000-8000-000000000000", kind="mig", index=f"{parent.index}:{gi}",
                       name="NVIDIA H100 MIG 1g.10gb", health=HEALTHY, reason="", since=0.0, parent=parent.id,
                       gpu_instance_id=gi, compute_instance_id=ci, caps=[100 + gi, 200 + ci], **kw)


# -- names ------------------------------------------------------------------------------------------

def test_names_are_nvidias_and_a_gpu_in_mig_mode_is_offered_by_its_parts() -> None:
    g0, g1, g2 = gpu(0), gpu(1, minor=5, mig_enabled=True), gpu(2, minor=-1)
    devices = [g0, g1, mig(g1, 3, 0), mig(g1, 4, 1), g2, mig(g2, 1, 0)]
    # The minor names a GPU (not the index); a device without a minor (or without its GPU's) has no name.
    assert sorted(device_names(devices)) == ["gpu-0", "gpu-5", "gpu-5-mig-3-0", "gpu-5-mig-4-1"]
    assert sorted(offered(devices)) == ["gpu-0", "gpu-5-mig-3-0", "gpu-5-mig-4-1"]
    assert cdi_device_id("uid-1", "gpu-0") == "k8s.gpu.nvidia.com/claim=uid-1-gpu-0"
    assert cdi_spec_file("uid-1") == "k8s.gpu.nvidia.com-claim_uid-1.json"


# -- references and answers ---------------------------------------------------------------------------

@pytest.mark.parametrize(("ref", "why"), [
    (ClaimRef("", REF.uid, "gpus"), "namespace"),
    (ClaimRef("Default", REF.uid, "gpus"), "namespace"),
    (ClaimRef("default", REF.uid, ""), "name"),
    (ClaimRef("default", REF.uid, "../etc"), "name"),
    (ClaimRef("default", "", "gpus"), "UID"),
    (ClaimRef("default", "../../x", "gpus"), "UID"),
    (ClaimRef("default", "u" * 200, "gpus"), "UID"),
])
def test_a_reference_the_kubelet_never_sends_is_refused(ref: ClaimRef, why: str) -> None:
    with pytest.raises(ClaimError, match=why):
        ref.check()


def test_claim_paths() -> None:
    REF.check()
    assert claim_path("v1", REF) == "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/gpus"


def answer(results: list[dict[str, Any]] | None = None, **meta: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                           "metadata": {"namespace": "default", "name": "gpus", "uid": REF.uid, **meta}, "status": {}}
    if results is not None:
        obj["status"]["allocation"] = {"devices": {"results": results}}
    return obj


def result(device: str, driver: str = "gpu.nvidia.com", pool: str = "node-1", **kw: Any) -> dict[str, Any]:
    return {"request": "gpus", "driver": driver, "pool": pool, "device": device, **kw}


def test_the_results_of_our_driver_are_taken_others_left_to_their_driver() -> None:
    got = allocated(answer([result("gpu-0"), result("nic-0", driver="nic.example.com", pool="p"),
                            result("gpu-1", adminAccess=True), {**result("gpu-2"), "request": "gpus/h100"}]),
                    REF, "v1", "gpu.nvidia.com", "node-1")
    # A subrequest's device (firstAvailable) is answered for its request, which containers name.
    assert got == [Allocated("gpus", "node-1", "gpu-0"), Allocated("gpus", "node-1", "gpu-1", admin_access=True),
                   Allocated("gpus", "node-1", "gpu-2")]
    assert allocated(answer([]), REF, "v1", "gpu.nvidia.com", "node-1") == []


@pytest.mark.parametrize(("obj", "why"), [
    ([], "an array, not a ResourceClaim"),
    ({**answer([]), "kind": "Pod"}, "a 'Pod', not a ResourceClaim"),
    ({**answer([]), "apiVersion": "resource.k8s.io/v1beta1"}, "apiVersion"),
    (answer([], name="other"), "the API answered 'default'/'other'"),
    (answer([], uid="another-uid"), "got replaced: its UID is 'another-uid'"),
    (answer(None), "is not allocated"),
    ({**answer([]), "status": {"allocation": {"devices": {"results": {}}}}}, "results is an object, not a list"),
    (answer([result("gpu-0", pool="node-2")]), "pool 'node-2' is not on this node"),
    (answer([{**result("gpu-0"), "device": 7}]), r"results\[0\].device: a number"),
    (answer(["gpu-0"]), r"results\[0\]: a string, not an object"),
    (answer([result(f"gpu-{i}") for i in range(257)]), "257 allocation results"),
])
def test_an_answer_that_is_not_the_claim_asked_for_allocated_is_refused(obj: Any, why: str) -> None:
    with pytest.raises(ClaimError, match=why):
        allocated(obj, REF, "v1", "gpu.nvidia.com", "node-1")


# -- the devices ---------------------------------------------------------------------------------------

OFFER = offered([gpu(0), gpu(1), gpu(2, health=UNHEALTHY, reason="XID 79"), gpu(3, mig_enabled=True)])


def test_devices_are_chosen_by_name_with_their_requests() -> None:
    got = choose([Allocated("a", "node-1", "gpu-0"), Allocated("b", "node-1", "gpu-1")], OFFER, {}, REF)
    assert [(c.requests, c.name, c.device.id) for c in got] == [
        (("a",), "gpu-0", gpu(0).id), (("b",), "gpu-1", gpu(1).id)]
    # One device for two requests (admin access): one device, both requests.
    both = choose([Allocated("a", "node-1", "gpu-0", True), Allocated("b", "node-1", "gpu-0", True)], OFFER, {}, REF)
    assert [(c.requests, c.name) for c in both] == [(("a", "b"), "gpu-0")]


@pytest.mark.parametrize(("device", "in_use", "admin", "why"), [
    ("gpu-2", {}, False, "gpu-2 .* is Unhealthy: XID 79; request gpus does not tolerate its taint "
                         "gpu.nvidia.com/xid=79:NoSchedule"),
    ("gpu-3", {}, False, "gpu-3 is not one this node offers"),  # in MIG mode: its MIG devices are offered
    ("gpu-7", {}, False, "gpu-7 is not one this node offers through DRA .offered: gpu-0, gpu-1, gpu-2."),
    ("GPU-0", {}, False, "is not a device name"),
    ("gpu-1", {"gpu-1": "default/other (u2)"}, False, "gpu-1 is prepared for another claim, default/other"),
])
def test_a_device_that_cannot_be_handed_out_is_refused(device: str, in_use: dict[str, str], admin: bool,
                                                       why: str) -> None:
    with pytest.raises(ClaimError, match=why):
        choose([Allocated("gpus", "node-1", device, admin)], OFFER, in_use, REF)


def test_admin_access_may_share_a_prepared_device() -> None:
    got = choose([Allocated("gpus", "node-1", "gpu-1", True)], OFFER, {"gpu-1": "default/other (u2)"}, REF)
    assert [c.name for c in got] == ["gpu-1"]


CORDONED = offered([gpu(0, health=UNHEALTHY, reason="cordoned: fan noise", cordoned=True),
                    gpu(1, health=UNHEALTHY, reason="cordoned: fan; XID 79", cordoned=True)])


def test_tolerations_are_read_from_the_allocation_result() -> None:
    tolerations = [{"key": "gpu.nvidia.com/cordon", "operator": "Exists", "effect": "NoSchedule"},
                   {"key": "gpu.nvidia.com/xid", "value": "79"}]
    got = allocated(answer([result("gpu-0", tolerations=tolerations)]), REF, "v1", "gpu.nvidia.com", "node-1")
    assert got[0].tolerations == (Toleration("gpu.nvidia.com/cordon", "Exists", "", "NoSchedule"),
                                  Toleration("gpu.nvidia.com/xid", "Equal", "79", ""))
    with pytest.raises(ClaimError, match=r"tolerations\[0\].operator: 'Lt', not one of Equal, Exists"):
        allocated(answer([result("gpu-0", tolerations=[{"key": "k", "operator": "Lt"}])]), REF, "v1",
                  "gpu.nvidia.com", "node-1")


@pytest.mark.parametrize(("device", "tolerations", "why"), [
    ("gpu-0", (), "does not tolerate its taint gpu.nvidia.com/cordon:NoSchedule"),
    ("gpu-0", (Toleration("gpu.nvidia.com/cordon", "Exists", "", "NoExecute"),), "gpu.nvidia.com/cordon:NoSchedule"),
    ("gpu-0", (Toleration("gpu.nvidia.com/cordon", "Equal", "yes"),), "gpu.nvidia.com/cordon:NoSchedule"),
    # Two taints: tolerating one is not enough, and the one left is named.
    ("gpu-1", (Toleration("gpu.nvidia.com/cordon", "Exists"),), "its taint gpu.nvidia.com/xid=79:NoSchedule$"),
])
def test_a_tainted_device_is_refused_unless_its_taints_are_tolerated(device: str, tolerations: tuple[Toleration, ...],
                                                                     why: str) -> None:
    with pytest.raises(ClaimError, match=why):
        choose([Allocated("gpus", "node-1", device, tolerations=tolerations)], CORDONED, {}, REF)


@pytest.mark.parametrize(("device", "tolerations"), [
    ("gpu-0", (Toleration("gpu.nvidia.com/cordon", "Exists"),)),
    ("gpu-0", (Toleration("gpu.nvidia.com/cordon", "Equal", "", "NoSchedule"),)),
    ("gpu-0", (Toleration("", "Exists"),)),  # an empty key with Exists tolerates everything
    ("gpu-1", (Toleration("gpu.nvidia.com/cordon", "Exists"), Toleration("gpu.nvidia.com/xid", "Equal", "79"))),
])
def test_a_tainted_device_whose_taints_are_tolerated_is_prepared(device: str,
                                                                 tolerations: tuple[Toleration, ...]) -> None:
    got = choose([Allocated("gpus", "node-1", device, tolerations=tolerations)], CORDONED, {}, REF)
    assert [c.name for c in got] == [device]


def test_admin_access_prepares_an_unhealthy_device_without_tolerations() -> None:
    got = choose([Allocated("gpus", "node-1", "gpu-2", True)], OFFER, {}, REF)
    assert [c.name for c in got] == ["gpu-2"]


# -- the checkpoint --------------------------------------------------------------------------------------

DEV = PreparedDevice(("gpus",), "node-1", "gpu-0", gpu(0).id, (cdi_device_id(REF.uid, "gpu-0"),))


def test_checkpoint_round_trip_and_in_use(tmp_path: Path) -> None:
    store = Checkpoint(tmp_path)
    store.load()  # none yet: empty
    entry = Entry(REF.uid, "default", "gpus", cp.COMPLETED, (DEV,), 1700000000.0)
    store.put(entry)
    assert (tmp_path / cp.FILE).stat().st_mode & 0o777 == 0o600
    again = Checkpoint(tmp_path)
    again.load()
    assert again.entries == {REF.uid: entry}
    assert again.in_use() == {"gpu-0": str(entry)} and again.in_use(except_uid=REF.uid) == {}
    assert again.remove(REF.uid) and not again.remove(REF.uid)
    assert json.loads((tmp_path / cp.FILE).read_text()) == {"version": 2, "claims": {}}


def test_admin_access_is_recorded_and_holds_no_device(tmp_path: Path) -> None:
    store = Checkpoint(tmp_path)
    admin = Entry(REF.uid, "default", "look", cp.COMPLETED, (dataclasses.replace(DEV, admin_access=True),), 1.0)
    store.put(admin)
    again = Checkpoint(tmp_path)
    again.load()
    assert again.entries == {REF.uid: admin}
    assert again.in_use() == {}  # a normal claim may have the GPU an admin looks at
    got = choose([Allocated("gpus", "node-1", "gpu-0")], OFFER, again.in_use(), REF)
    assert [(c.name, c.admin_access) for c in got] == [("gpu-0", False)]


def test_a_version_1_record_is_read_its_devices_not_admin_access(tmp_path: Path) -> None:
    doc = {"version": 1, "claims": {REF.uid: {
        "namespace": "default", "name": "gpus", "phase": cp.COMPLETED, "since": 1.0,
        "devices": [{"requests": ["gpus"], "pool": "node-1", "device": "gpu-0", "uuid": gpu(0).id,
                     "cdiDeviceIDs": list(DEV.cdi_ids)}]}}}
    (tmp_path / cp.FILE).write_text(json.dumps(doc))
    store = Checkpoint(tmp_path)
    store.load()
    assert store.entries == {REF.uid: Entry(REF.uid, "default", "gpus", cp.COMPLETED, (DEV,), 1.0)}
    assert store.in_use() == {"gpu-0": f"default/gpus ({REF.uid})"}


def test_a_record_past_the_bound_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Checkpoint(tmp_path)
    store.put(Entry(REF.uid, "default", "gpus", cp.COMPLETED, (DEV,), 1.0))
    before = (tmp_path / cp.FILE).read_bytes()
    monkeypatch.setattr(cp, "MAX_BYTES", len(before) + 100)
    big = Entry("u2", "default", "x" * 200, cp.STARTED)
    with pytest.raises(CheckpointError, match=r"would be \d+ bytes, more than the \d+ this plugin reads; not written"):
        store.put(big)
    # Nothing lost: the file and the record in memory are what they were.
    assert (tmp_path / cp.FILE).read_bytes() == before and list(store.entries) == [REF.uid]


@pytest.mark.parametrize(("doc", "why"), [
    (b"{", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"version": 3, "claims": {}}', "version 3, this plugin reads versions 1, 2"),
    (b'{"version": true, "claims": {}}', "version True, this plugin reads versions 1, 2"),
    (b'{"version": 1, "claims": []}', "claims: not an object"),
    (b'{"version": 1, "claims": {"u": {"phase": "Prepared"}}}', "phase: 'Prepared', not one of PrepareStarted"),
    (b'{"version": 1, "claims": {"u": {"phase": "PrepareStarted", "since": "x"}}}', "since: not a number"),
    (b'{"version": 1, "claims": {"u": {"phase": "PrepareStarted", "since": 1, "devices": [{"requests": [1]}]}}}',
     r"devices\[0\].requests: not a list of strings"),
])
def test_an_unreadable_checkpoint_is_moved_aside_and_the_record_starts_empty(tmp_path: Path, doc: bytes,
                                                                              why: str) -> None:
    (tmp_path / cp.FILE).write_bytes(doc)
    store = Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=why):
        store.load()
    assert store.entries == {} and not (tmp_path / cp.FILE).exists()
    assert (tmp_path / f"{cp.FILE}.bad").read_bytes() == doc


def test_the_checkpoint_is_bounded(tmp_path: Path) -> None:
    store = Checkpoint(tmp_path)
    store.entries = {f"u{i}": Entry(f"u{i}", "default", f"c{i}", cp.COMPLETED) for i in range(cp.MAX_CLAIMS)}
    with pytest.raises(CheckpointError, match="1024 claims prepared on this node already"):
        store.put(Entry("one-more", "default", "x", cp.STARTED))
    store.put(dataclasses.replace(store.entries["u1"], name="renamed"))  # a claim it holds may change
    (tmp_path / cp.FILE).write_bytes(b" " * (cp.MAX_BYTES + 1))
    with pytest.raises(CheckpointError, match="larger than"):
        Checkpoint(tmp_path).load()


# -- a prepare left half done --------------------------------------------------------------------------------

class Board:
    """Stands in for the bus publisher: the plugin's states and events, kept."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def publish_state(self, state: StateMessage) -> StateMessage:
        self.sent.append(state)
        return state

    def publish(self, msg: Message) -> None:
        self.sent.append(msg)


def test_a_prepare_cut_by_a_restart_is_done_again_or_undone(tmp_path: Path) -> None:
    from common.bus.messages import HealthState
    from services.dra_plugin.kubelet_devices import KubeletAllocations
    from services.dra_plugin.plugin import DraPlugin

    driver = make_driver_root(tmp_path / "driver", range(2))
    settings = resolve(environ={"GPU_PLUGIN_STATE_DIR": str(tmp_path / "state"), "CDI_SPEC_DIR": str(tmp_path / "cdi"),
                                "NVIDIA_DRIVER_ROOT": str(driver), "DRIVER_ROOT_CTR_PATH": str(tmp_path / "none"),
                                "GPU_PLUGIN_RUN_DIR": str(tmp_path / "run")})
    # What a plugin killed between the two writes left: a started entry, no spec.
    Checkpoint(settings.state_dir).put(Entry(REF.uid, "default", "gpus", cp.STARTED, (DEV,)))
    other = ClaimRef("default", "7e5a3c1d-0000-4000-8000-000000000002", "other")

    async def run() -> None:
        plugin = DraPlugin(settings, "node-1", Board(), tmp_path / "health.sock",  # type: ignore[arg-type]
                           KubeletAllocations(settings.device_plugin_dir))
        plugin.checkpoint.load()
        plugin.health = HealthState(nvml_ok=True, error="", driver_version="580.159.04", devices=[gpu(0), gpu(1)])
        plugin.offered = offered(plugin.health.devices)
        plugin.gpus = {d.id: d for d in plugin.health.devices}
        # Its device stays its own: another claim cannot have it meanwhile.
        assert "prepared for another claim, default/gpus" in plugin._prepare_one(
            other, [Allocated("gpus", "node-1", "gpu-0")]).error
        # The kubelet asks again: prepared whole, completed.
        got = plugin._prepare_one(REF, [Allocated("gpus", "node-1", "gpu-0")])
        assert got.error == "" and [d.name for d in got.devices] == ["gpu-0"]
        assert plugin.checkpoint.entries[REF.uid].phase == cp.COMPLETED
        assert plugin.specs.exists(REF.uid)
        # Or the kubelet unprepares it: the spec and the record go.
        assert await plugin.unprepare([REF]) == {REF.uid: ""}
        assert not plugin.specs.exists(REF.uid) and plugin.checkpoint.entries == {}

    asyncio.run(run())


def test_a_repeated_prepare_before_the_first_health_state_says_there_is_no_device_state(tmp_path: Path) -> None:
    from services.dra_plugin.kubelet_devices import KubeletAllocations
    from services.dra_plugin.plugin import DraPlugin

    settings = resolve(environ={"GPU_PLUGIN_STATE_DIR": str(tmp_path / "state"), "CDI_SPEC_DIR": str(tmp_path / "cdi"),
                                "GPU_PLUGIN_RUN_DIR": str(tmp_path / "run")})
    # Prepared before a reboot that emptied the CDI directory; the program has heard no health state yet.
    Checkpoint(settings.state_dir).put(Entry(REF.uid, "default", "gpus", cp.COMPLETED, (DEV,)))
    plugin = DraPlugin(settings, "node-1", Board(), tmp_path / "health.sock",  # type: ignore[arg-type]
                       KubeletAllocations(settings.device_plugin_dir))
    plugin.checkpoint.load()
    error = plugin._again(REF, plugin.checkpoint.entries[REF.uid]).error
    assert error.endswith("its CDI spec is gone and cannot be written again yet: no device state from the "
                          "health-monitor yet"), error
    assert plugin.checkpoint.entries[REF.uid].phase == cp.COMPLETED  # kept for the kubelet's next try
