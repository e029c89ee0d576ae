"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Procs
from tests.integration.node import Node

MakeNode = Callable[..., Node]


@pytest.fixture
def make_node(procs: Procs, short_tmp: Path) -> Iterator[MakeNode]:
    """Starts a Node (three services + in-process kubelet simulator); `config` is a v1 file's text."""
    nodes: list[Node] = []

    def make(fleet: str = "dgx-h100-8", config: str | None = None, **env: str) -> Node:
        if config is not None:
            path = short_tmp / "config.yaml"
            path.write_text(config)
            env["CONFIG_FILE"] = str(path)
        node = Node(procs, short_tmp, fleet, **env)
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.close()
