"""The product's version, in one place: packaging reads it from here (pyproject.toml's dynamic
version), and so do the services, as a constant. Asking the installed distribution's metadata
instead imported importlib.metadata into the health monitor: ~12 ms of every start, ~2 MB."""

VERSION = "0.1.0"
