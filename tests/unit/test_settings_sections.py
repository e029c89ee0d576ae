"""The config file's `health:` and `sharing:` sections and unknown keys: accepted shapes,
every rejection naming its key, warnings for what is ignored."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from common.settings import SettingsError, resolve

NVIDIA_EXAMPLES = {
    "time-slicing": """version: v1
flags:
  migStrategy: none
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: 10
""",
    "time-slicing-renamed": """version: v1
sharing:
  timeSlicing:
    renameByDefault: true
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/gpu
      replicas: 2
    - name: nvidia.com/mig-1g.10gb
      rename: nvidia.com/small
      replicas: 3
      devices: ["0:1", 2, "GPU-8ea0a3c3-0000-0000-0000-000000000000"]
""",
    "mps": """version: v1
sharing:
  mps:
    resources:
    - name: nvidia.com/gpu
      replicas: 4
""",
    "flags-only": """version: v1
flags:
  migStrategy: mixed
  failOnInitError: false
  nvidiaDriverRoot: /run/nvidia/driver
  plugin:
    passDeviceSpecs: true
    deviceListStrategy: [envvar, cdi-annotations]
    deviceIDStrategy: index
""",
}


def load(tmp_path: Path, text: str, **env: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return resolve(environ={"CONFIG_FILE": str(path), **env})


@pytest.mark.parametrize("name", sorted(NVIDIA_EXAMPLES))
def test_nvidia_config_files_are_accepted(tmp_path: Path, name: str) -> None:
    s = load(tmp_path, NVIDIA_EXAMPLES[name])
    assert s.mig_strategy in ("none", "mixed")


def test_sharing_values(tmp_path: Path) -> None:
    s = load(tmp_path, NVIDIA_EXAMPLES["time-slicing-renamed"])
    gpu, small = s.sharing.resources
    assert s.sharing.kind == "timeSlicing" and s.sharing.fail_requests_greater_than_one
    assert s.sharing.served_name(gpu) == "nvidia.com/gpu.shared"
    assert s.sharing.served_name(small) == "nvidia.com/small"
    assert small.devices == ("0:1", "2", "GPU-8ea0a3c3-0000-0000-0000-000000000000")
    assert gpu.devices is None


def test_health_section(tmp_path: Path) -> None:
    s = load(tmp_path, """version: v1
health:
  probeInterval: 500ms
  recovery: {policy: never, quietPeriod: 2m}
  xids: {fatal: [13], ignored: [48], monitorOnly: [94, 95]}
  ecc: {singleBit: fatal, doubleBit: report}
