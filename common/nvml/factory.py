"""Chooses the NVML backend from the settings.

"real" is the product's own (the driver's libnvidia-ml). Any other backend is a plug-in
registered under the entry-point group below; the development tools register "simulated"
(devtools/pyproject.toml). The product never imports them: a node's image does not have
them, and asking for one there is a clear, permanent error.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from common.lifecycle import PermanentError
from common.nvml.backend import NvmlBackend
from common.settings import Settings

BACKEND_GROUP = "gpu_plugin.nvml_backends"


def make_backend(settings: Settings) -> NvmlBackend:
    if settings.nvml_backend != "real":
        found = entry_points(group=BACKEND_GROUP, name=settings.nvml_backend)
        if not found:
            raise PermanentError(
                f"NVML backend {settings.nvml_backend!r} is not installed here: it comes with the development "
                "tools (pip install -e ./devtools in a checkout), not with the product; use NVML_BACKEND=real"
            )
        backend: NvmlBackend = next(iter(found)).load()(settings)
        return backend
    from common.nvml.real import RealNvml, resolve_library

    # NVIDIA's order: the container's view of the driver root first, then the driver root itself
    # (visible at the same path when mounted so), then the loader.
    return RealNvml(library=resolve_library([settings.container_driver_root, settings.driver_root]))
