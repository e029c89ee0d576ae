"""DRA_DEVICES: which GPUs Kubernetes DRA serves, and the plugin-server leaving exactly those out, so
that a GPU is offered through one API only (the DRA side's own set: tests/unit/test_dra_pool.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.bus.messages import DeviceState, HealthState
from common.settings import DraDevices, SettingsError, resolve
from common.settings.dra import dra_devices
from services.plugin_server.device_table import GPU_RESOURCE, MigConfigError, build_resources
from tests.conftest import discovered

GPU6 = "GPU-930bc548-4e27-0432-876f-a3553ef2f53f"  # MIG-enabled: 2 x 3g.40gb
GPU7 = "GPU-5a20cdd2-88f7-7505-15b6-a96180636b05"  # MIG-enabled: 7 x 1g.10gb


@pytest.fixture(scope="module")
def fleet() -> list[DeviceState]:
    """The MIG fleet as the health-monitor discovers it: 8 H100s, GPUs 6 and 7 split into MIG devices."""
    return discovered("dgx-h100-8-mig")


def state(devices: list[DeviceState]) -> HealthState:
    return HealthState(incarnation="h", seq=1, sent_at=1.0, nvml_ok=True, error="", driver_version="580.159.04",
                       devices=devices)


@pytest.mark.parametrize(("raw", "shown"), [
    ("none", "none"), ("", "none"), (" NONE ", "none"), ("all", "all"), ("All", "all"),
    ("0", "0"), ("3, 1,03", "1,3"), ([2, "0"], "0,2"),
    (f"{GPU6.upper()},0", f"0,{GPU6}"),  # NVML's UUIDs are lower-case hex
])
def test_values(raw: object, shown: str) -> None:
    assert str(dra_devices(raw, "t")) == shown


@pytest.mark.parametrize("raw", ["all,0", "0,none", "MIG-f8278113-16f9-207e-4242-d0971f6d9e07", "gpu0", "-1",
                                 "0,,1", [True], [1.5], "GPU-1234", "12345"])
def test_refused(raw: object) -> None:
    with pytest.raises(SettingsError):
        dra_devices(raw, "t")


def test_serves_by_index_or_uuid() -> None:
    sel = dra_devices(f"1,{GPU6.upper()}", "t")
    assert sel.serves("1", "GPU-x") and sel.serves("6", GPU6) and sel.serves("9", GPU6.upper())
    assert not sel.serves("2", "GPU-y")
    assert DraDevices().none and not DraDevices().serves("0", GPU6)
    assert DraDevices(every=True).serves("5", "GPU-z")


def test_flag_environment_and_config_file(tmp_path: Path) -> None:
    assert resolve(environ={}).dra_devices.none  # the default: the device plugin offers every GPU
    cfg = tmp_path / "c.yaml"
    cfg.write_text("version: v1\ndra:\n  devices: [0, 1]\n")
    assert str(resolve(environ={"CONFIG_FILE": str(cfg)}).dra_devices) == "0,1"
    assert str(resolve(environ={"CONFIG_FILE": str(cfg), "DRA_DEVICES": "all"}).dra_devices) == "all"
    with pytest.raises(SettingsError, match=r"DRA_DEVICES.*MIG"):
        resolve(environ={"DRA_DEVICES": "MIG-f8278113-16f9-207e-4242-d0971f6d9e07"})


def ids(resources: dict[str, list]) -> dict[str, list[str]]:  # type: ignore[type-arg]
    return {name: sorted(d.id for d in devices) for name, devices in resources.items()}


def test_the_plugin_server_leaves_the_dra_gpus_out(fleet: list[DeviceState]) -> None:
    gpus = [d for d in fleet if d.kind == "gpu"]
    everything = ids(build_resources(state(fleet), resolve(environ={"MIG_STRATEGY": "mixed"})))
    assert set(everything) == {GPU_RESOURCE, "nvidia.com/mig-3g.40gb", "nvidia.com/mig-1g.10gb"}
    # GPU 0 by index and GPU 7 by UUID: GPU 0 leaves nvidia.com/gpu, GPU 7 takes its 1g.10gb MIG devices along.
    split = ids(build_resources(state(fleet), resolve(environ={"MIG_STRATEGY": "mixed", "DRA_DEVICES": f"0,{GPU7}"})))
    assert split[GPU_RESOURCE] == sorted(g.id for g in gpus[1:6])
    assert split["nvidia.com/mig-3g.40gb"] == everything["nvidia.com/mig-3g.40gb"]
    assert "nvidia.com/mig-1g.10gb" not in split
    # MIG strategy none serves GPUs whole: the same GPUs go.
    whole = ids(build_resources(state(fleet), resolve(environ={"DRA_DEVICES": f"0,{GPU7}"})))
    assert whole == {GPU_RESOURCE: sorted(g.id for g in gpus[1:7])}
    # All: the device plugin offers nothing; none: everything, as before.
    assert build_resources(state(fleet), resolve(environ={"DRA_DEVICES": "all"})) == {}
    assert ids(build_resources(state(fleet), resolve(environ={"MIG_STRATEGY": "mixed", "DRA_DEVICES": "none"}))) \
        == everything


def test_strategy_single_applies_to_the_gpus_left(fleet: list[DeviceState]) -> None:
    # Single needs every GPU in MIG mode: with GPUs 0-5 given to DRA, the node's rest (6 and 7) is all MIG,
    # but of two profiles, which single still refuses: the strategy judges what the plugin serves.
    with pytest.raises(MigConfigError, match="one profile"):
        build_resources(state(fleet), resolve(environ={"MIG_STRATEGY": "single", "DRA_DEVICES": "0,1,2,3,4,5"}))
    single = build_resources(state(fleet), resolve(environ={"MIG_STRATEGY": "single",
                                                            "DRA_DEVICES": "0,1,2,3,4,5,6"}))
    assert len(single[GPU_RESOURCE]) == 7 and all(d.parent is not None for d in single[GPU_RESOURCE])


def test_mps_daemons_run_on_the_gpus_the_device_plugin_shares_with_mps_and_none_that_dra_serves(
        fleet: list[DeviceState], tmp_path: Path) -> None:
    """mps-control numbers the GPUs a sharing rule counts as the plugin-server does: after DRA's are
    left out. A rule taking the first 2 GPUs must start daemons on the GPUs whose replicas are
    served, not on a GPU DRA holds."""
    from common.settings import resolve as settings_of
    from services.mps_control.control import plan
    from services.plugin_server.device_table import MpsReadiness

    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n"
                      "      rename: nvidia.com/gpu.shared\n      replicas: 2\n      devices: 2\n",
                      encoding="utf-8")
    settings = settings_of(environ={"CONFIG_FILE": str(config), "DRA_DEVICES": "0,2"})
    whole = [d for d in fleet if d.kind == "gpu" and not d.mig_enabled] + [d for d in fleet if d.kind == "mig"]
    assert settings.sharing.mps is not None
    planned = plan(settings.sharing.mps, state(whole), settings.dra_devices)
    daemon_gpus = {g.index for _, _, gpus in planned for g in gpus}
    assert daemon_gpus == {"1", "3"}, "the first 2 of the GPUs left to the device plugin"
    ready = MpsReadiness({"nvidia.com/gpu.shared": True}, {"nvidia.com/gpu.shared"})
    served = build_resources(state(whole), settings, ready)["nvidia.com/gpu.shared"]
    assert {d.device.index for d in served} == daemon_gpus


def test_gpus_of_devices_dra_claims_hold_are_left_out_whatever_the_split(fleet: list[DeviceState],
                                                                          tmp_path: Path) -> None:
    """The dra-plugin's record, as its writer encodes it, read by the plugin-server: the devices prepared for
    claims (admin access left out), and their GPUs out of every resource (a MIG device takes its GPU)."""
    from common import dra_checkpoint as cp
    from services.plugin_server import dra_claims

    gpus = [d for d in fleet if d.kind == "gpu"]
    mig7 = next(d for d in fleet if d.kind == "mig" and d.parent == GPU7)

    def dev(name: str, uuid: str, admin: bool = False) -> cp.PreparedDevice:
        return cp.PreparedDevice(("gpus",), "node-1", name, uuid, (f"k8s.gpu.nvidia.com/claim=u-{name}",), admin)

    data = cp.encode({"u1": cp.Entry("u1", "default", "a", cp.COMPLETED, (dev("gpu-0", gpus[0].id),
                                                                            dev("gpu-7-mig-1-0", mig7.id))),
                      "u2": cp.Entry("u2", "default", "b", cp.STARTED, (dev("gpu-1", gpus[1].id, admin=True),))})
    claimed = dra_claims.claimed_ids(data)
    assert claimed == {gpus[0].id, mig7.id}
    got = ids(build_resources(state(fleet), resolve(environ={"MIG_STRATEGY": "mixed"}), dra_claimed=claimed))
    assert got[GPU_RESOURCE] == sorted(g.id for g in gpus[1:6])
    assert "nvidia.com/mig-1g.10gb" not in got and "nvidia.com/mig-3g.40gb" in got
    with pytest.raises(cp.CheckpointError, match="version 3"):
        dra_claims.claimed_ids(b'{"version": 3, "claims": {}}')
