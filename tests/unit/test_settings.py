"""Settings: flag > environment > config file > default, NVIDIA's v1 config keys, clear rejections."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from common.settings import (
    DEFAULT_DEVICE_PLUGIN_DIR,
    DEFAULT_KUBELET_SOCKET,
    Settings,
    SettingsError,
    add_arguments,
    resolve,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _resolve(tmp_path: Path, argv: list[str], env: dict[str, str], config: str | None) -> Settings:
    environ = dict(env)
    if config is not None:
        environ["CONFIG_FILE"] = _config(tmp_path, config)
    return resolve(_parse(argv), environ=environ)


# setting, flag, env var, config file text (version v1), default, file value, env value, flag value
PRECEDENCE: list[tuple[str, str, str, str, Any, Any, Any, Any]] = [
    ("mig_strategy", "--mig-strategy", "MIG_STRATEGY", "flags:\n  migStrategy: single\n",
     "none", "single", "mixed", "none"),
    ("fail_on_init_error", "--fail-on-init-error", "FAIL_ON_INIT_ERROR", "flags:\n  failOnInitError: false\n",
     True, False, True, False),
    ("driver_root", "--driver-root", "NVIDIA_DRIVER_ROOT", "flags:\n  nvidiaDriverRoot: /file\n",
     "/", "/file", "/env", "/flag"),
    ("pass_device_specs", "--pass-device-specs", "PASS_DEVICE_SPECS",
     "flags:\n  plugin:\n    passDeviceSpecs: true\n", False, True, False, True),
    ("device_list_strategy", "--device-list-strategy", "DEVICE_LIST_STRATEGY",
     "flags:\n  plugin:\n    deviceListStrategy: volume-mounts\n",
     ("envvar",), ("volume-mounts",), ("cdi-annotations",), ("envvar", "cdi-cri")),
    ("device_id_strategy", "--device-id-strategy", "DEVICE_ID_STRATEGY",
     "flags:\n  plugin:\n    deviceIDStrategy: index\n", "uuid", "index", "uuid", "index"),
    ("kubelet_socket", "--kubelet-socket", "KUBELET_SOCKET",
     "flags:\n  plugin:\n    kubeletSocket: /file/kubelet.sock\n",
     DEFAULT_KUBELET_SOCKET, "/file/kubelet.sock", "/env/kubelet.sock", "/flag/kubelet.sock"),
]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


@pytest.mark.parametrize(
    ("name", "flag", "env", "config", "default", "file_value", "env_value", "flag_value"),
    PRECEDENCE,
    ids=[p[0] for p in PRECEDENCE],
)
@pytest.mark.parametrize(
    ("use_file", "use_env", "use_flag", "expect"),
    [
        (False, False, False, "default"),
        (True, False, False, "file"),
        (True, True, False, "env"),
        (False, True, False, "env"),
        (True, True, True, "flag"),
        (True, False, True, "flag"),
        (False, False, True, "flag"),
    ],
    ids=["default", "file", "env-over-file", "env", "flag-over-all", "flag-over-file", "flag"],
)
def test_precedence(
    tmp_path: Path,
    name: str,
    flag: str,
    env: str,
    config: str,
    default: Any,
    file_value: Any,
    env_value: Any,
    flag_value: Any,
    use_file: bool,
    use_env: bool,
    use_flag: bool,
    expect: str,
) -> None:
    argv = [f"{flag}={_text(flag_value)}"] if use_flag else []
    environ = {env: _text(env_value)} if use_env else {}
    settings = _resolve(tmp_path, argv, environ, "version: v1\n" + config if use_file else None)
    expected = {"default": default, "file": file_value, "env": env_value, "flag": flag_value}[expect]
    assert getattr(settings, name) == expected


def test_config_file_from_flag_beats_env(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: v1\nflags:\n  migStrategy: single\n")
    (tmp_path / "b.yaml").write_text("version: v1\nflags:\n  migStrategy: mixed\n")
    settings = resolve(
        _parse([f"--config-file={tmp_path / 'a.yaml'}"]), environ={"CONFIG_FILE": str(tmp_path / "b.yaml")}
    )
    assert settings.mig_strategy == "single"
    assert settings.config_file == str(tmp_path / "a.yaml")


NVIDIA_CONFIG = """\
version: v1
flags:
  migStrategy: mixed
  failOnInitError: false
  nvidiaDriverRoot: /run/nvidia/driver
  plugin:
    passDeviceSpecs: true
    deviceListStrategy: {dls}
    deviceIDStrategy: index
