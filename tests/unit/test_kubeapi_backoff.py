"""common.kubeapi.Backoff, the pause every reader and writer of the API waits between tries (the
kube-agent's Node watch, its condition and Event writers, the dra-plugin's ResourceSlices), and
wait_event, their wait for something to do: the numbers, no time spent."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.kubeapi import RETRY_AFTER_MAX_S, ApiStatus, Backoff, BadAnswer, wait_event


def test_the_pause_doubles_up_to_its_cap_and_is_the_wait() -> None:
    b = Backoff(0.5, 30.0)
    assert b.fresh and b.pause == 0.5
    waits = [b.failed() for _ in range(9)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert b.pause == 30.0 and not b.fresh


def test_a_success_starts_it_over() -> None:
    b = Backoff(0.5, 30.0)
    b.failed()
    b.failed()
    assert b.pause == 2.0 and not b.fresh
    b.succeeded()
    assert b.fresh and b.failed() == 0.5
    assert b.failed() == 1.0


def test_a_failure_counted_without_its_wait_makes_the_next_one_wait() -> None:
    """The kube-agent's first 410 Gone: read again at once, but a second one in a row waits."""
    b = Backoff(0.5, 30.0)
    assert b.fresh
    b.failed()  # not waited
    assert not b.fresh
    assert b.failed() == 1.0


def test_another_floor() -> None:
    """The dra-plugin's tests shorten the first pause; the cap stays."""
    b = Backoff(0.05, 30.0)
    assert [b.failed() for _ in range(3)] == [0.05, 0.1, 0.2]
    for _ in range(20):
        b.failed()
    assert b.failed() == 30.0


def test_a_servers_retry_after_is_honoured_within_its_bound_and_does_not_change_the_pause() -> None:
    b = Backoff(0.5, 30.0)
    assert b.failed(ApiStatus(429, "too many requests", "TooManyRequests", retry_after=7.0)) == 7.0
    assert b.pause == 1.0  # doubled from the pause, not from what the server asked
    assert b.failed(ApiStatus(503, "unavailable", retry_after=3600.0)) == RETRY_AFTER_MAX_S
    assert b.pause == 2.0
    assert b.failed(ApiStatus(429, "too many requests", retry_after=0.0)) == 2.0  # never shorter than the pause
    assert b.failed(ApiStatus(500, "internal error")) == 4.0  # none asked
    assert b.failed(BadAnswer("not a Node")) == 8.0
    assert b.failed(OSError("unreachable")) == 16.0


def test_without_the_error_a_retry_after_is_not_looked_at() -> None:
    b = Backoff(0.5, 30.0)
    assert b.failed() == 0.5


@pytest.mark.parametrize("timeout", [0.0, -5.0])
def test_wait_event_ends_at_a_timeout_already_past(timeout: float) -> None:
    async def main() -> bool:
        event = asyncio.Event()
        await wait_event(event, timeout)
        return event.is_set()

    started = time.monotonic()
    assert asyncio.run(main()) is False
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize("timeout", [None, 3600.0])
def test_wait_event_ends_when_the_event_is_set(timeout: float | None) -> None:
    async def main() -> None:
        event = asyncio.Event()
        asyncio.get_running_loop().call_soon(event.set)
        await wait_event(event, timeout)
        assert event.is_set()  # not cleared: that is the caller's

    asyncio.run(asyncio.wait_for(main(), 5.0))
