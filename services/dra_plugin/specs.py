"""A claim's CDI spec: what the container runtime resolves the claim's CDI device IDs with.

The content is the device plugin's (services/plugin_server/cdi.py, NVIDIA's nvcdi output): per device its
nodes, read from the real files under the driver root and named by their host paths; common to the claim
the control nodes, the driver's libraries, firmware, binaries and IPC sockets, and the toolkit's hooks.
What differs is the naming, NVIDIA's DRA driver's: kind `k8s.gpu.nvidia.com/claim`, one device per
claimed device named `<claim UID>-<device name>`, one transient spec file per claim
(`k8s.gpu.nvidia.com-claim_<claim UID>.json`), written whole by rename (a runtime reading the directory
sees the spec or nothing) and removed when the claim is unprepared. A UID is never reused, so a runtime
that caches specs cannot resolve a claim's ID to another claim's devices.

The driver's files are looked up once per driver version and driver root: a prepare then reads only the
device nodes of its devices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.bus.messages import DeviceState
from common.settings import Settings
from services.dra_plugin.names import CDI_KIND, cdi_device_name, cdi_spec_file
from services.plugin_server import cdi


class SpecWriter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.cdi_spec_dir
        self._files: tuple[tuple[str, cdi.Roots], cdi.DriverFiles] | None = None

    def driver_files(self, r: cdi.Roots, version: str) -> cdi.DriverFiles:
        key = (version, r)
        if self._files is None or self._files[0] != key:
            self._files = (key, cdi.find_driver_files(r, version))
        return self._files[1]

    def build(self, claim_uid: str, devices: Mapping[str, DeviceState], gpus: Mapping[str, DeviceState],
              driver_version: str) -> dict[str, Any]:
        """The spec for `devices` (DRA name -> device; `gpus`: UUID -> GPU, for MIG devices' nodes).
        CdiError (a PermanentError for the device plugin, a failed claim here) names what is missing."""
        r = cdi.roots(self.settings)
        files = self.driver_files(r, driver_version)
        out = [{"name": cdi_device_name(claim_uid, name), "containerEdits": cdi.device_edits(d, gpus, r)}
               for name, d in devices.items()]
        return {"cdiVersion": cdi.CDI_VERSION, "kind": CDI_KIND, "devices": out,
                "containerEdits": cdi.common_edits(self.settings, r, files)}

    def write(self, claim_uid: str, spec: dict[str, Any]) -> Path:
        return cdi.write_spec(self.dir, spec, cdi_spec_file(claim_uid))

    def exists(self, claim_uid: str) -> bool:
        return (self.dir / cdi_spec_file(claim_uid)).is_file()

    def remove(self, claim_uid: str) -> None:
        """Removes the claim's spec; nothing to do when it is not there. OSError when it cannot."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / cdi_spec_file(claim_uid)).unlink()
