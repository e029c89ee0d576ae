"""The devices the dra-plugin has prepared for DRA claims, read from its checkpoint, so that the device
plugin never offers a GPU a claim holds.

Why: DRA_DEVICES splits the GPUs between the two APIs at start. When the split changes under running
pods (a helm upgrade turning DRA off, or moving a GPU back to the device plugin, while a DRA claim holds
it), the plugin-server would offer a GPU a DRA pod is using. While the dra-plugin's record lists a
device as prepared for a claim (admin access excepted: an admin's look holds nothing), its GPU is in
no resource here.

The record is services/dra_plugin/checkpoint.py's (`<state dir>/dra-checkpoint.json`, versions 1 and 2:
{"version", "claims": {uid: {"devices": [{"uuid", "adminAccess"?}]}}}); this reader takes only the
device UUIDs, read-only, within MAX_BYTES (the writer's own bound), again when the state dir says the
file changed and every RECHECK_S. A file that cannot be read is logged once (until it reads again) and
the last devices read stay withheld: a record the dra-plugin moved aside (`.bad`) is absent, so nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from common.bus.messages import DeviceState
from common.watched_ids import WatchedIds

FILE: Final = "dra-checkpoint.json"  # services.dra_plugin.checkpoint.FILE (a test keeps them equal)
VERSIONS: Final = (1, 2)
MAX_BYTES: Final = 8 << 20  # services.dra_plugin.checkpoint.MAX_BYTES
RECHECK_S: Final = 30.0


class DraRecordError(Exception):
    """The dra-plugin's record cannot be read (the text says why)."""


def claimed_ids(data: bytes) -> frozenset[str]:
    """The UUIDs (GPU or MIG) of the devices prepared for claims, admin access left out."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise DraRecordError(f"not JSON ({e})") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if version not in VERSIONS or isinstance(version, bool):
        raise DraRecordError(f"version {repr(version)[:20]}, this plugin reads versions 1, 2")
    claims = doc.get("claims")
    if not isinstance(claims, dict):
        raise DraRecordError("claims: not an object")
    out: set[str] = set()
    for claim in claims.values():
        devices = claim.get("devices") if isinstance(claim, dict) else None
        if not isinstance(devices, list):
            raise DraRecordError("a claim without a devices list")
        for d in devices:
            if not isinstance(d, dict) or not isinstance(d.get("uuid"), str):
                raise DraRecordError("a device without a uuid")
            if d.get("adminAccess") is not True:
                out.add(d["uuid"])
    return frozenset(out)


def claimed_gpus(ids: Iterable[str], devices: Iterable[DeviceState]) -> frozenset[str]:
    """The GPUs of the claimed devices (a MIG device holds its GPU: the device plugin's unit is the GPU)."""
    wanted = set(ids)
    return frozenset(d.id if d.kind == "gpu" else d.parent for d in devices if d.id in wanted)


class DraClaims(WatchedIds):
    """The dra-plugin's claimed device UUIDs (`ids`), kept up to date."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir / FILE, claimed_ids, MAX_BYTES, "the dra-plugin's record",
                         "the devices it was last read to hold stay out of the device plugin", (DraRecordError,),
                         follow=False, recheck_s=RECHECK_S)