sharing:
  timeSlicing:
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"""


@pytest.mark.parametrize(
    ("dls", "expected"),
    [
        ("envvar", ("envvar",)),
        ("volume-mounts", ("volume-mounts",)),
        ('"envvar,volume-mounts"', ("envvar", "volume-mounts")),
        ("[envvar, volume-mounts]", ("envvar", "volume-mounts")),
        ("[cdi-annotations, cdi-cri, cdi-annotations]", ("cdi-annotations", "cdi-cri")),
        ("\n      - volume-mounts\n      - envvar", ("volume-mounts", "envvar")),
    ],
    ids=["string", "string-volume-mounts", "comma-string", "flow-list", "list-deduplicated", "block-list"],
)
def test_nvidia_v1_config_keys(tmp_path: Path, dls: str, expected: tuple[str, ...]) -> None:
    settings = _resolve(tmp_path, [], {}, NVIDIA_CONFIG.format(dls=dls))
    assert settings.mig_strategy == "mixed"
    assert settings.fail_on_init_error is False
    assert settings.driver_root == "/run/nvidia/driver"
    assert settings.dev_root == "/run/nvidia/driver"
    assert settings.pass_device_specs is True
    assert settings.device_list_strategy == expected
    assert settings.device_id_strategy == "index"


def test_defaults() -> None:
    settings = resolve(_parse([]), environ={})
    assert settings.config_file is None
    assert settings.mig_strategy == "none"
    assert settings.fail_on_init_error is True
    assert settings.driver_root == "/"
    assert settings.dev_root == "/"
    assert settings.pass_device_specs is False
    assert settings.device_list_strategy == ("envvar",)
    assert settings.device_id_strategy == "uuid"
    assert settings.kubelet_socket == DEFAULT_KUBELET_SOCKET
    assert settings.device_plugin_dir == Path(DEFAULT_DEVICE_PLUGIN_DIR)


def test_resolve_without_args() -> None:
    assert resolve(environ={"MIG_STRATEGY": "single"}).mig_strategy == "single"


@pytest.mark.parametrize(
    ("argv", "environ", "driver_root", "dev_root"),
    [
        ([], {}, "/", "/"),
        ([], {"NVIDIA_DRIVER_ROOT": "/run/nvidia/driver"}, "/run/nvidia/driver", "/run/nvidia/driver"),
        (["--nvidia-driver-root=/drv"], {}, "/drv", "/drv"),
        (["--driver-root=/drv", "--dev-root=/dev-host"], {}, "/drv", "/dev-host"),
        ([], {"NVIDIA_DRIVER_ROOT": "/drv", "NVIDIA_DEV_ROOT": "/"}, "/drv", "/"),
        (["--nvidia-dev-root=/d"], {}, "/", "/d"),
    ],
    ids=["defaults", "env-driver-root", "flag-alias", "both-flags", "both-env", "dev-root-alias"],
)
def test_dev_root_defaults_to_driver_root(
    argv: list[str], environ: dict[str, str], driver_root: str, dev_root: str
) -> None:
    settings = resolve(_parse(argv), environ=environ)
    assert settings.driver_root == driver_root
    assert settings.dev_root == dev_root


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, Path("/var/lib/kubelet/device-plugins")),
        ({"KUBELET_SOCKET": "/tmp/k/kubelet.sock"}, Path("/tmp/k")),
        ({"KUBELET_SOCKET": ""}, Path("/var/lib/kubelet/device-plugins")),
        ({"KUBELET_SOCKET": "/tmp/k/kubelet.sock", "DEVICE_PLUGIN_DIR": "/srv/dp"}, Path("/srv/dp")),
        ({"KUBELET_SOCKET": "", "DEVICE_PLUGIN_DIR": "/srv/dp"}, Path("/srv/dp")),
    ],
    ids=["default", "kubelet-socket-dir", "no-registration", "explicit", "explicit-no-registration"],
)
def test_device_plugin_dir(environ: dict[str, str], expected: Path) -> None:
    settings = resolve(_parse([]), environ=environ)
    assert settings.device_plugin_dir == expected
    assert isinstance(settings.device_plugin_dir, Path)


def test_kubelet_socket_empty_means_no_registration() -> None:
    assert resolve(_parse(["--kubelet-socket="]), environ={"KUBELET_SOCKET": "/x/kubelet.sock"}).kubelet_socket == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), (" 1 ", True), ("yes", True), ("on", True),
     ("false", False), ("False", False), ("0", False), ("no", False), ("off", False)],
    ids=["true", "TRUE", "1", "yes", "on", "false", "False", "0", "no", "off"],
)
def test_bool_spellings(value: str, expected: bool) -> None:
    assert resolve(_parse([]), environ={"PASS_DEVICE_SPECS": value}).pass_device_specs is expected


# (argv, environ, config text or None, words the message must contain)
REJECTIONS: list[tuple[str, list[str], dict[str, str], str | None, list[str]]] = [
    ("bogus-mig-env", [], {"MIG_STRATEGY": "bogus"}, None,
     ["mig_strategy", "MIG_STRATEGY", "'bogus'", "none, single, mixed"]),
    ("bogus-mig-flag", ["--mig-strategy=Single"], {}, None,
     ["mig_strategy", "--mig-strategy", "'Single'", "none, single, mixed"]),
    ("bogus-mig-file", [], {}, "version: v1\nflags:\n  migStrategy: bogus\n",
     ["mig_strategy", "flags.migStrategy", "'bogus'", "none, single, mixed"]),
    ("mig-not-a-string-in-file", [], {}, "version: v1\nflags:\n  migStrategy: 3\n",
     ["mig_strategy", "flags.migStrategy", "none, single, mixed"]),
    ("bogus-device-list-in-list", [], {},
     "version: v1\nflags:\n  plugin:\n    deviceListStrategy: [envvar, bogus]\n",
     ["device_list_strategy", "flags.plugin.deviceListStrategy", "'bogus'",
      "envvar, volume-mounts, cdi-annotations, cdi-cri"]),
    ("bogus-device-list-in-env-list", [], {"DEVICE_LIST_STRATEGY": "envvar,bogus"}, None,
     ["device_list_strategy", "DEVICE_LIST_STRATEGY", "'bogus'",
      "envvar, volume-mounts, cdi-annotations, cdi-cri"]),
    ("empty-device-list", [], {}, "version: v1\nflags:\n  plugin:\n    deviceListStrategy: []\n",
     ["device_list_strategy", "envvar, volume-mounts, cdi-annotations, cdi-cri"]),
    ("empty-device-list-env", [], {"DEVICE_LIST_STRATEGY": ""}, None,
     ["device_list_strategy", "envvar, volume-mounts, cdi-annotations, cdi-cri"]),
    ("bogus-device-id", [], {"DEVICE_ID_STRATEGY": "serial"}, None,
     ["device_id_strategy", "'serial'", "uuid, index"]),
    ("bogus-bool-env", [], {"FAIL_ON_INIT_ERROR": "maybe"}, None,
     ["fail_on_init_error", "FAIL_ON_INIT_ERROR", "'maybe'", "true or false"]),
    ("bogus-bool-file", [], {}, "version: v1\nflags:\n  plugin:\n    passDeviceSpecs: sometimes\n",
     ["pass_device_specs", "flags.plugin.passDeviceSpecs", "'sometimes'", "true or false"]),
    ("bogus-backend", [], {"NVML_BACKEND": "fake"}, None, ["nvml_backend", "'fake'", "real, simulated"]),
    ("bogus-log-level", ["--log-level=trace"], {}, None,
     ["log_level", "'trace'", "debug, info, warning, error"]),
    ("driver-root-a-list", [], {}, "version: v1\nflags:\n  nvidiaDriverRoot: [/a]\n",
     ["driver_root", "flags.nvidiaDriverRoot", "not a string"]),
    ("config-version-v2", [], {}, "version: v2\nflags: {}\n", ["config file", "version", "'v2'", "v1"]),
    ("config-version-missing", [], {}, "flags:\n  migStrategy: single\n", ["config file", "version", "None", "v1"]),
    ("config-version-number", [], {}, "version: 1\n", ["config file", "version", "v1"]),
    ("config-not-a-mapping", [], {}, "- version: v1\n", ["config file", "mapping"]),
    ("config-a-scalar", [], {}, "v1\n", ["config file", "mapping"]),
    ("config-invalid-yaml", [], {}, "version: v1\nflags: {migStrategy: [\n", ["config file", "not valid YAML"]),
]


@pytest.mark.parametrize(
    ("argv", "environ", "config", "words"),
    [r[1:] for r in REJECTIONS],
    ids=[r[0] for r in REJECTIONS],
)
def test_rejections(
    tmp_path: Path, argv: list[str], environ: dict[str, str], config: str | None, words: list[str]
) -> None:
    with pytest.raises(SettingsError) as err:
        _resolve(tmp_path, argv, environ, config)
    for word in words:
        assert word in str(err.value)
    if config is not None and "config file" in words:
        assert str(tmp_path / "config.yaml") in str(err.value)


@pytest.mark.parametrize("how", ["env", "flag"], ids=["env", "flag"])
def test_missing_config_file(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nope.yaml"
    argv = [f"--config-file={missing}"] if how == "flag" else []
    environ = {"CONFIG_FILE": str(missing)} if how == "env" else {}
    with pytest.raises(SettingsError, match="config file") as err:
        resolve(_parse(argv), environ=environ)
    assert str(missing) in str(err.value)
    assert "No such file" in str(err.value)


def test_empty_config_file_is_rejected_for_missing_version(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="version"):
        _resolve(tmp_path, [], {}, "")


@pytest.mark.parametrize(
    ("config", "name", "default"),
    [
        ("version: v1\nflags:\n  migStrategy:\n", "mig_strategy", "none"),
        ("version: v1\nflags:\n  nvidiaDriverRoot: null\n", "driver_root", "/"),
        ("version: v1\nflags:\n  plugin:\n    deviceIDStrategy: ~\n", "device_id_strategy", "uuid"),
    ],
    ids=["mig-strategy", "driver-root", "device-id-strategy"],
)
def test_null_in_config_file_means_default(tmp_path: Path, config: str, name: str, default: str) -> None:
    # A key present but empty in YAML (null) is "not set", as in NVIDIA's plugin (a nil
    # pointer in its config struct): the default applies. It must never leave None in a
    # setting typed str.
    settings = _resolve(tmp_path, [], {}, config)
    assert getattr(settings, name) == default
