"""What a node gets is the product only: the wheel the image installs holds no development
tool, and the operator's command lists only what runs on a node."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common.lifecycle import EX_CONFIG
from tests.conftest import REPO

DEV_ONLY = ("devtools/", "kubelet_simulator", "devstack", "nvml_sim", "fleets/", "simulated")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The product's wheel, built as the image builds it (`pip install .`)."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             ".*_cache", "bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("gpu_device_plugin-*.whl")
    return zipfile.ZipFile(path)


def test_the_product_wheel_holds_no_development_tool(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert any(n.startswith("services/health_monitor/") for n in names), "the wheel is the product"
    assert [n for n in names if any(d in n for d in DEV_ONLY)] == []


def test_the_product_wheel_installs_only_the_operator_command(wheel: zipfile.ZipFile) -> None:
    """gpu-plugin, the four command names NVIDIA's chart and the GPU Operator start containers of the
    image with, and the supervisord the entry point runs."""
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert text.split() == ["[console_scripts]", "config-manager", "=", "services.config_manager:main",
                            "gpu-feature-discovery", "=", "services.feature_discovery.cli:main",
                            "gpu-plugin", "=", "services.cli:main",
                            "gpu-plugin-supervisord", "=", "services.supervisord:main",
                            "mps-control-daemon", "=", "services.mps_control.nvidia_daemon:main",
                            "nvidia-device-plugin", "=", "services.nvidia_entry:main"]


def test_gpu_plugin_help_lists_only_what_an_operator_uses_on_a_node() -> None:
    out = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0
    for command in ("health-monitor", "plugin-server", "registrar", "bus", "status", "cordon", "uncordon"):
        assert command in out.stdout
    for dev in ("inject", "kubelet-sim"):
        assert dev not in out.stdout


@pytest.mark.parametrize("module", ["services.health_monitor", "services.plugin_server", "services.registrar"])
def test_each_service_runs_as_a_module_and_a_bad_setting_is_permanent(module: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--mig-strategy", "bogus", "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == EX_CONFIG, out.stderr
    assert "mig_strategy" in out.stderr and "'bogus' is not one of none, single, mixed" in out.stderr


def test_the_simulated_backend_is_a_clear_permanent_error_without_the_devtools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.lifecycle import PermanentError
    from common.nvml import factory
    from common.settings import resolve

    settings = resolve(environ={"NVML_BACKEND": "simulated", "GPU_PLUGIN_RUN_DIR": str(tmp_path)})
    monkeypatch.setattr(factory, "BACKEND_GROUP", "gpu_plugin.no_such_group")  # as in the image
    with pytest.raises(PermanentError, match="comes with the development tools"):
        factory.make_backend(settings)


def test_bus_tail_refuses_a_topic_the_publisher_would_hang_up_on(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "services.cli", "bus", "tail", "--topic", "x" * 300, "--timeout", "5",
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "topics are at most 255 bytes" in out.stderr
