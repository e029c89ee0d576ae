"""feature-labels: NVIDIA's gpu-feature-discovery labels from the health bus, in the plugin's pod.

Real processes on the simulated driver: the health-monitor (with the plugin-server and registrar of
a Node) publishes, feature-labels writes the NFD features.d file. Its labels are compared with what
the gpu-feature-discovery command writes for the same fleet and config in the same test: the same
labels, from the bus instead of a second NVML user, plus nvidia.com/gpu.unhealthy.count.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from common.bus.messages import HealthState
from tests.conftest import Procs, wait_until
from tests.integration.busclient import wait_for_message
from tests.integration.node import Node
from tests.integration.test_feature_discovery import DGX_H100, TIME_SLICING, Gfd, without_timestamp

UNHEALTHY = "nvidia.com/gpu.unhealthy.count"


class Labels:
    """A feature-labels process beside a Node, writing to its own features.d directory."""

    def __init__(self, procs: Procs, node: Node, root: Path, **env: str) -> None:
        self.procs = procs
        self.dir = root / "fl-features.d"
        self.dir.mkdir()
        self.output = self.dir / "gfd"
        self.machine = root / "fl-product_name"
        self.machine.write_text("DGX H100\n")
        self.p = procs.start("feature-labels", "feature-labels", env={
            **node.env, "GPU_PLUGIN_FEATURE_LABELS": "true", "GFD_OUTPUT_FILE": str(self.output),
            "GFD_MACHINE_TYPE_FILE": str(self.machine), **env})

    def read(self) -> dict[str, str]:
        try:
            text = self.output.read_text()
        except FileNotFoundError:
            return {}
        return dict(line.split("=", 1) for line in text.splitlines())

    def wait(self, predicate: Any, what: str, timeout: float = 15.0) -> dict[str, str]:
        def ok() -> dict[str, str] | None:
            assert self.p.poll() is None, self.procs.log("feature-labels")
            labels = self.read()
            return labels if labels and predicate(labels) else None

        found: dict[str, str] = wait_until(ok, timeout, what)
        return found

    def writes(self) -> int:
        return self.procs.log("feature-labels").count("wrote ")


def written_config(node: Node, text: str) -> None:
    """As the kube-agent and config-manager do: a new file renamed over the old one."""
    path = Path(node.env["CONFIG_FILE"])
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize(("fleet", "config", "gfd_args", "env"), [
    ("dgx-h100-8", None, (), {}),
    ("dgx-h100-8-mig", None, ("--mig-strategy", "mixed"), {"MIG_STRATEGY": "mixed"}),
    ("dgx-h100-8", TIME_SLICING.format(rename=""), (), {}),
], ids=["8-gpus", "mig-mixed", "time-slicing"])
def test_the_labels_are_gpu_feature_discoverys_for_the_same_fleet_and_config(
        make_node: Any, procs: Procs, short_tmp: Path, fleet: str, config: str | None, gfd_args: tuple[str, ...],
        env: dict[str, str]) -> None:
    node = make_node(fleet=fleet, config=config, **env)
    labels = Labels(procs, node, short_tmp)
    gfd = Gfd(procs, short_tmp)
    expected = gfd.oneshot("--no-timestamp", *gfd_args, fleet=fleet, config=config)
    got = labels.wait(lambda ls: UNHEALTHY in ls, "the feature labels")
    assert got[UNHEALTHY] == "0"  # ours: no GPU Unhealthy
    assert int(got["nvidia.com/gfd.timestamp"]) > 0
    assert without_timestamp({k: v for k, v in got.items() if k != UNHEALTHY}) == expected
    assert list(got) == sorted(got) and labels.output.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in labels.dir.iterdir()] == ["gfd"]  # written atomically: nothing left beside it


def test_an_xid_79_changes_the_unhealthy_count_and_heartbeats_rewrite_nothing(
        make_node: Any, procs: Procs, short_tmp: Path) -> None:
    node = make_node()
    victim = sorted(node.wait_devices())[2]
    labels = Labels(procs, node, short_tmp)
    before = labels.wait(lambda ls: ls.get(UNHEALTHY) == "0", "the labels, no GPU unhealthy")
    node.inject("xid", victim, "79")
    node.wait_health(victim, "Unhealthy")
    after = labels.wait(lambda ls: ls.get(UNHEALTHY) == "1", "gpu.unhealthy.count 1 after XID 79")
    assert without_timestamp(after) == {**without_timestamp(before), UNHEALTHY: "1"}
    assert without_timestamp(after) == {**DGX_H100, UNHEALTHY: "1"}
    # Two heartbeats of the monitor after it (same state, new sent_at) reach the program too: the
    # file was written for the first labels and for the changed count only.
    since = time.time()
    wait_for_message(node.run / "health.sock", lambda m: isinstance(m, HealthState) and m.sent_at >= since + 2.0,
                     15.0, topics=("health.state",))
    assert labels.writes() == 2, procs.log("feature-labels")


def test_a_config_reload_changes_the_replicas_live(make_node: Any, procs: Procs, short_tmp: Path) -> None:
    node = make_node(config="version: v1\n")
    labels = Labels(procs, node, short_tmp)
    labels.wait(lambda ls: ls.get("nvidia.com/gpu.replicas") == "1", "gpu.replicas 1")
    written_config(node, TIME_SLICING.format(rename=""))
    got = labels.wait(lambda ls: ls.get("nvidia.com/gpu.replicas") == "4", "gpu.replicas 4 after the reload")
    assert got["nvidia.com/gpu.sharing-strategy"] == "time-slicing"
    assert got["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3-SHARED"
    assert labels.p.poll() is None  # applied live, not by a restart


def test_sigterm_removes_the_file_and_exits_0(make_node: Any, procs: Procs, short_tmp: Path) -> None:
    node = make_node()
    labels = Labels(procs, node, short_tmp)
    labels.wait(lambda ls: UNHEALTHY in ls, "the feature labels")
    assert procs.stop(labels.p) == 0
    assert not labels.output.exists()  # NVIDIA's GFD removes its file at exit: the labels leave with it
    assert list(labels.dir.iterdir()) == []


def test_labels_that_cannot_be_made_remove_the_file_until_they_can(
        make_node: Any, procs: Procs, short_tmp: Path) -> None:
    """MPS with a MIG-enabled GPU: NVIDIA's labeler fails the pass and removes the file; so does ours,
    and it labels again when the config allows."""
    node = make_node(fleet="dgx-h100-8-mig", config="version: v1\n")
    labels = Labels(procs, node, short_tmp)
    labels.wait(lambda ls: UNHEALTHY in ls, "the feature labels")
    written_config(node, "version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n"
                         "      replicas: 2\n")
    wait_until(lambda: not labels.output.exists(), 15, "the labels removed")
    assert "MPS sharing is not supported for mig devices" in procs.log("feature-labels")
    written_config(node, "version: v1\n")
    labels.wait(lambda ls: UNHEALTHY in ls, "the labels back")
    assert labels.p.poll() is None


@pytest.mark.parametrize(("value", "rc"), [("", 0), ("false", 0), ("maybe", 78)])
def test_off_unless_the_gate_is_true(procs: Procs, short_tmp: Path, value: str, rc: int) -> None:
    env = {"GPU_PLUGIN_RUN_DIR": str(short_tmp / "run"), "GFD_OUTPUT_FILE": str(short_tmp / "gfd"),
           "GPU_PLUGIN_FEATURE_LABELS": value}
    done = subprocess.run(_supervisord_command(), env={**procs.env, **env}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == rc, done.stderr
    assert ("feature labels are off" in done.stderr) == (rc == 0)
    if rc:
        assert "GPU_PLUGIN_FEATURE_LABELS" in done.stderr and "'maybe'" in done.stderr
    assert not (short_tmp / "gfd").exists()


def _supervisord_command() -> list[str]:
    """The program's command line in supervisord.conf (plain words: no shell there)."""
    conf = (Path(__file__).parents[2] / "supervisord.conf").read_text()
    section = conf.split("[program:feature-labels]", 1)[1]
    line = next(ln for ln in section.splitlines() if ln.startswith("command="))
    return line.removeprefix("command=").split()


