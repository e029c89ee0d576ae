"""Hostile or careless config input: alias bombs, deep nesting, bad encodings, sections of
the wrong type, durations that would spin a core, replica counts the kubelet cannot
receive. Each is one short SettingsError (exit 2), never a traceback, a hang or silence."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from common.lifecycle import EX_CONFIG
from common.pb.deviceplugin.v1beta1 import api_pb2 as pb
from common.settings import (
    DEVICE_ENTRY_BYTES,
    GRPC_MAX_MESSAGE_BYTES,
    MAX_DEVICES_PER_RESOURCE,
    MAX_REPLICAS,
    SettingsError,
    resolve,
)
from tests.conftest import BIN

# Each level multiplies by ten: the last alias stands for 10**6 lists; printing it is ~6 MB.
ALIAS_BOMB = "version: v1\na: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcde", "bcdef", strict=True)
) + "flags:\n  migStrategy: *f\n"


def load(tmp_path: Path, body: str | bytes, **env: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.yaml"
    path.write_bytes(body.encode() if isinstance(body, str) else body)
    return resolve(environ={"CONFIG_FILE": str(path), **env})


def gpu_plugin(tmp_path: Path, body: bytes) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_bytes(body)
    return subprocess.run(
        [str(BIN / "gpu-plugin"), "health-monitor", "--config-file", str(path), "--nvml-backend", "simulated",
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (ALIAS_BOMB.encode(), ["alias", "line 2"]),
        (b"version: v1\nflags:\n  migStrategy: \xff\xfe\n", ["not UTF-8"]),
        (b"version: v1\nx: " + b"[" * 3000 + b"]" * 3000 + b"\n", ["nested deeper than"]),
        (b"version: v1\n" + b"#" * (2 << 20) + b"\n", ["larger than"]),
    ],
    ids=["alias-bomb", "not-utf8", "3000-deep", "oversized"],
)
def test_hostile_config_files_end_the_real_command_with_ex_config_and_a_short_message(
    tmp_path: Path, body: bytes, words: list[str]
) -> None:
    out = gpu_plugin(tmp_path, body)
    assert out.returncode == EX_CONFIG, out.stderr[-2000:]  # permanent: the container ends, no restarts
    assert "Traceback" not in out.stderr and len(out.stderr) < 1000, out.stderr[:2000]
    assert str(tmp_path / "config.yaml") in out.stderr
    for word in words:
        assert word in out.stderr


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("version: v1\nflags: 1\n", ["flags", "mapping"]),
        ("version: v1\nflags: [migStrategy, mixed]\n", ["flags", "mapping"]),
        ("version: v1\nflags:\n  plugin: true\n", ["flags.plugin", "mapping"]),
        ("version: v1\nflags:\n  migStrategy: " + "x" * 10000 + "\n", ["mig_strategy", "..."]),
        ("version: v1\nbase: &b {migStrategy: mixed}\nflags:\n  <<: *b\n", ["alias"]),
    ],
    ids=["flags-a-number", "flags-a-list", "plugin-a-bool", "long-value-clipped", "merge-key"],
)
def test_config_sections_of_the_wrong_type_are_refused_naming_the_key(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    with pytest.raises(SettingsError) as err:
        load(tmp_path, text)
    for word in words:
        assert word in str(err.value)
    assert len(str(err.value)) < 1000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m30s", 90.0), ("1h", 3600.0), ("500ms", 0.5), ("1.5s", 1.5), ("2h45m", 9900.0), (".5s", 0.5),
     ("100000us", 0.1), ("1000000000ns", 1.0), ("3s500ms", 3.5), ("10", 10.0), ("2.5", 2.5)],
)
def test_go_durations_are_accepted_as_time_parse_duration_reads_them(text: str, seconds: float) -> None:
    assert resolve(environ={"HEALTH_PROBE_INTERVAL": text}).probe_interval == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["1x", "s", "1s2", "1 s", "", "1e3s", "1e-9s", "nan", "inf", "-5s", "1.2.3s", "1S", "5m" * 100, "1h1h1h" * 10],
)
def test_duration_nonsense_is_refused(text: str) -> None:
    with pytest.raises(SettingsError, match="probe_interval") as err:
        resolve(environ={"HEALTH_PROBE_INTERVAL": text})
    assert len(str(err.value)) < 400


@pytest.mark.parametrize("text", ["1ns", "0.000000001", "0", "0s", "50ms", "99ms"])
def test_a_probe_interval_that_would_spin_a_core_is_refused(text: str) -> None:
    with pytest.raises(SettingsError, match="at least 100ms"):
        resolve(environ={"HEALTH_PROBE_INTERVAL": text})


def test_replicas_beyond_what_listandwatch_can_carry_are_refused_naming_the_bound(tmp_path: Path) -> None:
    text = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: {}\n"
    assert load(tmp_path, text.format(MAX_REPLICAS)).sharing.resources[0].replicas == MAX_REPLICAS
    with pytest.raises(SettingsError) as err:
        load(tmp_path, text.format(20000))
    assert f"at most {MAX_REPLICAS}" in str(err.value) and "4 MiB" in str(err.value)
    assert "sharing.timeSlicing.resources[0].replicas" in str(err.value)


def test_the_replica_bound_comes_from_the_real_encoding_of_the_largest_entry() -> None:
    worst = pb.Device(ID=f"MIG-{'f' * 8}-{'f' * 4}-{'f' * 4}-{'f' * 4}-{'f' * 12}::{MAX_REPLICAS - 1}",
                      health="Unhealthy", topology=pb.TopologyInfo(nodes=[pb.NUMANode(ID=2**31 - 1)]))
    one = len(pb.ListAndWatchResponse(devices=[worst]).SerializeToString())
    assert one <= DEVICE_ENTRY_BYTES
    full = pb.ListAndWatchResponse(devices=[worst] * (MAX_DEVICES_PER_RESOURCE * MAX_REPLICAS))
    assert len(full.SerializeToString()) <= GRPC_MAX_MESSAGE_BYTES
    # What the issue saw: 20000 replicas of 8 GPUs do not fit.
    assert len(pb.ListAndWatchResponse(devices=[worst] * 8 * 20000).SerializeToString()) > GRPC_MAX_MESSAGE_BYTES


def test_a_long_value_in_the_environment_is_clipped_in_the_error() -> None:
    with pytest.raises(SettingsError) as err:
        resolve(environ={"MIG_STRATEGY": "y" * 100000})
    assert "MIG_STRATEGY" in str(err.value) and len(str(err.value)) < 400



def test_a_node_larger_than_the_replica_bound_assumes_is_refused_not_streamed(tmp_path: Path) -> None:
    from common.bus.messages import DeviceState, HealthState
    from services.plugin_server.device_table import ResourceTooLargeError, build_resources

    gpus = [DeviceState(id=f"GPU-{i:08d}-0000-0000-0000-000000000000", kind="gpu", index=str(i), name="H100",
                        health="Healthy", reason="", since=0, numa_node=0) for i in range(MAX_DEVICES_PER_RESOURCE + 8)]
    state = HealthState(incarnation="i", seq=1, sent_at=0, nvml_ok=True, error="", driver_version="", devices=gpus)
    text = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: {}\n"
    with pytest.raises(ResourceTooLargeError) as err:
        build_resources(state, load(tmp_path, text.format(MAX_REPLICAS)))
    assert "nvidia.com/gpu" in str(err.value) and "4 MiB" in str(err.value)
    assert len(build_resources(state, load(tmp_path, text.format(2)))["nvidia.com/gpu"]) == 2 * len(gpus)


def test_a_fifo_as_the_config_file_is_refused_at_once(tmp_path: Path) -> None:
    """Every service opened it blocking at start, before its watchdog ran, and hung for good."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SettingsError, match="not a regular file \\(a FIFO\\)"):
        resolve(environ={"CONFIG_FILE": str(fifo)})


def test_a_1_gib_config_file_is_refused_from_its_size(tmp_path: Path) -> None:
    big = tmp_path / "config.yaml"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: a read of it all would take ~1 GiB of memory
    with pytest.raises(SettingsError, match="larger than 1048576 bytes"):
        resolve(environ={"CONFIG_FILE": str(big)})
