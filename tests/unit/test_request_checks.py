"""What GetPreferredAllocation and Allocate refuse before answering, and how ListAndWatch
stream ends are told in the log (each once, a flood in a few lines)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, Health
from services.plugin_server.allocation import (
    MAX_REPORTED_IDS,
    AllocationError,
    check_disjoint,
    preferred_candidates,
)
from services.plugin_server.device_table import PluginDevice
from services.plugin_server.servicer import StreamLog

R = "nvidia.com/gpu"
IDS = [f"GPU-{n}" for n in range(6)]


def _dev(i: str, health: Health = HEALTHY) -> PluginDevice:
    state = DeviceState(id=i, kind="gpu", index=i[-1], name="NVIDIA H100", health=health, reason="", since=0.0)
    return PluginDevice(i, health, 0, state)


DEVICES = {i: _dev(i) for i in IDS}

# name, available, must_include, size, message after the prefix
REFUSED: list[tuple[str, list[str], list[str], int, str]] = [
    ("size-minus-one", IDS, [], -1, "allocation_size must be at least 1; got -1"),
    ("size-zero", IDS, [], 0, "allocation_size must be at least 1; got 0"),
    ("size-int32-min", IDS, [], -(2**31), f"allocation_size must be at least 1; got {-(2**31)}"),
    ("unknown-available", [*IDS, "GPU-x"], [], 1, "unknown device: GPU-x"),
    ("unknown-must", IDS, ["GPU-y"], 1, "unknown device: GPU-y"),
    ("unknown-both-once", ["GPU-x", *IDS], ["GPU-x"], 1, "unknown device: GPU-x"),
    ("duplicate-available", [IDS[0], IDS[1], IDS[0], IDS[0]], [], 1, f"duplicate device: {IDS[0]}"),
    ("duplicate-must", IDS, [IDS[1], IDS[1]], 2, f"duplicate device: {IDS[1]}"),
    ("must-outside-available", IDS[:2], [IDS[4], IDS[5]], 2,
     f"must_include_deviceIDs not in available_deviceIDs: {IDS[4]}, {IDS[5]}"),
    ("must-over-size", IDS, IDS[:3], 2, "must_include_deviceIDs holds 3 devices, more than allocation_size 2"),
    ("size-over-available", IDS[:2], [], 3, "allocation_size 3 is more than the 2 available devices"),
    ("nothing-available", [], [], 1, "allocation_size 1 is more than the 0 available devices"),
]


@pytest.mark.parametrize(("available", "must", "size", "message"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_preferred_request_refused(available: list[str], must: list[str], size: int, message: str) -> None:
    with pytest.raises(AllocationError) as err:
        preferred_candidates(R, available, must, size, DEVICES)
    assert str(err.value) == f'invalid preferred allocation request for "{R}": {message}'


def test_preferred_refusal_names_a_few_ids_then_a_count() -> None:
    unknown = [f"GPU-{'x' * 500}-{n}" for n in range(5000)]
    with pytest.raises(AllocationError) as err:
        preferred_candidates(R, [*IDS, *unknown], [], 1, DEVICES)
    message = str(err.value)
    assert message.endswith(f"(and {5000 - MAX_REPORTED_IDS} more)")
    assert len(message) < 2000


@pytest.mark.parametrize(("available", "must", "size"), [
    (IDS, [], 1), (IDS, [], 6), (IDS, IDS[:2], 2), (IDS, IDS[:2], 6), (IDS[2:4], [IDS[3]], 1),
], ids=["one", "all", "must-fills-size", "must-then-all", "must-is-size"])
def test_preferred_request_the_kubelet_sends_is_answered(available: list[str], must: list[str], size: int) -> None:
    assert list(preferred_candidates(R, available, must, size, DEVICES)) == available


def test_a_device_turned_unhealthy_is_passed_over_while_others_remain() -> None:
    devices = {**DEVICES, IDS[1]: _dev(IDS[1], UNHEALTHY), IDS[4]: _dev(IDS[4], UNHEALTHY)}
    healthy = [i for i in IDS if i not in (IDS[1], IDS[4])]
    assert list(preferred_candidates(R, IDS, [], 4, devices)) == healthy
    assert list(preferred_candidates(R, IDS, [IDS[1]], 4, devices)) == [i for i in IDS if i != IDS[4]], \
        "must_include is the kubelet's choice: kept"
    assert list(preferred_candidates(R, IDS, [], 5, devices)) == IDS, "not enough healthy: all, no refusal"


@settings(max_examples=300, deadline=None)
@given(available=st.lists(st.sampled_from([*IDS, "GPU-x"]), max_size=8),
       must=st.lists(st.sampled_from([*IDS, "GPU-x"]), max_size=4), size=st.integers(-3, 9))
def test_preferred_request_refused_exactly_when_the_kubelet_would_never_send_it(
    available: list[str], must: list[str], size: int
) -> None:
    legal = (set(available) | set(must) <= set(IDS) and len(set(available)) == len(available)
             and len(set(must)) == len(must) and set(must) <= set(available) and size >= 1
             and len(must) <= size <= len(available))
    try:
        out = preferred_candidates(R, available, must, size, DEVICES)
    except AllocationError:
        assert not legal
    else:
        assert legal and list(out) == available


@pytest.mark.parametrize(("containers", "shared"), [
    ([[IDS[0]], [IDS[0]]], [IDS[0]]),
    ([[IDS[0], IDS[1]], [IDS[2]], [IDS[3], IDS[1], IDS[0]]], [IDS[1], IDS[0]]),
    ([IDS, IDS], IDS),
])
def test_a_device_in_two_containers_is_refused(containers: list[list[str]], shared: list[str]) -> None:
    with pytest.raises(AllocationError) as err:
        check_disjoint(R, containers)
    assert str(err.value) == (f'invalid allocation request for "{R}": invalid request: device requested by more than '
                              f"one container: {', '.join(shared)}")


@pytest.mark.parametrize("containers", [[], [[IDS[0], IDS[0]]], [[IDS[0]], [IDS[1]]], [[IDS[0]], []]])
def test_disjoint_containers_pass(containers: list[list[str]]) -> None:
    check_disjoint(R, containers)  # a duplicate inside one container is `validate`'s to name


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if "ListAndWatch" in r.getMessage()]


def test_stream_log_tells_a_few_ends_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock()

    async def run() -> None:
        sl = StreamLog(R, lambda: 1, burst=3, clock=clock)
        sl.note(logging.INFO, "ended (the client went away)", 12.34)
        sl.note(logging.WARNING, "refused (over the limit)")
        clock.now += 5
        for _ in range(3):
            sl.note(logging.INFO, "ended (the plugin-server is stopping)", 1.0)
        sl.flush()

    asyncio.run(run())
    assert _lines(caplog) == [
        (logging.INFO, f"ListAndWatch stream on {R} ended (the client went away) after 12.3 s; 1 open"),
        (logging.WARNING, f"ListAndWatch stream on {R} refused (over the limit); 1 open"),
    ] + [(logging.INFO, f"ListAndWatch stream on {R} ended (the plugin-server is stopping) after 1.0 s; 1 open")] * 3


def test_stream_log_sums_up_a_flood_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock()

    async def run() -> None:
        open_now = 256
        sl = StreamLog(R, lambda: open_now, burst=2, window_s=0.05, clock=clock)
        for _ in range(1500):
            sl.note(logging.WARNING, "refused (over the limit)")
        for _ in range(10):
            sl.note(logging.INFO, "ended (the client went away)", 0.5)
        clock.now += 0.05
        await asyncio.sleep(0.2)  # the window's end: the summary, without any further end
        open_now = 0
        for _ in range(2):
            sl.note(logging.INFO, "ended (the client went away)", 0.5)

    asyncio.run(run())
    lines = _lines(caplog)
    assert lines == [
        (logging.WARNING, f"ListAndWatch stream on {R} refused (over the limit); 256 open"),
        (logging.WARNING, f"ListAndWatch stream on {R} refused (over the limit); 256 open"),
        (logging.WARNING, f"ListAndWatch streams on {R}, beyond the lines above: 1498 refused (over the limit), "
                          "10 ended (the client went away); 256 open"),
        (logging.INFO, f"ListAndWatch stream on {R} ended (the client went away) after 0.5 s; 0 open"),
        (logging.INFO, f"ListAndWatch stream on {R} ended (the client went away) after 0.5 s; 0 open"),
    ], "each end told once; after a summary, a new window"


def test_stream_log_flush_tells_what_is_held_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def run() -> None:
        sl = StreamLog(R, lambda: 0, burst=1, window_s=3600)
        for _ in range(4):
            sl.note(logging.INFO, "ended (the plugin-server is stopping)", 2.0)
        sl.flush()
        sl.flush()

    asyncio.run(run())
    assert [m for _, m in _lines(caplog)] == [
        f"ListAndWatch stream on {R} ended (the plugin-server is stopping) after 2.0 s; 0 open",
        f"ListAndWatch streams on {R}, beyond the lines above: 3 ended (the plugin-server is stopping); 0 open",
    ]
