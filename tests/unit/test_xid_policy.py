"""XID policy from DP_DISABLE_HEALTHCHECKS / DP_ENABLE_HEALTHCHECKS, as NVIDIA's plugin reads them."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping

import pytest

from common.settings import HealthConfig, add_arguments, resolve
from services.health_monitor.xid_policy import (
    DEFAULT_IGNORED_XIDS,
    ENV_DISABLE,
    ENV_ENABLE,
    FATAL,
    IGNORED,
    MONITOR_ONLY,
    XidPolicy,
    policy_for,
    xid_policy,
)


def policy_from_env(environ: Mapping[str, str], config: HealthConfig | None = None) -> XidPolicy:
    """The policy as the health monitor builds it: DP_* read through the settings."""
    settings = resolve(environ=environ)
    if config is None:
        return policy_for(settings)
    return xid_policy(settings.disable_healthchecks, settings.enable_healthchecks, config)

APP_ERRORS = (13, 31, 43, 45, 68, 109)
# 79 fallen off the bus, 48 double-bit ECC, 94 contained ECC, 63/64 row remapping, 119 GSP timeout.
HARDWARE = (79, 48, 94, 63, 64, 119)
PROBED = APP_ERRORS + HARDWARE

# id, DP_DISABLE_HEALTHCHECKS (None = unset), DP_ENABLE_HEALTHCHECKS (None = unset),
# checks_enabled, the XIDs of PROBED that are fatal
ROWS: list[tuple[str, str | None, str | None, bool, set[int]]] = [
    ("unset-unset", None, None, True, set(HARDWARE)),
    ("empty-empty", "", "", True, set(HARDWARE)),
    ("disable-all", "all", None, False, set()),
    ("disable-ALL", "ALL", None, False, set()),
    ("disable-all-enable-79", "all", "79", False, set()),
    ("disable-xids", "xids", None, True, set()),
    ("disable-Xids", "Xids", None, True, set()),
    ("disable-79-48", "79,48", None, True, {94, 63, 64, 119}),
    ("disable-spaces-malformed", " 79 , foo,, 0x30, -5, 48 ,", None, True, {94, 63, 64, 119}),
    ("disable-only-malformed", "gpu,13b", None, True, set(HARDWARE)),
    ("enable-all", None, "all", True, set(PROBED)),
    ("enable-All", None, "All", True, set(PROBED)),
    ("enable-13", None, "13", True, {13, *HARDWARE}),
    ("enable-13-68-spaces", None, " 13 ,68 ", True, {13, 68, *HARDWARE}),
    ("disable-xids-enable-79", "xids", "79", True, {79}),
    ("disable-Xids-enable-79-48", "Xids", "79, 48", True, {79, 48}),
    ("disable-13-enable-13", "13", "13", True, set(HARDWARE) | {13}),
    ("disable-79-enable-79", "79", "79", True, set(HARDWARE)),
    ("disable-79-enable-all", "79", "all", True, set(PROBED)),
    ("disable-xids-enable-all", "xids", "all", True, set(PROBED)),
    ("enable-malformed", None, "x13", True, set(HARDWARE)),
]


@pytest.mark.parametrize(
    ("disable", "enable", "checks_enabled", "fatal"),
    [r[1:] for r in ROWS],
    ids=[r[0] for r in ROWS],
)
def test_policy_from_env(disable: str | None, enable: str | None, checks_enabled: bool, fatal: set[int]) -> None:
    environ = {}
    if disable is not None:
        environ[ENV_DISABLE] = disable
    if enable is not None:
        environ[ENV_ENABLE] = enable
    policy = policy_from_env(environ)
    assert policy.checks_enabled is checks_enabled
    assert {x for x in PROBED if policy.classify(x) == FATAL} == fatal


def test_default_policy_matches_unset_environment() -> None:
    assert policy_from_env({}) == XidPolicy()
    assert frozenset(APP_ERRORS) == DEFAULT_IGNORED_XIDS


@pytest.mark.parametrize(
    ("extra", "xid", "fatal"),
    [((), 94, True), ((94,), 94, False), ((94,), 79, True), ((94, 31), 31, False)],
    ids=["none", "extra-94", "extra-keeps-79", "extra-overlaps-default"],
)
def test_config_ignored(extra: tuple[int, ...], xid: int, fatal: bool) -> None:
    config = HealthConfig(ignored_xids=frozenset(extra))
    assert (policy_from_env({}, config).classify(xid) == FATAL) is fatal


def test_config_ignored_loses_to_enable() -> None:
    assert policy_from_env({ENV_ENABLE: "94"}, HealthConfig(ignored_xids=frozenset({94}))).classify(94) == FATAL


@pytest.mark.parametrize(
    ("env", "config", "xid", "expected"),
    [
        ({}, HealthConfig(monitor_only_xids=frozenset({94})), 94, MONITOR_ONLY),
        ({}, HealthConfig(monitor_only_xids=frozenset({94})), 79, FATAL),
        ({}, HealthConfig(fatal_xids=frozenset({13})), 13, FATAL),
        ({}, HealthConfig(fatal_xids=frozenset({13})), 31, IGNORED),
        ({ENV_DISABLE: "xids"}, HealthConfig(fatal_xids=frozenset({48})), 48, FATAL),
        ({ENV_DISABLE: "xids"}, HealthConfig(monitor_only_xids=frozenset({48})), 48, MONITOR_ONLY),
        ({ENV_ENABLE: "94"}, HealthConfig(monitor_only_xids=frozenset({94})), 94, FATAL),
        ({ENV_DISABLE: "all"}, HealthConfig(fatal_xids=frozenset({79})), 79, IGNORED),
        ({ENV_DISABLE: "48"}, HealthConfig(fatal_xids=frozenset({48})), 48, FATAL),
    ],
    ids=["monitor-only", "monitor-only-other", "file-fatal-default-ignored", "file-fatal-other",
         "file-fatal-beats-disable-xids", "monitor-only-under-disable-xids", "env-enable-beats-monitor-only",
         "disable-all-beats-everything", "file-fatal-beats-env-disable-list"],
)
def test_config_file_xid_lists(env: dict[str, str], config: HealthConfig, xid: int, expected: str) -> None:
    assert policy_from_env(env, config).classify(xid) == expected


@pytest.mark.parametrize(
    ("env", "value", "bad"),
    [
        (ENV_DISABLE, "79,foo", "'foo'"),
        (ENV_ENABLE, "0x30", "'0x30'"),
        (ENV_DISABLE, "-1", "'-1'"),
    ],
    ids=["disable-word", "enable-hex", "disable-negative"],
)
def test_malformed_entries_are_logged(caplog: pytest.LogCaptureFixture, env: str, value: str, bad: str) -> None:
    with caplog.at_level(logging.WARNING, logger="services.health_monitor.xid_policy"):
        policy_from_env({env: value})
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(env in m and bad in m for m in messages), messages


@pytest.mark.parametrize(
    "value",
    ["79,\u00b2", "\u00b3", "48,\u2460"],
    ids=["superscript-two", "superscript-three", "circled-one"],
)
def test_unicode_digit_lookalikes_are_malformed_not_fatal(value: str) -> None:
    # str.isdigit() is True for these but int() refuses them: they must be ignored with a
    # warning like any other malformed entry, not crash the health-monitor at start.
    policy = policy_from_env({ENV_DISABLE: value})
    assert policy.checks_enabled is True
    assert policy.classify(94) == FATAL


def test_dp_variables_are_settings_with_flags_and_precedence() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    assert "DP_DISABLE_HEALTHCHECKS" in help_text and "DP_ENABLE_HEALTHCHECKS" in help_text
    args = parser.parse_args(["--disable-healthchecks", "all"])
    settings = resolve(args, environ={ENV_DISABLE: "79"})
    assert settings.disable_healthchecks == "all", "the flag beats the environment"
    assert policy_for(settings).checks_enabled is False


def test_health_lists_from_the_environment_reach_the_policy() -> None:
    policy = policy_for(resolve(environ={"HEALTH_FATAL_XIDS": "13", "HEALTH_MONITOR_ONLY_XIDS": "94,95"}))
    assert (policy.classify(13), policy.classify(94), policy.classify(95)) == (FATAL, MONITOR_ONLY, MONITOR_ONLY)
