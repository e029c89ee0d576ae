"""End to end: feature-labels under the shipped supervisord.conf, switched on as the chart's gfd.enabled
does (GPU_PLUGIN_FEATURE_LABELS=true): it labels from the health bus, follows an XID, restarts alone
after a crash, and its file leaves with the pod."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from devtools.devstack import PROGRAMS, DevStack
from tests.conftest import wait_until
from tests.e2e.conftest import held

pytestmark = pytest.mark.e2e

PROGRAM = "gpu-plugin:feature-labels"  # supervisorctl's name: the group's
UNHEALTHY = "nvidia.com/gpu.unhealthy.count"


def labels(path: Path) -> dict[str, str]:
    try:
        return dict(line.split("=", 1) for line in path.read_text().splitlines())
    except FileNotFoundError:
        return {}


def test_feature_labels_run_under_supervisord_follow_health_and_restart_alone(tmp_path: Path) -> None:
    output = tmp_path / "features.d" / "gfd"
    output.parent.mkdir()
    machine = tmp_path / "product_name"
    machine.write_text("DGX H100\n")
    stack = DevStack(fleet="dgx-h100-8", env={"GPU_PLUGIN_FEATURE_LABELS": "true", "GFD_OUTPUT_FILE": str(output),
                                             "GFD_MACHINE_TYPE_FILE": str(machine)})
    with stack.finished_after():
        stack.start()
        state = held(stack)
        first = wait_until(lambda: labels(output).get(UNHEALTHY) == "0" and labels(output), 20, "the feature labels")
        assert first["nvidia.com/gpu.count"] == "8" and first["nvidia.com/gpu.machine"] == "DGX-H100"
        ids = list(state["resources"]["nvidia.com/gpu"]["devices"])
        stack.inject("xid", ids[5], "79")
        wait_until(lambda: labels(output).get(UNHEALTHY) == "1", 20, "gpu.unhealthy.count 1 after XID 79")

        # A crash: supervisord restarts it alone, and it labels from the bus's replay at once.
        pids = {p: stack.pid(p) for p in PROGRAMS}
        old = stack.pid(PROGRAM)
        assert old
        # Its heartbeat, which supervisord's frozen-process check and the liveness probe read.
        wait_until(lambda: (stack.run_dir / "feature-labels.alive").exists(), 10, "feature-labels' heartbeat")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: stack.pid(PROGRAM) not in (0, old), 20, "feature-labels restarted")
        assert {p: stack.pid(p) for p in PROGRAMS} == pids, "no other program restarted"
        log = stack.root / "supervisord.log"
        wait_until(lambda: log.read_text().count(" labels to ") == 3, 20, "the new process's labels")
        assert labels(output).get(UNHEALTHY) == "1"

        # SIGTERM to the pod: the labels leave with it, as NVIDIA's GFD removes its file.
        assert stack.stop(timeout=30) == 0
        assert not output.exists(), log.read_text(errors="replace")[-5000:] if log.exists() else ""
