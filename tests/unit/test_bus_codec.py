"""The bus codec: every message type round-trips, and every malformed payload is a BusDecodeError."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bus import codec
from common.bus.codec import MAX_PAYLOAD, BusDecodeError, decode, encode
from common.bus.messages import (
    BY_TOPIC,
    DEVICE_ID_PATTERN,
    HEALTHY,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    UNHEALTHY,
    DeviceState,
    DraEvent,
    DraSlices,
    DraState,
    EndpointState,
    FabricState,
    HealthEvent,
    HealthState,
    KubeState,
    Message,
    MigAttributesState,
    MpsDaemon,
    MpsState,
    PairLink,
    PluginEvent,
    PluginState,
    PreparedClaim,
    RegistrarEvent,
    RegistrarState,
    Registration,
    VgpuState,
)

GPU0 = DeviceState(
    id="GPU-8a3a5e0e-1c2b-4e3f-9a7d-1234567890ab",
    kind="gpu",
    index="0",
    name="NVIDIA H200",
    health=HEALTHY,
    reason="",
    since=1700000000.25,
    minor=0,
    pci_bus_id="00000000:19:00.0",
    numa_node=0,
    memory_mb=143771,
)
GPU1_NO_NUMA = DeviceState(
    id="GPU-11111111-2222-3333-4444-555555555555",
    kind="gpu",
    index="1",
    name="NVIDIA H100 80GB HBM3",
    health=UNHEALTHY,
    reason="XID 79: GPU has fallen off the bus",
    since=1700000100.0,
    minor=1,
    pci_bus_id="00000000:3B:00.0",
    numa_node=None,
    memory_mb=81559,
)
MIG = DeviceState(
    id="MIG-0f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718",
    kind="mig",
    index="0:1",
    name="NVIDIA H200 MIG 1g.18gb",
    health=HEALTHY,
    reason="",
    since=1700000000.5,
    numa_node=1,
    memory_mb=16384,
    parent=GPU0.id,
    gpu_instance_id=9,
    compute_instance_id=0,
    profile="1g.18gb",
)
ENDPOINT = EndpointState(
    resource="nvidia.com/gpu",
    endpoint="nvidia-gpu.sock",
    socket_id="1234567:1700000000.123",
    pre_start_required=False,
    get_preferred_allocation_available=True,
    streams=1,
    healthy=7,
    total=8,
    stream_opened=[81234.567891],
)
REGISTRATION = Registration(
    resource="nvidia.com/gpu",
    endpoint="nvidia-gpu.sock",
    socket_id="1234567:1700000000.123",
    kubelet_id="7654321:1699999999.5",
    time=1700000001.0,
    adopted=False,
)

SAMPLES: list[tuple[str, Message]] = [
    (
        "health-state-full",
        HealthState(
            incarnation="3f9c2a",
            seq=42,
            sent_at=1700000200.75,
            nvml_ok=True,
            error="",
            driver_version="580.159.04",
            devices=[GPU0, GPU1_NO_NUMA, MIG],
            links=[PairLink(a=GPU0.id, b=GPU1_NO_NUMA.id, nvlinks=18, level=20)],
        ),
    ),
    (
        "health-state-nvml-down",
        HealthState(
            incarnation="aa",
            seq=0,
            sent_at=0.0,
            nvml_ok=False,
            error="nvml init failed: Driver Not Loaded",
            driver_version="",
        ),
    ),
    ("health-event-xid", HealthEvent(time=1700000300.0, device=GPU1_NO_NUMA.id, event="xid", xid=79)),
    (
        "health-event-transition",
        HealthEvent(
            time=1700000301.5,
            device=GPU0.id,
            event="transition",
            old=HEALTHY,
            new=UNHEALTHY,
            reason="double-bit ECC",
        ),
    ),
    (
        "plugin-state",
        PluginState(
            incarnation="b7",
            seq=3,
            sent_at=1700000400.0,
            health_incarnation="3f9c2a",
            health_stale=True,
            endpoints=[ENDPOINT, dataclasses.replace(ENDPOINT, resource="nvidia.com/mig-1g.18gb", streams=0)],
        ),
    ),
    (
        "plugin-state-empty",
        PluginState(
            incarnation="b7", seq=1, sent_at=1.0, health_incarnation="", health_stale=False
        ),
    ),
    (
        "plugin-event",
        PluginEvent(
            time=1700000500.0,
            event="allocate",
            resource="nvidia.com/gpu",
            detail="ok",
            devices=[GPU0.id, GPU1_NO_NUMA.id],
        ),
    ),
    (
        "registrar-state",
        RegistrarState(
            incarnation="c1",
            seq=9,
            sent_at=1700000600.0,
            kubelet="present",
            kubelet_id="7654321:1699999999.5",
            registrations=[REGISTRATION, dataclasses.replace(REGISTRATION, adopted=True)],
            pending=["nvidia.com/mig-1g.18gb"],
            last_error="rpc error: connection refused",
        ),
    ),
    (
        "registrar-event",
        RegistrarEvent(time=1700000700.0, event="registered", resource="nvidia.com/gpu", detail="nvidia-gpu.sock"),
    ),
    (
        "mps-state",
        MpsState(incarnation="m1", seq=3, sent_at=1700000800.0, root="/mps", daemons=[
            MpsDaemon(resource="nvidia.com/gpu", devices=["GPU-aaaaaaaa-0000-4000-8000-000000000000"],
                      pipe_dir="/mps/nvidia.com/gpu/pipe", up=True, ready=True, pid=42, active_thread_percentage=25,
                      pinned_mem_limits=["0=20389M"], since=1700000790.0, restarts=1),
            MpsDaemon(resource="nvidia.com/gpu-mps", devices=[], pipe_dir="/mps/nvidia.com/gpu-mps/pipe", up=False,
                      ready=False, last_error="nvidia-cuda-mps-control -d: exit status 1"),
        ]),
    ),
    (
        "kube-state",
        KubeState(incarnation="k1", seq=3, sent_at=1700000800.0, api_reachable=True, node="node-1",
                  label="ts-8", config="ts-8", why="node label nvidia.com/device-plugin.config=ts-8",
                  digest="0123456789ab"),
    ),
    (
        "dra-state",
        DraState(incarnation="d1", seq=4, sent_at=1700000900.0, driver="gpu.nvidia.com", node="node-1",
                 services=["v1.DRAPlugin", "v1beta1.DRAPlugin"], registered=True, registered_at=1700000850.0,
                 info_calls=1, devices=8, unhealthy=1, prepares=2, health_streams=1,
                 claims=[PreparedClaim(uid="c-1", namespace="default", name="gpus", phase="PrepareCompleted",
                                       devices=["gpu-0", "gpu-1"], since=1700000880.0)],
                 slices=DraSlices(api_version="v1", taints="kept", published=True, generation=3, slices=1, devices=8,
                                  tainted=1, left_out=[], writes=4)),
    ),
    (
        "dra-event",
        DraEvent(time=1700000901.0, event="prepare", claim="default/gpus (c-1)", detail="prepared",
                 devices=["gpu-0", "gpu-1"]),
    ),
]


def _body(msg: Message) -> dict[str, Any]:
    _topic, payload = encode(msg)
    body = msgpack.unpackb(payload, raw=False)
    assert isinstance(body, dict)
    return body


def _pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


HEALTH_STATE = SAMPLES[0][1]
HEALTH_EVENT = SAMPLES[2][1]


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for _, m in SAMPLES} == set(MESSAGE_TYPES)
    assert set(BY_TOPIC) == {t.TOPIC for t in MESSAGE_TYPES}


@pytest.mark.parametrize("msg", [m for _, m in SAMPLES], ids=[i for i, _ in SAMPLES])
def test_round_trip(msg: Message) -> None:
    topic, payload = encode(msg)
    assert topic == type(msg).TOPIC.encode("ascii")
    assert msgpack.unpackb(payload, raw=False)["v"] == SCHEMA_VERSION
    back = decode(topic, payload)
    assert type(back) is type(msg)
    assert back == msg


def test_round_trip_keeps_numa_none_and_int_apart() -> None:
    back = decode(*encode(HEALTH_STATE))
    assert isinstance(back, HealthState)
    assert [d.numa_node for d in back.devices] == [0, None, 1]
    assert all(isinstance(d, DeviceState) for d in back.devices)


def test_extra_unknown_keys_are_ignored() -> None:
    body = _body(HEALTH_STATE)
    body["future_field"] = {"anything": [1, 2, 3]}
    body["devices"][0]["new_metric"] = 3.5
    assert decode(b"health.state", _pack(body)) == HEALTH_STATE


def test_ints_accepted_for_float_fields() -> None:
    body = _body(HEALTH_STATE)
    body["sent_at"] = 1700000200
    body["devices"][0]["since"] = 5
    msg = decode(b"health.state", _pack(body))
    assert isinstance(msg, HealthState)
    assert msg.sent_at == 1700000200.0 and isinstance(msg.sent_at, float)
    assert msg.devices[0].since == 5.0 and isinstance(msg.devices[0].since, float)


def test_optional_fields_take_their_defaults_when_absent() -> None:
    body = {"v": SCHEMA_VERSION, "time": 1.0, "device": "GPU-x", "event": "nvml"}
    assert decode(b"health.event", _pack(body)) == HealthEvent(time=1.0, device="GPU-x", event="nvml")


def test_endpoint_state_from_a_publisher_without_stream_opened_still_decodes() -> None:
    old = PluginState(incarnation="i", seq=1, sent_at=1.0, health_incarnation="h", health_stale=False,
                      endpoints=[ENDPOINT])
    body = _body(old)
    del body["endpoints"][0]["stream_opened"]
    msg = decode(b"plugin.state", _pack(body))
    assert isinstance(msg, PluginState)
    assert msg.endpoints[0] == dataclasses.replace(ENDPOINT, stream_opened=[])


def test_a_health_state_from_a_monitor_without_the_version_field_decodes() -> None:
    new = HealthState(incarnation="i", seq=1, sent_at=0.0, nvml_ok=True, error="", driver_version="580",
                      plugin_version="0.1.0")
    body = _body(new)
    assert body["plugin_version"] == "0.1.0"
    del body["plugin_version"]  # what a monitor from before this field sends
    assert decode(b"health.state", _pack(body)) == dataclasses.replace(new, plugin_version="")


def _mutated(msg: Message, path: tuple[Any, ...], value: Any = None, delete: bool = False) -> bytes:
    body = _body(msg)
    node: Any = body
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return _pack(body)


BAD: list[tuple[str, bytes, bytes]] = [
    ("unknown-topic", b"health.stat", encode(HEALTH_STATE)[1]),
    ("empty-topic", b"", encode(HEALTH_STATE)[1]),
    ("non-ascii-topic", "health.état".encode(), encode(HEALTH_STATE)[1]),
    ("non-utf8-topic", b"\xff\xfe", encode(HEALTH_STATE)[1]),
    ("empty-payload", b"health.state", b""),
    ("not-msgpack-truncated", b"health.state", encode(HEALTH_STATE)[1][:-3]),
    ("not-msgpack-reserved-byte", b"health.state", b"\xc1"),
    ("not-msgpack-trailing-data", b"health.state", encode(HEALTH_STATE)[1] + b"\x01"),
    ("msgpack-list", b"health.state", _pack([1, 2, 3])),
    ("msgpack-str", b"health.state", _pack("health")),
    ("msgpack-nil", b"health.state", _pack(None)),
    ("msgpack-int-keys", b"health.state", _pack({1: 2})),
    ("missing-v", b"health.state", _mutated(HEALTH_STATE, ("v",), delete=True)),
    ("v-2", b"health.state", _mutated(HEALTH_STATE, ("v",), 2)),
    ("v-0", b"health.state", _mutated(HEALTH_STATE, ("v",), 0)),
    ("v-str", b"health.state", _mutated(HEALTH_STATE, ("v",), "1")),
    ("v-true", b"health.state", _mutated(HEALTH_STATE, ("v",), True)),
    ("v-float", b"health.state", _mutated(HEALTH_STATE, ("v",), 1.0)),
    ("missing-seq", b"health.state", _mutated(HEALTH_STATE, ("seq",), delete=True)),
    ("missing-incarnation", b"health.state", _mutated(HEALTH_STATE, ("incarnation",), delete=True)),
    ("missing-nested-id", b"health.state", _mutated(HEALTH_STATE, ("devices", 1, "id"), delete=True)),
    ("missing-nested-health", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "health"), delete=True)),
    ("str-for-int", b"health.state", _mutated(HEALTH_STATE, ("seq",), "42")),
    ("bool-for-int", b"health.state", _mutated(HEALTH_STATE, ("seq",), True)),
    ("float-for-int", b"health.state", _mutated(HEALTH_STATE, ("seq",), 42.0)),
    ("bool-for-float", b"health.state", _mutated(HEALTH_STATE, ("sent_at",), False)),
    ("str-for-float", b"health.state", _mutated(HEALTH_STATE, ("sent_at",), "1.5")),
    ("int-for-str", b"health.state", _mutated(HEALTH_STATE, ("incarnation",), 7)),
    ("bytes-for-str", b"health.state", _mutated(HEALTH_STATE, ("error",), b"oops")),
    ("int-for-bool", b"health.state", _mutated(HEALTH_STATE, ("nvml_ok",), 1)),
    ("none-for-required-str", b"health.state", _mutated(HEALTH_STATE, ("driver_version",), None)),
    ("map-for-list", b"health.state", _mutated(HEALTH_STATE, ("devices",), {"0": {}})),
    ("list-for-map", b"health.state", _mutated(HEALTH_STATE, ("devices", 0), ["GPU-x", "gpu"])),
    ("str-for-nested-map", b"health.state", _mutated(HEALTH_STATE, ("devices", 0), "GPU-x")),
    ("nested-str-for-int", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "minor"), "0")),
    ("nested-str-for-optional-int", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "numa_node"), "0")),
    ("nested-bool-for-optional-int", b"health.state", _mutated(HEALTH_STATE, ("devices", 2, "numa_node"), True)),
    ("nested-int-for-str", b"health.state", _mutated(HEALTH_STATE, ("devices", 2, "parent"), 0)),
    ("nested-endpoint-str-for-bool", b"plugin.state",
     _mutated(SAMPLES[4][1], ("endpoints", 0, "pre_start_required"), "false")),
    ("nested-registration-missing-adopted", b"registrar.state",
     _mutated(SAMPLES[7][1], ("registrations", 1, "adopted"), delete=True)),
    ("list-of-int-for-list-of-str", b"plugin.event", _mutated(SAMPLES[6][1], ("devices",), [1, 2])),
    ("str-for-list-of-str", b"registrar.state", _mutated(SAMPLES[7][1], ("pending",), "nvidia.com/gpu")),
    ("payload-of-other-topic", b"health.state", encode(HEALTH_EVENT)[1]),
    # The vocabulary is checked by value: only these strings may reach ListAndWatch and the tools.
    ("health-not-in-vocabulary", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "health"), "Degraded")),
    ("health-wrong-case", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "health"), "healthy")),
    ("kind-not-in-vocabulary", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "kind"), "tpu")),
    ("kind-int", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "kind"), 1)),
    ("event-kind-unknown", b"health.event", _mutated(HEALTH_EVENT, ("event",), "reboot")),
    ("transition-to-unknown", b"health.event", _mutated(HEALTH_EVENT, ("new",), "Broken")),
    ("plugin-event-kind-unknown", b"plugin.event", _mutated(SAMPLES[6][1], ("event",), "free")),
    ("kubelet-presence-unknown", b"registrar.state", _mutated(SAMPLES[7][1], ("kubelet",), "gone")),
]


# Device IDs reach the kubelet, NVIDIA_VISIBLE_DEVICES (comma-separated), volume-mount paths
# and CDI names: anything but the ID forms a GPU node produces is refused at the bus.
BAD_IDS: list[tuple[str, str]] = [
    ("empty", ""),
    ("comma", f"{GPU0.id},{GPU1_NO_NUMA.id}"),
    ("newline", GPU0.id + "\n"),
    ("nul", "GPU-\x00"),
    ("escape", "GPU-\x1b[31m"),
    ("space", "GPU 0"),
    ("slash-traversal", "../../etc/passwd"),
    ("non-ascii", "GPU-ä"),
    ("leading-dash", "-0"),
    ("trailing-colon", "GPU-0:"),
    ("129-chars", "G" * 129),
    ("100000-chars", "G" * 100_000),
]
for _name, _bad in BAD_IDS:
    BAD += [
        (f"device-id-{_name}", b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "id"), _bad)),
        (f"device-index-{_name}", b"health.state", _mutated(HEALTH_STATE, ("devices", 2, "index"), _bad)),
        (f"link-id-{_name}", b"health.state", _mutated(HEALTH_STATE, ("links", 0, "b"), _bad)),
    ]
    if _bad:  # "" is a GPU's parent
        BAD.append((f"device-parent-{_name}", b"health.state", _mutated(HEALTH_STATE, ("devices", 2, "parent"), _bad)))


@pytest.mark.parametrize(
    "device_id",
    ["0", "7", "3:1", "GPU-8a3a5e0e-1c2b-4e3f-9a7d-1234567890ab", "MIG-0f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718",
     "GPU-8a3a5e0e-1c2b-4e3f-9a7d-1234567890ab::15", "GPU-" + "a" * 124],
)
def test_every_real_device_id_form_is_accepted(device_id: str) -> None:
    msg = decode(b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "id"), device_id))
    assert isinstance(msg, HealthState) and msg.devices[0].id == device_id


def test_a_bad_device_id_is_named_in_the_error() -> None:
    with pytest.raises(BusDecodeError, match=r"^health\.state\.devices\[0\]\.id: not a device ID: 'GPU-a,GPU-b'"):
        decode(b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "id"), "GPU-a,GPU-b"))
    with pytest.raises(BusDecodeError, match=r"'GGGG.*\.\.\.' \(100000 characters\)"):
        decode(b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "id"), "G" * 100_000))


@pytest.mark.parametrize(("topic", "payload"), [(t, p) for _, t, p in BAD], ids=[i for i, _, _ in BAD])
def test_decode_rejects(topic: bytes, payload: bytes) -> None:
    with pytest.raises(BusDecodeError):
        decode(topic, payload)


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("seq",), "x", "health.state.seq"),
        (("devices", 1, "minor"), "x", "health.state.devices[1].minor"),
        (("devices", 1, "health"), "Sick", "health.state.devices[1].health"),
    ],
    ids=["top-level", "nested", "vocabulary"],
)
def test_decode_error_names_the_field(path: tuple[Any, ...], value: Any, where: str) -> None:
    with pytest.raises(BusDecodeError, match="^" + re.escape(where) + ":"):
        decode(b"health.state", _mutated(HEALTH_STATE, path, value))


def test_oversized_payload_rejected_without_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    def unpackb(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an oversized payload must be refused before unpacking")

    monkeypatch.setattr(codec.msgpack, "unpackb", unpackb)
    with pytest.raises(BusDecodeError, match="exceeds"):
        decode(b"health.state", b"\x00" * (MAX_PAYLOAD + 1))


def test_payload_of_exactly_max_size_is_unpacked() -> None:
    # A valid message padded with an ignored key to exactly MAX_PAYLOAD bytes is accepted.
    body = _body(HEALTH_EVENT)
    body["pad"] = ""
    overhead = len(_pack(body))
    body["pad"] = "x" * (MAX_PAYLOAD - overhead - 4)  # str32 header is 4 bytes longer than fixstr
    payload = _pack(body)
    assert len(payload) == MAX_PAYLOAD
    assert decode(b"health.event", payload) == HEALTH_EVENT


@settings(max_examples=300, deadline=None)
@given(topic=st.one_of(st.sampled_from(sorted(t.encode() for t in BY_TOPIC)), st.binary(max_size=40)),
       payload=st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_bus_decode_error(topic: bytes, payload: bytes) -> None:
    try:
        msg = decode(topic, payload)
    except BusDecodeError:
        return
    assert isinstance(msg, Message)


_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(topic=st.sampled_from(sorted(BY_TOPIC)), extra=st.dictionaries(st.text(max_size=12), _json_like, max_size=8))
def test_arbitrary_msgpack_maps_only_raise_bus_decode_error(topic: str, extra: dict[str, Any]) -> None:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, **extra}
    try:
        msg = decode(topic.encode(), _pack(body))
    except BusDecodeError:
        return
    assert isinstance(msg, BY_TOPIC[topic])


_ids = st.text(min_size=1, max_size=40)
_device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)
_times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
_i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)

_device_states = st.builds(
    DeviceState,
    id=_device_ids,
    kind=st.sampled_from(["gpu", "mig"]),
    index=_device_ids,
    name=st.text(max_size=40),
    health=st.sampled_from([HEALTHY, UNHEALTHY]),
    reason=st.text(max_size=60),
    since=_times,
    minor=_i64,
    pci_bus_id=st.text(max_size=16),
    numa_node=st.none() | st.integers(min_value=-1, max_value=64),
    memory_mb=st.integers(min_value=0, max_value=2**40),
    parent=st.just("") | _device_ids,
    gpu_instance_id=_i64,
    compute_instance_id=_i64,
    profile=st.text(max_size=12),
)
_health_states = st.builds(
    HealthState,
    incarnation=_ids,
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    sent_at=_times,
    nvml_ok=st.booleans(),
    error=st.text(max_size=80),
    driver_version=st.text(max_size=16),
    devices=st.lists(_device_states, max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(msg=_health_states)
def test_health_state_round_trip_property(msg: HealthState) -> None:
    assert decode(*encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(device_id=st.text(max_size=200))
def test_arbitrary_text_as_a_device_id_decodes_only_if_it_has_the_id_form(device_id: str) -> None:
    try:
        msg = decode(b"health.state", _mutated(HEALTH_STATE, ("devices", 0, "id"), device_id))
    except BusDecodeError:
        assert not re.fullmatch(DEVICE_ID_PATTERN, device_id)
        return
    assert isinstance(msg, HealthState) and re.fullmatch(DEVICE_ID_PATTERN, msg.devices[0].id)
    assert 1 <= len(device_id) <= 128 and "," not in device_id and device_id.isascii() and device_id.isprintable()


def test_resent_at_matches_only_the_same_bytes_with_a_new_time() -> None:
    from common.bus.codec import resent_at

    st = HealthState(incarnation="abc", seq=9, sent_at=12.5, nvml_ok=True, error="", driver_version="580")
    _, held = encode(st)
    _, beat = encode(dataclasses.replace(st, sent_at=99.25))
    assert resent_at(held, beat) == 99.25
    assert resent_at(held, held) == 12.5
    for other in (dataclasses.replace(st, seq=10), dataclasses.replace(st, driver_version="590"),
                  dataclasses.replace(st, error="x", sent_at=99.25)):
        assert resent_at(held, encode(other)[1]) is None, other
    assert resent_at(held, beat[:-1] + b"\x00") is None  # a changed tail
    assert resent_at(held, beat[:-1]) is None  # a cut one
    assert resent_at(msgpack.packb({"sent_at": 1}), msgpack.packb({"sent_at": 1})) is None  # no float64 time


# What gpu-feature-discovery asks beyond discovery, on the bus for feature-labels (optional fields).
GPU_WITH_FACTS = dataclasses.replace(
    GPU0, compute_major=9, compute_minor=0, mig_capable=True, pci_class=0x030200,
    fabric=FabricState(cluster_uuid="6e0a7c9c-1d0b-4b1e-8f6e-0d9c5b2a4e11", clique_id=32766, state=3, status=0),
    vgpu=VgpuState(host_driver_version="595.71.03", host_driver_branch="r596_25"),
)
MIG_WITH_FACTS = dataclasses.replace(MIG, mig_attributes=MigAttributesState(
    multiprocessors=16, copy_engines=1, decoders=1, encoders=0, jpegs=1, ofas=0, gpu_instance_slices=1,
    compute_instance_slices=1, memory_mb=16384))
HEALTH_STATE_WITH_FACTS = dataclasses.replace(HEALTH_STATE, devices=[GPU_WITH_FACTS, GPU1_NO_NUMA, MIG_WITH_FACTS],
                                              cuda_driver_version=13000)


def test_the_feature_facts_round_trip() -> None:
    assert decode(*encode(HEALTH_STATE_WITH_FACTS)) == HEALTH_STATE_WITH_FACTS
    body = _body(HEALTH_STATE_WITH_FACTS)
    assert body["devices"][1]["fabric"] is None and body["devices"][2]["mig_attributes"]["multiprocessors"] == 16
    assert body["devices"][0]["vgpu"]["host_driver_branch"] == "r596_25" and body["devices"][1]["vgpu"] is None


def test_a_health_state_from_a_monitor_without_the_feature_facts_decodes_with_them_unknown() -> None:
    body = _body(HEALTH_STATE_WITH_FACTS)
    del body["cuda_driver_version"]
    for device in body["devices"]:
        for key in ("compute_major", "compute_minor", "mig_capable", "pci_class", "fabric", "mig_attributes", "vgpu"):
            del device[key]
    msg = decode(b"health.state", _pack(body))
    assert msg == HEALTH_STATE  # the same version: the new fields are optional, their defaults "unknown"
    assert isinstance(msg, HealthState) and msg.cuda_driver_version == 0 and msg.devices[0].compute_major == -1


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("cuda_driver_version",), "13.0", "health.state.cuda_driver_version"),
        (("devices", 0, "compute_major"), True, "health.state.devices[0].compute_major"),
        (("devices", 0, "mig_capable"), 1, "health.state.devices[0].mig_capable"),
        (("devices", 0, "pci_class"), "0x030200", "health.state.devices[0].pci_class"),
        (("devices", 0, "fabric"), "none", "health.state.devices[0].fabric"),
        (("devices", 0, "fabric", "clique_id"), 1.5, "health.state.devices[0].fabric.clique_id"),
        (("devices", 0, "fabric", "cluster_uuid"), None, "health.state.devices[0].fabric.cluster_uuid"),
        (("devices", 2, "mig_attributes", "memory_mb"), "16384", "health.state.devices[2].mig_attributes.memory_mb"),
        (("devices", 2, "mig_attributes"), [16, 1], "health.state.devices[2].mig_attributes"),
        (("devices", 0, "vgpu"), "595.71.03", "health.state.devices[0].vgpu"),
        (("devices", 0, "vgpu", "host_driver_version"), 595, "health.state.devices[0].vgpu.host_driver_version"),
    ],
)
def test_bad_feature_facts_are_refused_naming_the_field(path: tuple[Any, ...], value: Any, where: str) -> None:
    with pytest.raises(BusDecodeError, match="^" + re.escape(where) + ":"):
        decode(b"health.state", _mutated(HEALTH_STATE_WITH_FACTS, path, value))


def test_a_feature_fact_missing_inside_its_record_is_refused() -> None:
    body = _body(HEALTH_STATE_WITH_FACTS)
    del body["devices"][2]["mig_attributes"]["ofas"]
    with pytest.raises(BusDecodeError, match=r"^health\.state\.devices\[2\]\.mig_attributes: missing field 'ofas'"):
        decode(b"health.state", _pack(body))
