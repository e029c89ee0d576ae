"""The devices the dra-plugin has prepared for DRA claims, read from its checkpoint, so that the device
plugin never offers a GPU a claim holds.

Why: DRA_DEVICES splits the GPUs between the two APIs at start. When the split changes under running
pods (a helm upgrade turning DRA off, or moving a GPU back to the device plugin, while a DRA claim holds
it), the plugin-server would offer a GPU a DRA pod is using. While the dra-plugin's record lists a
device as prepared for a claim (admin access excepted: an admin's look holds nothing), its GPU is in
no resource here.

The record is common/dra_checkpoint.py's (`<state dir>/dra-checkpoint.json`), decoded by its
own code; this reader takes only the device UUIDs, read-only, within the writer's own bound, again
when the state dir says the file changed and every RECHECK_S. A file that cannot be read is logged
once (until it reads again) and the last devices read stay withheld: a record the dra-plugin moved
aside (`.bad`) is absent, so nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

from common.bus.messages import DeviceState
from common.dra_checkpoint import FILE, MAX_BYTES, CheckpointError, decode
from common.watched_ids import WatchedIds

RECHECK_S: Final = 30.0


def claimed_ids(data: bytes) -> frozenset[str]:
    """The UUIDs (GPU or MIG) of the devices prepared for claims, admin access left out."""
    return frozenset(d.uuid for entry in decode(data).values() for d in entry.devices if not d.admin_access)


def claimed_gpus(ids: Iterable[str], devices: Iterable[DeviceState]) -> frozenset[str]:
    """The GPUs of the claimed devices (a MIG device holds its GPU: the device plugin's unit is the GPU)."""
    wanted = set(ids)
    return frozenset(d.id if d.kind == "gpu" else d.parent for d in devices if d.id in wanted)


class DraClaims(WatchedIds):
    """The dra-plugin's claimed device UUIDs (`ids`), kept up to date."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir / FILE, claimed_ids, MAX_BYTES, "the dra-plugin's record",
                         "the devices it was last read to hold stay out of the device plugin", (CheckpointError,),
                         follow=False, recheck_s=RECHECK_S)
