"""The ConfigMap directory and the config file as inputs the kube-agent does not own: one bad
entry leaves the rest selectable, and files are read with bounds (never blocking on a FIFO)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from common.settings.values import MAX_CONFIG_BYTES
from services.kube_agent.selection import Rules, SelectionError, available, content, write_atomically

TS4 = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"


def configmap(src: Path, configs: dict[str, str]) -> None:
    """As the kubelet lays one out: each key a symlink into ..data."""
    data = src / "..2026_01_01_00_00_00.1"
    data.mkdir(parents=True)
    (src / "..data").symlink_to(data.name)
    for name, text in configs.items():
        (data / name).write_text(text)
        (src / name).symlink_to(f"..data/{name}")


def test_a_bad_entry_is_left_out_and_named_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    configmap(tmp_path, {"default": "version: v1\n", "ts-4": TS4})
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("..data/gone")
    (tmp_path / "a-dir").mkdir()
    os.mkfifo(tmp_path / "a-fifo")
    with caplog.at_level(logging.WARNING, logger="services.kube_agent.selection"):
        assert available(tmp_path) == ["default", "ts-4"]
        assert available(tmp_path) == ["default", "ts-4"]
    named = [r.getMessage() for r in caplog.records if "'loop'" in r.getMessage()]
    assert len(named) == 1 and "left out" in named[0], caplog.text
    assert content(Rules(tmp_path), "ts-4") == TS4  # a key is a symlink into ..data: followed


def test_a_missing_directory_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(SelectionError, match="CONFIG_FILE_SRCDIR"):
        available(tmp_path / "nope")


def test_a_config_that_is_a_fifo_or_too_large_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SelectionError, match=r"config fifo: .*FIFO"):
        content(Rules(tmp_path), "fifo")
    (tmp_path / "big").write_text("version: v1\n" + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(SelectionError, match=r"config big: .*larger than"):
        content(Rules(tmp_path), "big")


@pytest.mark.parametrize("kind", ["fifo", "loop", "huge"])
def test_the_destination_is_replaced_not_read_when_it_is_not_a_config(tmp_path: Path, kind: str) -> None:
    dst = tmp_path / "config.yaml"
    if kind == "fifo":
        os.mkfifo(dst)  # reading it used to block the agent for good
    elif kind == "loop":
        dst.symlink_to(dst.name)
    else:
        dst.write_text("#" * (MAX_CONFIG_BYTES + 1))
    assert write_atomically(dst, TS4)
    assert not dst.is_symlink() and dst.read_text() == TS4
