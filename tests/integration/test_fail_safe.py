"""What a hostile or unlucky node does to the stack: a corrupt cordon file, a state dir that
cannot be written (a metrics port already taken: test_metrics_endpoint.py). Cordons fail safe
(out of service, never silently back in); optional features turn off with a reason on the bus
instead of ending the pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.bus.messages import HealthState
from tests.integration.busclient import BusWatch
from tests.integration.node import Node


def state_where(node: Node, predicate: Any, timeout: float = 30.0) -> HealthState:
    with BusWatch(node.run / "health.sock", ("health.state",)) as w:
        msg = w.wait(lambda m: isinstance(m, HealthState) and predicate(m), timeout)
    assert isinstance(msg, HealthState)
    return msg


def restart_monitor(node: Node) -> None:
    node.services["health-monitor"].kill()
    node.services["health-monitor"].wait(10)
    node.start("health-monitor")


def test_a_corrupt_cordon_file_keeps_devices_out_of_service_across_a_monitor_restart(make_node: Any) -> None:
    node = make_node()
    ids = list(node.wait_devices())
    victim = ids[3]
    assert node.cli("cordon", victim, "--reason", "bad fan").returncode == 0
    node.wait_health(victim, "Unhealthy")
    cordons = node.root / "state" / "cordons.json"
    cordons.write_text('{"' + victim + '": {"reason": "bad fan", "time": ')  # torn write
    restart_monitor(node)
    # A restarted monitor cannot know what the file named: every device stays out of service.
    state = state_where(node, lambda m: all("cordon file" in d.reason for d in m.devices))
    assert all(d.health == "Unhealthy" and d.cordoned for d in state.devices)
    assert str(cordons) in state.devices[0].reason
    node.wait_devices(healthy=0, timeout=30)
    assert node.services["health-monitor"].poll() is None
    # The operator is told why an update is refused, and the file is left for them to fix.
    refused = node.cli("uncordon", victim)
    assert refused.returncode == 2 and str(cordons) in refused.stderr
    assert cordons.read_text().endswith('"time": ')
    # Fixed by hand: the monitor re-reads it and only the cordoned device stays out.
    cordons.write_text('{"' + victim + '": {"reason": "bad fan", "time": 0}}')
    node.wait_devices(healthy=7, timeout=30)
    assert node.devices()[victim] == "Unhealthy"


def test_an_oversized_cordon_file_is_corrupt_and_fails_safe(make_node: Any) -> None:
    node = make_node()
    node.wait_devices()
    cordons = node.root / "state" / "cordons.json"
    # Valid JSON, but far beyond anything `gpu-plugin cordon` writes: not read into memory.
    cordons.write_text('{"GPU-x": {"reason": "' + "x" * (8 << 20) + '", "time": 0}}')
    state = state_where(node, lambda m: all(d.cordoned for d in m.devices))
    assert "larger than" in state.devices[0].reason
    node.wait_devices(healthy=0, timeout=30)
    assert node.services["health-monitor"].poll() is None


def test_a_state_dir_that_cannot_be_created_turns_cordons_off_and_keeps_the_monitor(
    make_node: Any, short_tmp: Path
) -> None:
    blocker = short_tmp / "not-a-dir"
    blocker.write_text("")
    state_dir = blocker / "state"  # mkdir fails (ENOTDIR), as on a read-only filesystem
    node = make_node(GPU_PLUGIN_STATE_DIR=str(state_dir))
    state = state_where(node, lambda m: bool(m.degraded) and len(m.devices) == 8)
    assert any("cordons unavailable" in r and str(state_dir) in r for r in state.degraded)
    node.wait_devices()  # every device healthy and served
    assert node.services["health-monitor"].poll() is None
    victim = next(iter(node.devices()))
    refused = node.cli("cordon", victim, "--reason", "fan")
    assert refused.returncode == 2 and str(state_dir) in refused.stderr and "Traceback" not in refused.stderr
    status = node.cli("status")
    assert "degraded: cordons unavailable" in status.stdout
    log = node.procs.log("health-monitor")
    assert log.count("cordons unavailable") == 1 and "Traceback" not in log
