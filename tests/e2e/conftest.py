"""Fixtures of the end-to-end tests: the shipped supervisord.conf on a simulated 8-GPU box
beside the kubelet simulator process, and what the kubelet holds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devtools.devstack import RESOURCE, DevStack


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[DevStack]:
    s = DevStack(fleet="dgx-h100-8")
    s.start()
    yield s
    # A test's failure is not raised into its fixture: the report (tests/conftest.py) tells.
    report = getattr(request.node, "rep_call", None)
    s.finish(failed=report is None or report.failed)


def registrations(stack: DevStack) -> int:
    """Successful registrations the kubelet received."""
    return sum(1 for r in stack.kubelet.state()["registrations"] if r["ok"])


def held(stack: DevStack, timeout: float = 20.0, **cond: Any) -> dict[str, Any]:
    """Waits until the kubelet holds the resource (8 healthy GPUs unless `cond` says otherwise)."""
    reply = stack.kubelet.wait(RESOURCE, timeout=timeout, **({"allocatable": 8, "capacity": 8, "connected": True}
                                                             | cond))
    assert reply["ok"], f"kubelet does not hold the resource ({cond}): {reply['state']}\n{stack.logs()}"
    state: dict[str, Any] = reply["state"]
    return state
