"""gpu-feature-discovery's settings: NVIDIA's flags (cmd/gpu-feature-discovery/main.go), their
environment variables and config file keys (api/config/v1 flags.gfd), with NVIDIA's precedence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.settings import SettingsError
from services.feature_discovery.options import DEFAULT_MACHINE_TYPE_FILE, DEFAULT_OUTPUT_FILE, Options, parse


def opts(*argv: str, **environ: str) -> Options:
    return parse(list(argv), environ)


def test_nvidias_defaults() -> None:
    o = opts()
    # main.go: oneshot false, no-timestamp false, sleep-interval 60s, output-file and machine-type-file paths;
    # mig-strategy none and fail-on-init-error true.
    assert (o.oneshot, o.no_timestamp, o.sleep_interval) == (False, False, 60.0)
    assert o.output_file == DEFAULT_OUTPUT_FILE == "/etc/kubernetes/node-feature-discovery/features.d/gfd"
    assert o.machine_type_file == DEFAULT_MACHINE_TYPE_FILE == "/sys/class/dmi/id/product_name"
    assert (o.settings.mig_strategy, o.settings.fail_on_init_error) == ("none", True)
    # main.go since v0.19 (k8s-device-plugin#1504): use-node-feature-api true; internal/flags/node.go:
    # namespace "default", node-name unset; internal/flags/kubeclient.go: kubeconfig unset (in-cluster).
    assert (o.use_node_feature_api, o.namespace, o.node_name, o.kubeconfig) == (True, "default", "", "")


@pytest.mark.parametrize(("argv", "oneshot"), [
    (["--oneshot"], True), (["--oneshot=true"], True), (["--oneshot=false"], False), (["--oneshot", "false"], False),
])
def test_boolean_flags_alone_or_with_a_value(argv: list[str], oneshot: bool) -> None:
    assert opts(*argv).oneshot is oneshot


def test_output_aliases() -> None:
    # main.go: Aliases: output, o.
    assert opts("-o", "/tmp/a").output_file == "/tmp/a"
    assert opts("--output", "/tmp/b").output_file == "/tmp/b"
    assert opts("--output-file=").output_file == ""  # "": standard output (output.go ToFile)


def test_environment() -> None:
    o = opts(GFD_ONESHOT="true", GFD_NO_TIMESTAMP="true", GFD_SLEEP_INTERVAL="1m30s", GFD_OUTPUT_FILE="/x",
             GFD_MACHINE_TYPE_FILE="/m", MIG_STRATEGY="mixed", FAIL_ON_INIT_ERROR="false", NODE_NAME="n1",
             NAMESPACE="gpu")
    assert (o.oneshot, o.no_timestamp, o.sleep_interval, o.output_file, o.machine_type_file) == \
        (True, True, 90.0, "/x", "/m")
    assert (o.settings.mig_strategy, o.settings.fail_on_init_error) == ("mixed", False)
    assert (o.node_name, o.namespace) == ("n1", "gpu")


def test_gfd_names_come_before_the_shared_ones() -> None:
    # main.go: EnvVars GFD_MIG_STRATEGY then MIG_STRATEGY, GFD_FAIL_ON_INIT_ERROR then FAIL_ON_INIT_ERROR.
    o = opts(GFD_MIG_STRATEGY="single", MIG_STRATEGY="mixed", GFD_FAIL_ON_INIT_ERROR="false",
             FAIL_ON_INIT_ERROR="true")
    assert (o.settings.mig_strategy, o.settings.fail_on_init_error) == ("single", False)


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nflags:\n  migStrategy: single\n  gfd:\n    sleepInterval: 10s\n"
                      "    oneshot: true\n    outputFile: /from/file\n    noTimestamp: true\n"
                      "    machineTypeFile: /file/machine\n")
    o = opts("--sleep-interval", "5s", CONFIG_FILE=str(config), GFD_OUTPUT_FILE="/from/env")
    assert o.sleep_interval == 5.0  # flag
    assert o.output_file == "/from/env"  # environment over the file
    assert (o.oneshot, o.no_timestamp, o.machine_type_file) == (True, True, "/file/machine")  # the file
    assert o.settings.mig_strategy == "single"


def test_gfd_config_file_variable(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("version: v1\nflags:\n  migStrategy: mixed\n")
    assert opts(GFD_CONFIG_FILE=str(config), CONFIG_FILE="/nonexistent").settings.mig_strategy == "mixed"


def test_sharing_comes_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n"
                      "      replicas: 4\n")
    o = opts("--config-file", str(config))
    assert o.settings.sharing.kind == "timeSlicing"
    assert o.settings.sharing.resources[0].replicas == 4


def test_infinite_sleep_interval() -> None:
    # v0.19 (#1603): --sleep-interval=infinite labels once and stays up.
    assert opts("--sleep-interval=infinite").sleep_interval is None


def test_plugin_variables_are_none_of_gfds_business() -> None:
    # NVIDIA's GFD reads only its own flags' variables: a bad plugin setting beside it changes nothing.
    assert opts(PASS_DEVICE_SPECS="maybe", DEVICE_LIST_STRATEGY="bogus").oneshot is False


@pytest.mark.parametrize(("argv", "environ", "named"), [
    (["--mig-strategy", "bogus"], {}, "mig_strategy (flag --mig-strategy)"),
    ([], {"GFD_MIG_STRATEGY": "bogus"}, "environment GFD_MIG_STRATEGY"),
    (["--oneshot=maybe"], {}, "oneshot (flag --oneshot)"),
    ([], {"GFD_NO_TIMESTAMP": "maybe"}, "no-timestamp (environment GFD_NO_TIMESTAMP)"),
    (["--sleep-interval", "soon"], {}, "sleep-interval (flag --sleep-interval)"),
    (["--sleep-interval", "1ms"], {}, "sleep-interval (flag --sleep-interval)"),
    (["--fail-on-init-error=perhaps"], {}, "fail_on_init_error (flag --fail-on-init-error)"),
    ([], {"GFD_FAIL_ON_INIT_ERROR": "perhaps"}, "environment GFD_FAIL_ON_INIT_ERROR"),
    (["--device-discovery-strategy", "tegra"], {}, "tegra is not served"),
    (["--device-discovery-strategy", "vfio"], {}, "vfio is not served"),
    (["--bogus"], {}, "unrecognized arguments: --bogus"),
    (["--sleep-interval"], {}, "argument --sleep-interval: expected one argument"),
])
def test_a_bad_value_names_the_setting(argv: list[str], environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(named)):
        parse(argv, environ)


@pytest.mark.parametrize(("argv", "environ", "used"), [
    (["--use-node-feature-api=false"], {}, False),
    (["--use-node-feature-api", "false"], {}, False),
    (["--use-node-feature-api"], {"GFD_USE_NODE_FEATURE_API": "false"}, True),  # the flag first
    ([], {"GFD_USE_NODE_FEATURE_API": "false"}, False),
    ([], {"USE_NODE_FEATURE_API": "false"}, False),  # main.go's second variable
    ([], {"GFD_USE_NODE_FEATURE_API": "true", "USE_NODE_FEATURE_API": "false"}, True),
])
def test_node_feature_api_flag_and_variables(argv: list[str], environ: dict[str, str], used: bool) -> None:
    assert parse(argv, environ).use_node_feature_api is used


def test_node_feature_api_from_the_config_file(tmp_path: Path) -> None:
    # api/config/v1 flags.useNodeFeatureAPI (what a config-manager-switched config can say).
    config = tmp_path / "c.yaml"
    config.write_text("version: v1\nflags:\n  useNodeFeatureAPI: false\n")
    assert opts(CONFIG_FILE=str(config)).use_node_feature_api is False
    assert opts("--use-node-feature-api", CONFIG_FILE=str(config)).use_node_feature_api is True


def test_node_feature_api_access() -> None:
    o = opts("--node-name", "n2", "--namespace", "gpu-operator", "--kubeconfig", "/k", NODE_NAME="n1", KUBECONFIG="/e")
    assert (o.node_name, o.namespace, o.kubeconfig) == ("n2", "gpu-operator", "/k")
    assert opts(KUBECONFIG="/e").kubeconfig == "/e"


@pytest.mark.parametrize("flag", ["--version", "-v"])  # urfave/cli's version flag and its alias
def test_version_is_printed(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    with pytest.raises(SystemExit) as info:
        parse([flag], {})
    assert info.value.code == 0
    assert "gpu-device-plugin" in capsys.readouterr().out
