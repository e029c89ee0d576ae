"""NVIDIA's settings beyond the basic table: each is served, or refused at start with the reason.

Names, aliases and rules as NVIDIA's plugin (cmd/nvidia-device-plugin/main.go, api/config/v1):
NVIDIA_CDI_HOOK_PATH / NVIDIA_CTK_PATH, DRIVER_ROOT_CTR_PATH / CONTAINER_DRIVER_ROOT, GDRCOPY_ENABLED, GDS_ENABLED,
MOFED_ENABLED, IMEX_CHANNEL_IDS ([] or [0]) and IMEX_REQUIRED, DEVICE_DISCOVERY_STRATEGY, MPS_ROOT.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest

from common.settings import SettingsError, add_arguments, resolve
from services.cli import _parser as cli_parser
from services.cli import main as cli_main


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def _file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\n" + text, encoding="utf-8")
    return {"CONFIG_FILE": str(path)}


def test_defaults_are_nvidias() -> None:
    s = resolve(environ={})
    assert (s.container_driver_root, s.cdi_hook_path) == ("/driver-root", "/usr/bin/nvidia-ctk")
    assert (s.gds_enabled, s.mofed_enabled, s.imex_channel_ids, s.imex_required) == (False, False, (), False)
    assert (s.device_discovery_strategy, s.cdi_feature_flags, s.mps_root) == ("auto", (), None)


CASES: list[tuple[str, list[str], dict[str, str], str, str, Any]] = [
    ("hook-env", [], {"NVIDIA_CDI_HOOK_PATH": "/opt/bin/nvidia-cdi-hook"}, "", "cdi_hook_path",
     "/opt/bin/nvidia-cdi-hook"),
    ("hook-old-env", [], {"NVIDIA_CTK_PATH": "/opt/nvidia-ctk"}, "", "cdi_hook_path", "/opt/nvidia-ctk"),
    ("hook-new-env-wins", [], {"NVIDIA_CTK_PATH": "/a/nvidia-ctk", "NVIDIA_CDI_HOOK_PATH": "/b/nvidia-ctk"}, "",
     "cdi_hook_path", "/b/nvidia-ctk"),
    ("hook-file", [], {}, "flags:\n  plugin:\n    nvidiaCTKPath: /f/nvidia-ctk\n", "cdi_hook_path", "/f/nvidia-ctk"),
    ("hook-old-flag", ["--nvidia-ctk-path", "/g/nvidia-ctk"], {}, "", "cdi_hook_path", "/g/nvidia-ctk"),
    ("ctr-root-env", [], {"DRIVER_ROOT_CTR_PATH": "/host-driver"}, "", "container_driver_root", "/host-driver"),
    ("ctr-root-old-env", [], {"CONTAINER_DRIVER_ROOT": "/old"}, "", "container_driver_root", "/old"),
    ("ctr-root-file", [], {}, "flags:\n  plugin:\n    containerDriverRoot: /f\n", "container_driver_root", "/f"),
    ("gds-env", [], {"GDS_ENABLED": "true"}, "", "gds_enabled", True),
    ("gds-file", [], {}, "flags:\n  gdsEnabled: true\n", "gds_enabled", True),
    ("gds-bare-flag", ["--gds-enabled"], {}, "", "gds_enabled", True),
    ("mofed-env", [], {"MOFED_ENABLED": "1"}, "", "mofed_enabled", True),
    ("mofed-file", [], {}, "flags:\n  mofedEnabled: true\n", "mofed_enabled", True),
    ("imex-env", [], {"IMEX_CHANNEL_IDS": "0"}, "", "imex_channel_ids", (0,)),
    ("imex-file", [], {}, "imex:\n  channelIDs: [0]\n  required: true\n", "imex_channel_ids", (0,)),
    ("imex-required-file", [], {}, "imex:\n  channelIDs: [0]\n  required: true\n", "imex_required", True),
    ("imex-required-bare-flag", ["--imex-required"], {}, "", "imex_required", True),
    ("imex-empty", [], {"IMEX_CHANNEL_IDS": ""}, "", "imex_channel_ids", ()),
    ("discovery-nvml", [], {"DEVICE_DISCOVERY_STRATEGY": "nvml"}, "", "device_discovery_strategy", "nvml"),
    ("discovery-file", [], {}, "flags:\n  deviceDiscoveryStrategy: auto\n", "device_discovery_strategy", "auto"),
    ("mps-root-env", [], {"MPS_ROOT": "/run/nvidia/mps"}, "", "mps_root", "/run/nvidia/mps"),
    ("mps-root-flag", ["--mps-root", "/mps"], {}, "", "mps_root", "/mps"),
    ("cdi-feature-flags-empty", [], {"CDI_FEATURE_FLAGS": ""}, "", "cdi_feature_flags", ()),
    ("gdrcopy-false", [], {"GDRCOPY_ENABLED": "false"}, "", "gdrcopy_enabled", False),
    # What the GPU Operator's entrypoint sets on every node where the gdrdrv module is loaded.
    ("gdrcopy-env", [], {"GDRCOPY_ENABLED": "true"}, "", "gdrcopy_enabled", True),
    ("gdrcopy-flag", ["--gdrcopy-enabled"], {}, "", "gdrcopy_enabled", True),
    ("gdrcopy-file", [], {}, "flags:\n  gdrcopyEnabled: true\n", "gdrcopy_enabled", True),
]


@pytest.mark.parametrize(("argv", "env", "text", "attr", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_served(tmp_path: Path, argv: list[str], env: dict[str, str], text: str, attr: str, expected: Any) -> None:
    environ = {**env, **(_file(tmp_path, text) if text else {})}
    assert getattr(resolve(_parse(argv), environ=environ), attr) == expected


REFUSED: list[tuple[str, dict[str, str], str, str]] = [
    ("imex-channel-1", {"IMEX_CHANNEL_IDS": "1"}, "", "channelIDs must be [] or [0]"),
    ("imex-two-channels", {}, "imex:\n  channelIDs: [0, 1]\n", "channelIDs must be [] or [0]"),
    ("imex-not-a-number", {"IMEX_CHANNEL_IDS": "zero"}, "", "not a list of IMEX channel IDs"),
    ("discovery-tegra", {"DEVICE_DISCOVERY_STRATEGY": "tegra"}, "", "tegra is not served"),
    ("discovery-bogus", {"DEVICE_DISCOVERY_STRATEGY": "bogus"}, "", "is not one of auto, nvml, tegra"),
    ("cdi-feature-flags", {"CDI_FEATURE_FLAGS": "disable-ipc-discoverer"}, "",
     "CDI_FEATURE_FLAGS): disable-ipc-discoverer: nvcdi feature flags are not implemented"),
    ("gdrcopy-not-a-bool", {"GDRCOPY_ENABLED": "maybe"}, "", "GDRCOPY_ENABLED"),
    ("hook-relative", {"NVIDIA_CDI_HOOK_PATH": "nvidia-ctk"}, "", "is not an absolute path"),
    ("resources", {}, "resources:\n  gpus:\n  - pattern: '*'\n    name: gpu\n",
     "resources: custom resource naming is not supported"),
]


@pytest.mark.parametrize(("env", "text", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused(tmp_path: Path, env: dict[str, str], text: str, message: str) -> None:
    environ = {**env, **(_file(tmp_path, text) if text else {})}
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        resolve(_parse([]), environ=environ)


def test_imex_and_flags_file_keys_are_known(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = ("flags:\n  gdsEnabled: false\n  mofedEnabled: false\n  mpsRoot: /run/nvidia/mps\n"
            "imex:\n  channelIDs: []\n  required: false\n")
    with caplog.at_level(logging.WARNING):
        resolve(_parse([]), environ=_file(tmp_path, text))
    assert "unknown key" not in caplog.text


def test_unknown_imex_key_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        resolve(_parse([]), environ=_file(tmp_path, "imex:\n  channelIds: [0]\n"))
    assert "config file: unknown key imex.channelIds is ignored" in caplog.text


def test_cli_accepts_mps_root_and_refuses_tegra(capsys: pytest.CaptureFixture[str]) -> None:
    # --mps-root used to end the CLI with exit 2 (unknown flag); the GPU Operator always passes MPS_ROOT.
    for service in ("health-monitor", "plugin-server", "registrar"):
        args = cli_parser().parse_args([service, "--mps-root", "/run/nvidia/mps"])
        assert resolve(args, environ={}).mps_root == "/run/nvidia/mps"
    assert cli_main(["status", "--device-discovery-strategy", "tegra"]) == 2
    assert "tegra is not served" in capsys.readouterr().err
