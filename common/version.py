"""The product's version, in one place: packaging reads it from here (pyproject.toml's dynamic
version), and so do the services, as a constant. Asking the installed distribution's metadata
instead imported importlib.metadata into the health monitor: ~12 ms of every start, ~2 MB."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

VERSION = "0.1.0"


class VersionAction(argparse.Action):
    """`--version` (and NVIDIA's `-v`) of every command of the image: prints the version and exits."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"gpu-device-plugin {VERSION}")  # on stdout, as argparse's own version action
        parser.exit()
