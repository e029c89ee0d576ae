"""sharing.mps as NVIDIA validates it (replicas >= 2, no MIG, not with the mixed strategy, at most
48 clients per GPU, failRequestsGreaterThanOne true by default), and MPS beside time-slicing on
other GPUs: refused where both would share one GPU or one resource name."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.settings import DEFAULT_MPS_ROOT, SettingsError, resolve


def load(tmp_path: Path, text: str, **env: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\n" + text)
    return resolve(environ={"CONFIG_FILE": str(path), **env})


MPS8 = "sharing:\n  mps:\n    resources:\n    - {name: nvidia.com/gpu, rename: nvidia.com/gpu-mps, replicas: 4}\n"


def test_mps_is_parsed_with_nvidia_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, MPS8)
    assert s.sharing.mps is not None and s.sharing.time_slicing is None
    res = s.sharing.mps.resources[0]
    assert (res.name, res.replicas, res.devices) == ("nvidia.com/gpu", 4, None)
    assert s.sharing.mps.served_name(res) == "nvidia.com/gpu-mps"
    # NVIDIA: MPS fails requests of more than one replica unless told otherwise.
    assert s.sharing.mps.fail_requests_greater_than_one is True
    assert (s.mps_host_root, s.mps_container_root) == (DEFAULT_MPS_ROOT, "/mps")
    assert load(tmp_path, MPS8, MPS_ROOT="/var/mps").mps_host_root == "/var/mps"


def test_mps_can_relax_fail_requests_greater_than_one(tmp_path: Path) -> None:
    s = load(tmp_path, "sharing:\n  mps:\n    failRequestsGreaterThanOne: false\n    resources:\n"
                       "    - {name: nvidia.com/gpu, replicas: 2}\n")
    assert s.sharing.mps is not None and s.sharing.mps.fail_requests_greater_than_one is False


def test_mps_beside_time_slicing_on_other_gpus(tmp_path: Path) -> None:
    s = load(tmp_path, "sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [4, 5]}]}\n"
                       "  mps: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/gpu-mps, replicas: 2, "
                       "devices: [0, 1]}]}\n")
    assert s.sharing.time_slicing is not None and s.sharing.mps is not None
    assert s.sharing.kind == "timeSlicing" and s.sharing.resources == s.sharing.time_slicing.resources


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sharing:\n  mps: {resources: [{name: nvidia.com/gpu, replicas: 1}]}\n",
         "sharing.mps.resources[0].replicas: 1 must be an integer >= 2"),
        ("sharing:\n  mps: {resources: [{name: nvidia.com/gpu, replicas: 49}]}\n",
         "sharing.mps.resources[0].replicas: 49: maximum allowed replicas exceeded"),
        ("sharing:\n  mps: {resources: [{name: nvidia.com/mig-1g.10gb, replicas: 2}]}\n",
         "sharing using MPS is not supported for MIG devices"),
        ("sharing:\n  mps: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/x, replicas: 2, "
         "devices: ['0:1']}]}\n",
         "sharing.mps.resources[0].devices: 0:1: sharing using MPS is not supported for MIG devices"),
        ("sharing:\n  mps: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [0, 1]}]}\n",
         "a device selection for MPS needs rename"),
        ("flags: {migStrategy: mixed}\nsharing:\n  mps: {resources: [{name: nvidia.com/gpu, replicas: 2}]}\n",
         "using --mig-strategy=mixed is not supported with MPS"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [0, 1]}]}\n"
         "  mps: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/m, replicas: 2, devices: [1, 2]}]}\n",
         "mutually exclusive on a GPU: both select GPU 1 of nvidia.com/gpu"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: 2}]}\n"
         "  mps: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/m, replicas: 2, devices: [1]}]}\n",
         "both select GPU 1 of nvidia.com/gpu"),
        ("sharing:\n  timeSlicing: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/m, replicas: 2, "
         "devices: [0]}]}\n  mps: {resources: [{name: nvidia.com/gpu, rename: nvidia.com/m, replicas: 2, "
         "devices: [1]}]}\n", "cannot be served under one name (nvidia.com/m)"),
        ("sharing:\n  mps: {resources: []}\n", "sharing.mps.resources: expected a non-empty list"),
    ],
    ids=["replicas-1", "replicas-49", "mig-name", "mig-index", "selection-without-rename", "mixed",
         "overlap-index", "overlap-count", "same-name", "empty"],
)
def test_bad_mps_configs_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(tmp_path, text)
    assert message in str(err.value)
