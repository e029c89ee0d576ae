"""The registrar's rules in-process, with a fake clock: once per identity pair, backoff,
adoption, and which ListAndWatch stream is the kubelet's — without sockets or waiting."""

from __future__ import annotations

import dataclasses

import pytest

from common.bus.messages import EndpointState
from services.registrar.rules import BACKOFF_S, IDLE_S, RegistrationRules

GRACE = 2.0
KUBELET = "11:1"
EP = EndpointState(resource="nvidia.com/gpu", endpoint="nvidia-gpu.sock", socket_id="22:1", pre_start_required=False,
                   get_preferred_allocation_available=True, streams=0, healthy=8, total=8)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rules(clock: Clock) -> RegistrationRules:
    return RegistrationRules(GRACE, monotonic=clock, wall=lambda: 1.7e9)


def streaming(*opened: float, ep: EndpointState = EP) -> EndpointState:
    return dataclasses.replace(ep, streams=len(opened), stream_opened=list(opened))


def on_disk(ep: EndpointState = EP) -> object:
    return lambda name: ep.socket_id if name == ep.endpoint else ""


def register_now(rules: RegistrationRules, kubelet: str = KUBELET) -> list[str]:
    return [e.resource for e in rules.plan(kubelet, on_disk()).register]  # type: ignore[arg-type]


def test_an_announced_endpoint_is_registered_once_per_identity_pair(rules: RegistrationRules,
                                                                    clock: Clock) -> None:
    rules.endpoints_announced([EP])
    assert register_now(rules) == ["nvidia.com/gpu"] and rules.pending(KUBELET) == ["nvidia.com/gpu"]
    rules.registered_ok(EP, KUBELET, began=clock.now)
    rules.endpoints_announced([streaming(clock.now + 0.01)])
    assert register_now(rules) == [] and rules.pending(KUBELET) == []
    assert register_now(rules, kubelet="33:1") == ["nvidia.com/gpu"], "a new kubelet: register again"
    replaced = dataclasses.replace(EP, socket_id="22:2")
    rules.endpoints_announced([replaced])
    plan = rules.plan(KUBELET, on_disk(replaced))  # type: ignore[arg-type]
    assert [e.socket_id for e in plan.register] == ["22:2"], "a re-created endpoint: register again"


def test_an_endpoint_being_re_created_is_left_alone(rules: RegistrationRules) -> None:
    rules.endpoints_announced([EP])
    assert rules.plan(KUBELET, lambda name: "22:9").register == []
    assert rules.plan(KUBELET, lambda name: "").register == []


def test_failures_back_off_and_a_socket_change_retries_at_once(rules: RegistrationRules, clock: Clock) -> None:
    rules.endpoints_announced([EP])
    assert rules.failed("nvidia.com/gpu", "UNAVAILABLE: refused") is True
    assert rules.failed("nvidia.com/gpu", "UNAVAILABLE: refused") is False, "said once, not per retry"
    assert rules.errors == {"nvidia.com/gpu": "UNAVAILABLE: refused"}
    plan = rules.plan(KUBELET, on_disk())  # type: ignore[arg-type]
    assert plan.register == [] and plan.next_s == pytest.approx(BACKOFF_S[1])
    clock.now += BACKOFF_S[1]
    assert register_now(rules) == ["nvidia.com/gpu"]
    for _ in range(10):
        rules.failed("nvidia.com/gpu", "UNAVAILABLE: refused")
    assert rules.retry_in("nvidia.com/gpu") == pytest.approx(BACKOFF_S[-1]), "the backoff is bounded"
    rules.sockets_changed()
    assert register_now(rules) == ["nvidia.com/gpu"]
    rules.registered_ok(EP, KUBELET, began=clock.now)
    assert rules.errors == {} and rules.retry_in("nvidia.com/gpu") is None


def test_a_kubelet_that_stops_streaming_gets_a_new_registration_after_the_grace(rules: RegistrationRules,
                                                                              clock: Clock) -> None:
    rules.endpoints_announced([EP])
    rules.registered_ok(EP, KUBELET, began=clock.now)
    rules.endpoints_announced([streaming(clock.now + 0.01)])
    clock.now += 10
    rules.endpoints_announced([streaming()])  # the kubelet let go
    plan = rules.plan(KUBELET, on_disk())  # type: ignore[arg-type]
    assert plan.register == [] and plan.next_s == GRACE
    clock.now += GRACE
    assert register_now(rules) == ["nvidia.com/gpu"]


