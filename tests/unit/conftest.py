"""Fixtures of the unit tests that several files share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.nvml_sim import SimulatedNvml, fleet_path


@pytest.fixture
def h200() -> Iterator[SimulatedNvml]:
    """The simulated driver on the recorded H200, initialised for the test."""
    nvml = SimulatedNvml(fleet_path("h200"))
    nvml.init()
    yield nvml
    nvml.shutdown()