""")
    assert (s.probe_interval, s.recovery_policy, s.quiet_period) == (0.5, "never", 120.0)
    h = s.health
    assert (h.fatal_xids, h.ignored_xids, h.monitor_only_xids) == ({13}, {48}, {94, 95})
    assert (h.ecc_single_bit, h.ecc_double_bit) == ("fatal", "report")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sharing:\n  timeSlicing: {resources: []}\n", "sharing.timeSlicing.resources: expected a non-empty list"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 1}]}\n",
         "sharing.timeSlicing.resources[0].replicas: 1 must be an integer >= 2"),
        ("sharing:\n  timeSlicing: {resources: [{name: gpu, replicas: 2}]}\n",
         "sharing.timeSlicing.resources[0].name: 'gpu' is not a resource name"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [x]}]}\n",
         "sharing.timeSlicing.resources[0].devices[0]: 'x' is not a GPU index"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: 0}]}\n",
         "sharing.timeSlicing.resources[0].devices: 0 must be at least 1"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}, {name: nvidia.com/gpu, "
         "replicas: 3}]}\n", "nvidia.com/gpu is listed twice"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n  mps: {resources: "
         "[{name: nvidia.com/gpu, replicas: 2}]}\n", "mutually exclusive"),
        ("sharing:\n  timeSlicing: {renameByDefault: maybe, resources: [{name: nvidia.com/gpu, replicas: 2}]}\n",
         "sharing.timeSlicing.renameByDefault: 'maybe' is not a boolean"),
        ("health:\n  xids: {fatal: [79], ignored: [79]}\n", "XID 79 is in both fatal_xids and ignored_xids"),
        ("health:\n  xids: {fatal: [-1]}\n",
         "fatal_xids (config file key health.xids.fatal): item 0: -1 is not an XID"),
        ("health:\n  xids: {fatl: [1]}\n", "health.xids.fatl: unknown key"),
        ("health:\n  ecc: {doubleBit: ignore}\n",
         "ecc_double_bit (config file key health.ecc.doubleBit): 'ignore' is not one of fatal, report"),
        ("health:\n  probeInterval: soon\n", "probe_interval (config file key health.probeInterval): 'soon'"),
        ("health:\n  recovery: {policy: sometimes}\n", "'sometimes' is not one of auto, never"),
        ("health:\n  metricsPort: 70000\n", "70000 is not a port number"),
    ],
    ids=["empty-resources", "replicas", "name", "devices-entry", "devices-zero", "duplicate", "both-kinds",
         "bool", "xid-conflict", "xid-negative", "xid-key", "ecc", "duration", "recovery", "port"],
)
def test_rejections_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=None) as err:
        load(tmp_path, "version: v1\n" + text)
    assert message in str(err.value)


def test_unknown_keys_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load(tmp_path, "version: v1\nflags:\n  migStratgy: mixed\n  plugin:\n    passDevSpecs: true\nextra: 1\n")
    warned = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    assert warned == ["config file: 3 unknown keys are ignored: flags.migStratgy, flags.plugin.passDevSpecs, extra"]


def test_sixty_thousand_unknown_keys_are_one_warning_naming_a_few(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    text = "version: v1\nflags:\n" + "".join(f"  k{i}: 1\n" for i in range(60_000))
    with caplog.at_level(logging.WARNING), pytest.raises(SettingsError, match="more than 10000 values"):
        load(tmp_path, text)  # past the file's bound on values, before any key is looked at
    text = "version: v1\nflags:\n" + "".join(f"  k{i}: 1\n" for i in range(4_000))
    with caplog.at_level(logging.WARNING):
        load(tmp_path, text)
    warned = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    assert warned == ["config file: 4000 unknown keys are ignored: flags.k0, flags.k1, flags.k2, flags.k3, "
                      "flags.k4 and 3995 more"]


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """YAML's last-wins kept the second migStrategy silently."""
    with pytest.raises(SettingsError, match="line 4: duplicate key 'migStrategy' \\(first on line 3\\)"):
        load(tmp_path, "version: v1\nflags:\n  migStrategy: mixed\n  migStrategy: none\n")
    with pytest.raises(SettingsError, match="duplicate key 'flags'"):
        load(tmp_path, "version: v1\nflags: {}\nflags: {}\n")


@pytest.mark.parametrize("xids, message", [
    ("[100000000000000000000000]", "is not an XID (an integer from 1 to 65535)"),
    ("[65536]", "is not an XID (an integer from 1 to 65535)"),
    ("[" + ", ".join(["13"] * 1025) + "]", "1025 items; at most 1024"),
], ids=["1e23", "65536", "1025-items"])
def test_xids_are_bounded(tmp_path: Path, xids: str, message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        load(tmp_path, f"version: v1\nhealth:\n  xids:\n    fatal: {xids}\n")


def test_a_100_000_item_xid_list_is_refused_at_the_values_bound(tmp_path: Path) -> None:
    """The old path composed all 100 000 nodes (4 s, 96 MB) before looking at one."""
    text = "version: v1\nhealth:\n  xids:\n    fatal:\n" + "    - 13\n" * 100_000
    with pytest.raises(SettingsError, match="line 9996: more than 10000 values in one file"):
        load(tmp_path, text)


def test_environment_beats_the_file_for_health_settings(tmp_path: Path) -> None:
    s = load(tmp_path, "version: v1\nhealth:\n  probeInterval: 30s\n", HEALTH_PROBE_INTERVAL="2s")
    assert s.probe_interval == 2.0
