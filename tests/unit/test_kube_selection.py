"""NVIDIA's config selection (services.kube_agent.selection), as pure functions of names and label."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kube_agent.selection import Rules, SelectionError, content, select, write_atomically

SRC = Path("/nonexistent")


@pytest.mark.parametrize(("default", "strategies", "names", "label", "expected"), [
    ("", ("named", "single"), ["a", "default"], "a", ("a", "node label nvidia.com/device-plugin.config=a", "")),
    ("", ("named", "single"), ["a", "default"], None, ("default", "fallback strategy named", "")),
    ("b", ("named",), ["a", "b", "default"], None, ("b", "DEFAULT_CONFIG", "")),
    ("", ("named", "single"), ["only"], None, ("only", "fallback strategy single", "")),
    ("", ("single", "named"), ["a", "default"], None, ("default", "fallback strategy named", "")),
    ("", ("empty",), ["a", "b"], None, (None, "fallback strategy empty", "")),
    ("", ("named",), ["a", "default"], "typo", ("default", "fallback strategy named", "typo")),
    ("a", ("empty",), ["a", "b"], "typo", ("a", "DEFAULT_CONFIG", "typo")),
    ("", ("named", "single"), ["a", "b"], "b", ("b", "node label nvidia.com/device-plugin.config=b", "")),
])
def test_selection_as_nvidias_config_manager(default: str, strategies: tuple[str, ...], names: list[str],
                                             label: str | None, expected: tuple[str | None, str, str]) -> None:
    sel = select(Rules(SRC, default, strategies), names, label)
    assert (sel.name, sel.why, sel.unknown) == expected


def test_nothing_selectable_and_unknown_default_are_errors() -> None:
    with pytest.raises(SelectionError, match="match none of a, b"):
        select(Rules(SRC, "", ("named", "single")), ["a", "b"], None)
    with pytest.raises(SelectionError, match="DEFAULT_CONFIG=c: no such config"):
        select(Rules(SRC, "c"), ["a", "b"], "a-label-naming-nothing")


def test_rules_from_nvidias_environment() -> None:
    rules = Rules.from_env({"CONFIG_FILE_SRCDIR": "/cfg", "FALLBACK_STRATEGIES": "single, empty",
                            "DEFAULT_CONFIG": "x", "NODE_LABEL": "example.com/cfg"})
    assert rules == Rules(Path("/cfg"), "x", ("single", "empty"), "example.com/cfg")
    assert Rules.from_env({"CONFIG_FILE_SRCDIR": "/cfg"}).strategies == ("named", "single")
    with pytest.raises(SelectionError, match="unknown strategy 'first'"):
        Rules.from_env({"CONFIG_FILE_SRCDIR": "/cfg", "FALLBACK_STRATEGIES": "first"})
    with pytest.raises(SelectionError, match="CONFIG_FILE_SRCDIR is not set"):
        Rules.from_env({})


def test_invalid_config_is_not_content(tmp_path: Path) -> None:
    (tmp_path / "bad").write_text("version: v1\nflags:\n  migStrategy: sideways\n")
    with pytest.raises(SelectionError, match=r"config bad: .*sideways"):
        content(Rules(tmp_path), "bad")
    assert content(Rules(tmp_path), None) == "version: v1\n"


def test_write_is_atomic_and_skips_unchanged_content(tmp_path: Path) -> None:
    dst = tmp_path / "config.yaml"
    assert write_atomically(dst, "version: v1\n")
    inode = dst.stat().st_ino
    assert not write_atomically(dst, "version: v1\n")
    assert dst.stat().st_ino == inode, "unchanged content: no new file for the services to reload"
    assert write_atomically(dst, "version: v1\nflags: {}\n")
    assert dst.stat().st_ino != inode and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
