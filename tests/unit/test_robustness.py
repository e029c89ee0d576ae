"""What one broken GPU, one bad file or one odd driver must not do: take the rest down."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from common.bus.codec import decode, encode
from common.bus.messages import HEALTHY, UNHEALTHY, DeviceState, HealthState
from common.cordons import CordonFileError, CordonStateError, CordonStore
from common.nvml.backend import NVML_ERROR_UNKNOWN
from common.settings import resolve
from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.health_monitor.discovery import discover
from services.health_monitor.probes import probe_gpu
from services.plugin_server.device_table import build_resources


def fleet(tmp_path: Path, name: str, change: Any) -> SimulatedNvml:
    desc = json.loads(fleet_path(name).read_text())
    change(desc)
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(desc))
    nvml = SimulatedNvml(path)
    nvml.init()
    return nvml


def test_a_gpu_that_cannot_be_named_is_skipped_and_reported(tmp_path: Path) -> None:
    nvml = fleet(tmp_path, "dgx-h100-8", lambda d: d["devices"][2].update(uuid={"error": NVML_ERROR_UNKNOWN}))
    inv = discover(nvml, 0.0)
    assert len([d for d in inv.devices if d.kind == "gpu"]) == 7
    assert inv.unreadable == ["GPU index 2: Unknown Error"]


def test_a_device_whose_uuid_is_no_device_id_is_skipped_and_the_state_still_decodes(tmp_path: Path) -> None:
    # The subscriber drops a whole state carrying a malformed ID: one odd UUID from the driver
    # must cost that device, not every device of the node.
    def change(d: dict[str, Any]) -> None:
        d["devices"][2]["uuid"] = "GPU-a,GPU-b"
        gpu = next(g for g in d["devices"] if g.get("mig_devices"))
        gpu["mig_devices"][0]["uuid"] = "MIG-GPU-x/1/0"

    inv = discover(fleet(tmp_path, "dgx-h100-8-mig", change), 0.0)
    ids = [d.id for d in inv.devices]
    assert "GPU-a,GPU-b" not in ids and "MIG-GPU-x/1/0" not in ids
    assert len([d for d in inv.devices if d.kind == "gpu"]) == 7
    assert [u for u in inv.unreadable if "not a valid device ID" in u] == [
        "GPU index 2: UUID 'GPU-a,GPU-b' is not a valid device ID",
        "MIG device of GPU index 6: UUID 'MIG-GPU-x/1/0' is not a valid device ID",
    ]
    state = HealthState(incarnation="i", seq=1, sent_at=0.0, nvml_ok=True, error="", driver_version="",
                        devices=inv.devices, links=inv.links)
    assert decode(*encode(state)) == state


def test_a_gpu_that_fails_description_is_listed_unhealthy(tmp_path: Path) -> None:
    nvml = fleet(tmp_path, "dgx-h100-8", lambda d: d["devices"][5].update(name={"error": NVML_ERROR_UNKNOWN}))
    inv = discover(nvml, 0.0)
    broken = [d for d in inv.devices if d.health == UNHEALTHY]
    assert [(d.index, d.reason) for d in broken] == [("5", "discovery failed: Unknown Error")]
    assert sum(d.health == HEALTHY for d in inv.devices) == 7


@pytest.mark.parametrize("code", [2, 4, 999], ids=["invalid-argument", "no-permission", "unknown"])
def test_an_optional_query_the_driver_refuses_is_unknown_not_a_fault(tmp_path: Path, code: int) -> None:
    nvml = fleet(tmp_path, "h200", lambda d: d["devices"][0].update(recovery_action={"error": code},
                                                                      remapped_rows={"error": code}))
    handle = nvml.device_get_handle_by_index(0)
    probe = probe_gpu(nvml, "GPU-x", handle)
    assert probe.faults == {} and probe.recovery_action is None


def test_mig_single_tolerates_a_gpu_lost_at_discovery() -> None:
    lost = DeviceState(id="GPU-lost", kind="gpu", index="0", name="", health=UNHEALTHY, reason="GPU lost", since=0)
    gpu = DeviceState(id="GPU-a", kind="gpu", index="1", name="H100", health=HEALTHY, reason="", since=0,
                      mig_enabled=True)
    mig = DeviceState(id="MIG-a", kind="mig", index="1:0", name="H100 MIG 1g.10gb", health=HEALTHY, reason="",
                      since=0, parent="GPU-a", profile="1g.10gb")
    state = HealthState(incarnation="i", seq=1, sent_at=0, nvml_ok=True, error="", driver_version="",
                        devices=[lost, gpu, mig])
    resources = build_resources(state, resolve(environ={"MIG_STRATEGY": "single"}))
    assert [d.id for d in resources["nvidia.com/gpu"]] == ["MIG-a"]


@pytest.mark.parametrize(
    "body",
    ['{"GPU-a": {"reason": "x", "time": "yesterday"}}', '{"GPU-a": {"reason": "x", "time": null}}',
     '{"GPU-a": {"reason": 5}}', '{"GPU-a": "cordoned"}', '["GPU-a"]', "{not json"],
    ids=["time-text", "time-null", "reason-number", "entry-string", "list", "not-json"],
)
def test_a_malformed_cordon_file_is_one_clear_error(tmp_path: Path, body: str) -> None:
    (tmp_path / "cordons.json").write_text(body)
    with pytest.raises(CordonFileError):
        CordonStore(tmp_path).load()


def test_cordon_store_round_trip_is_atomic(tmp_path: Path) -> None:
    store = CordonStore(tmp_path / "state")
    store.cordon("GPU-a", "fan")
    store.cordon("GPU-b", "")
    assert store.uncordon("GPU-b") and not store.uncordon("GPU-b")
    loaded = store.load()
    assert list(loaded) == ["GPU-a"] and loaded["GPU-a"].reason == "fan"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["cordons.json", "cordons.json.lock"]


def test_a_symlink_planted_as_the_cordon_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "precious"
    target.write_text("keep me")
    (state / "cordons.json.lock").symlink_to(target)
    with pytest.raises(CordonStateError, match="cordon lock"):
        CordonStore(state).cordon("GPU-a", "fan")
    assert target.read_text() == "keep me", "root must not truncate what the link names"
    assert not (state / "cordons.json").exists()


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe{}", b"[" * 100_000, b'{"GPU-a": {"reason": "' + b"x" * (2 << 20) + b'", "time": 0}}'],
    ids=["not-utf8", "deeply-nested", "oversized"],
)
def test_an_unreadable_cordon_file_is_one_short_clear_error(tmp_path: Path, body: bytes) -> None:
    (tmp_path / "cordons.json").write_bytes(body)
    with pytest.raises(CordonFileError) as err:
        CordonStore(tmp_path).load()
    assert str(tmp_path / "cordons.json") in str(err.value) and len(str(err.value)) < 500


def test_a_state_dir_under_a_file_has_no_cordons_and_refuses_writes(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = CordonStore(tmp_path / "file" / "state")
    assert store.load() == {}
    with pytest.raises(CordonStateError, match="cannot create the state dir"):
        store.cordon("GPU-a", "fan")


def test_a_cordon_reason_too_long_for_the_file_is_refused(tmp_path: Path) -> None:
    store = CordonStore(tmp_path)
    with pytest.raises(CordonFileError, match="at most 1024"):
        store.cordon("GPU-a", "x" * 5000)
    assert store.load() == {}


def test_a_fifo_as_the_cordon_file_is_one_clear_error_not_a_blocked_monitor(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "cordons.json")  # no writer: an open() for reading would block the monitor's loop
    with pytest.raises(CordonFileError, match="not a regular file \\(a FIFO\\)"):
        CordonStore(tmp_path).load()


def test_a_symlink_planted_as_the_cordon_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text('{"GPU-a": {"reason": "planted", "time": 0}}')
    state = tmp_path / "state"
    state.mkdir()
    (state / "cordons.json").symlink_to(target)
    with pytest.raises(CordonFileError, match="a symlink"):
        CordonStore(state).load()