def test_a_stray_stream_does_not_hide_a_kubelet_drop(rules: RegistrationRules, clock: Clock) -> None:
    rules.endpoints_announced([EP])
    began = clock.now
    rules.registered_ok(EP, KUBELET, began=began)
    kubelets = began + 0.01
    rules.endpoints_announced([streaming(kubelets)])
    clock.now += 5
    stray = clock.now
    rules.endpoints_announced([streaming(kubelets, stray)])
    rules.endpoints_announced([streaming(stray)])  # the kubelet's stream ended; the stray's is open
    clock.now += GRACE
    assert register_now(rules) == ["nvidia.com/gpu"]


def test_a_kubelet_stream_ended_before_we_saw_it_is_not_hidden_by_a_later_one(rules: RegistrationRules,
                                                                             clock: Clock) -> None:
    """The kubelet streamed and dropped the stream before the registrar read any state with it open, and
    another client's stream began after it: the ended one is still the kubelet's (stream_ended)."""
    rules.endpoints_announced([EP])
    began = clock.now
    rules.registered_ok(EP, KUBELET, began=began)
    kubelets, stray = began + 0.01, began + 0.02
    rules.endpoints_announced([dataclasses.replace(streaming(stray), stream_ended=[kubelets])])
    clock.now += GRACE
    assert register_now(rules) == ["nvidia.com/gpu"]


def test_a_stream_that_began_before_our_register_is_not_the_kubelets(rules: RegistrationRules,
                                                                    clock: Clock) -> None:
    rules.endpoints_announced([EP])
    clock.now += 1
    stray = clock.now
    clock.now += 1
    rules.registered_ok(EP, KUBELET, began=clock.now)
    rules.endpoints_announced([streaming(stray)])  # only the stray: the kubelet never took it up
    clock.now += GRACE
    assert register_now(rules) == ["nvidia.com/gpu"]


def test_a_registrar_restarting_alone_adopts_what_the_kubelet_streams(rules: RegistrationRules,
                                                                     clock: Clock) -> None:
    held = clock.now - 60  # opened before this registrar started: the kubelet's, from our predecessor
    rules.endpoints_announced([streaming(held)])
    assert register_now(rules) == []
    (reg,) = rules.registered.values()
    assert reg.adopted and (reg.kubelet_id, reg.socket_id) == (KUBELET, EP.socket_id)
    clock.now += 30
    rules.endpoints_announced([streaming(held, clock.now)])  # a stray joins: still held
    clock.now += GRACE
    assert register_now(rules) == []
    rules.endpoints_announced([streaming(clock.now - GRACE)])  # the adopted stream ended
    clock.now += GRACE
    assert register_now(rules) == ["nvidia.com/gpu"], "once any adopted stream ends, register again"


def test_only_streams_older_than_the_registrar_are_adopted(rules: RegistrationRules, clock: Clock) -> None:
    clock.now += 1
    rules.endpoints_announced([streaming(clock.now)])  # began after we started: another client's
    assert register_now(rules) == ["nvidia.com/gpu"]
    assert rules.registered == {}


def test_adoption_happens_once(rules: RegistrationRules, clock: Clock) -> None:
    held = clock.now - 60
    rules.endpoints_announced([streaming(held)])
    register_now(rules)
    rules.endpoints_announced([streaming()])
    clock.now += GRACE
    assert register_now(rules) == ["nvidia.com/gpu"], "never adopted again after a drop"


def test_a_plugin_server_that_does_not_say_when_streams_began(rules: RegistrationRules, clock: Clock) -> None:
    counted = dataclasses.replace(EP, streams=1)
    rules.endpoints_announced([counted])
    assert register_now(rules) == [], "adopted on the stream count"
    rules.endpoints_announced([dataclasses.replace(EP, streams=0)])
    clock.now += GRACE
    assert register_now(rules) == ["nvidia.com/gpu"]


def test_nothing_to_do_waits_the_idle_interval(rules: RegistrationRules) -> None:
    assert rules.plan(KUBELET, lambda name: "").next_s == IDLE_S
