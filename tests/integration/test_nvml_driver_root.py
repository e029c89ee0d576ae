"""The health-monitor on the real backend loads libnvidia-ml from the driver root and says which."""

from __future__ import annotations

from pathlib import Path

from common.bus.messages import HealthState, Message
from tests.conftest import Procs, wait_until
from tests.fakenvml import FAKE_DRIVER_VERSION, build_driver_root
from tests.integration.busclient import wait_for_message


def test_monitor_uses_the_containerized_drivers_library(procs: Procs, short_tmp: Path) -> None:
    target = build_driver_root(short_tmp / "driver-root")
    run = short_tmp / "run"
    procs.start("hm", "health-monitor", env={
        "GPU_PLUGIN_RUN_DIR": str(run), "NVML_BACKEND": "real", "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver",
        "DRIVER_ROOT_CTR_PATH": str(short_tmp / "driver-root"), "GPU_PLUGIN_STATE_DIR": str(short_tmp / "state")})

    def loaded(m: Message) -> bool:
        return isinstance(m, HealthState) and m.nvml_ok

    msg = wait_for_message(run / "health.sock", loaded, 30.0, topics=("health.state",))
    assert isinstance(msg, HealthState)
    assert (msg.nvml_library, msg.driver_version, msg.devices) == (str(target), FAKE_DRIVER_VERSION, [])
    wait_until(lambda: f"NVML library: {target}" in procs.log("hm"), 15.0, "the library named in the log")
