"""The product's version: the installed distribution's, which pyproject.toml sets (one place)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "gpu-device-plugin"

try:
    VERSION = version(DISTRIBUTION)
except PackageNotFoundError:  # run from a tree that was never installed
    VERSION = "0+unknown"
