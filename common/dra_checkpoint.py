"""The claims the dra-plugin prepared on this node, kept in the state dir across restarts of the program,
of the kubelet and of the pod.

Why: the kubelet asks again for every claim of a running pod after it restarts, and asks to unprepare a
claim whose pod ended even while the claim is gone from the API. Without a record, a repeated prepare
would read the API again (and fail while it is away, or pick what changed since), and two claims could be
handed one device. The record is NVIDIA's: per claim UID, its namespace and name, the devices with their
CDI IDs, and a phase: PrepareStarted is written before the claim's CDI spec, PrepareCompleted after it.
A restart between the two leaves a started entry: the next prepare of that claim does it again (the
spec is written whole or not at all), an unprepare removes what there may be.

One JSON file (`dra-checkpoint.json`), versioned, written whole by rename with the directory synced
(a crash leaves the old record or the new one), read within a bound. A file that cannot be read
(not ours, corrupt, from a newer plugin) is moved aside to `<name>.bad` and named in the log and on
the bus; the plugin starts from an empty record. That costs what the record is for, not the claims:
a repeated prepare reads the API again, and an unprepare removes the spec by the claim's UID alone.

In common, not in the dra-plugin: the plugin-server reads it too (services/plugin_server/dra_claims.py,
to keep the GPUs claims hold out of the device plugin) with this module's own decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from common.bus.messages import ClaimPhase, PreparedClaim
from common.files import read_bounded, replace_file

FILE = "dra-checkpoint.json"
# 2 added each device's adminAccess; version 1 (none) is still read, its devices not admin access.
VERSION = 2
READS = (1, 2)
MAX_CLAIMS = 1024  # a node runs at most a few hundred pods; a record past this is not a node's
MAX_DEVICES = 256  # per claim: claims.MAX_RESULTS
MAX_BYTES = 8 << 20  # MAX_CLAIMS claims of a few devices each are well under 1 MiB
PHASES: tuple[str, ...] = get_args(ClaimPhase)
STARTED: ClaimPhase = "PrepareStarted"
COMPLETED: ClaimPhase = "PrepareCompleted"


class CheckpointError(Exception):
    """The record cannot be read or written (the text says why)."""


@dataclass(frozen=True)
class PreparedDevice:
    requests: tuple[str, ...]
    pool: str
    name: str  # the DRA device name
    uuid: str  # the GPU or MIG device it was when prepared
    cdi_ids: tuple[str, ...]
    # Prepared for an admin's look only: the device is not the claim's to hold, another claim may have it.
    admin_access: bool = False


@dataclass(frozen=True)
class Entry:
    uid: str
    namespace: str
    name: str
    phase: ClaimPhase
    devices: tuple[PreparedDevice, ...] = ()
    since: float = field(default_factory=time.time)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.uid})"

    def state(self) -> PreparedClaim:
        return PreparedClaim(uid=self.uid, namespace=self.namespace, name=self.name, phase=self.phase,
                             devices=[d.name for d in self.devices], since=self.since)


def encode(entries: Mapping[str, Entry]) -> bytes:
    claims = {uid: {"namespace": e.namespace, "name": e.name, "phase": e.phase, "since": e.since,
                    "devices": [{"requests": list(d.requests), "pool": d.pool, "device": d.name, "uuid": d.uuid,
                                 "cdiDeviceIDs": list(d.cdi_ids), "adminAccess": d.admin_access}
                                for d in e.devices]}
              for uid, e in sorted(entries.items())}
    return json.dumps({"version": VERSION, "claims": claims}, indent=1, sort_keys=True).encode() + b"\n"


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{where}: not a list of strings")
    return tuple(value)


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise CheckpointError(f"{where}.{key}: not a string")
    return value


def decode(data: bytes) -> dict[str, Entry]:
    """The entries of a record; CheckpointError names what is wrong with it."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError("not a JSON object")
    version = doc.get("version")
    if version not in READS or isinstance(version, bool):
        raise CheckpointError(f"version {version!r}, this plugin reads versions {', '.join(map(str, READS))} "
                              "(a newer plugin's record?)")
    claims = doc.get("claims")
    if not isinstance(claims, dict):
        raise CheckpointError("claims: not an object")
    if len(claims) > MAX_CLAIMS:
        raise CheckpointError(f"{len(claims)} claims, more than {MAX_CLAIMS}")
    out: dict[str, Entry] = {}
    for uid, raw in claims.items():
        where = f"claims[{uid[:64]!r}]"
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: not an object")
        phase = raw.get("phase")
        if phase not in PHASES:
            raise CheckpointError(f"{where}.phase: {str(phase)[:40]!r}, not one of {', '.join(PHASES)}")
        since = raw.get("since")
        if not isinstance(since, int | float) or isinstance(since, bool):
            raise CheckpointError(f"{where}.since: not a number")
        devices = raw.get("devices")
        if not isinstance(devices, list) or len(devices) > MAX_DEVICES:
            raise CheckpointError(f"{where}.devices: not a list of at most {MAX_DEVICES}")
        prepared = []
        for i, d in enumerate(devices):
            at = f"{where}.devices[{i}]"
            if not isinstance(d, dict):
                raise CheckpointError(f"{at}: not an object")
            admin = d.get("adminAccess", False)
            if not isinstance(admin, bool):
                raise CheckpointError(f"{at}.adminAccess: not a boolean")
            prepared.append(PreparedDevice(_strings(d.get("requests"), f"{at}.requests"), _text(d, "pool", at),
                                           _text(d, "device", at), _text(d, "uuid", at),
                                           _strings(d.get("cdiDeviceIDs"), f"{at}.cdiDeviceIDs"), admin))
        out[uid] = Entry(uid, _text(raw, "namespace", where), _text(raw, "name", where), phase, tuple(prepared),
                         float(since))
    return out


class Checkpoint:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE
        self.entries: dict[str, Entry] = {}

    def load(self) -> None:
        """Reads the record (none yet: empty). CheckpointError when it cannot be used: it is then moved aside
        (`.bad`) so that the next write keeps it for a look, and the record starts empty."""
        try:
            data = read_bounded(self.path, MAX_BYTES, follow=False)
        except FileNotFoundError:
            return
        except OSError as e:
            why = f"{self.path}: {e.strerror or e}"
            self._aside()
            raise CheckpointError(why) from None
        try:
            self.entries = decode(data)
        except CheckpointError as e:
            self._aside()
            raise CheckpointError(f"{self.path}: {e}") from None

    def _aside(self) -> None:
        with contextlib.suppress(OSError):
            os.replace(self.path, self.path.with_name(self.path.name + ".bad"))

    def put(self, entry: Entry) -> None:
        """Records `entry` (replacing the claim's); CheckpointError when it cannot be written or the record
        is full. The record in memory is the file's: unchanged when the write fails."""
        if entry.uid not in self.entries and len(self.entries) >= MAX_CLAIMS:
            raise CheckpointError(f"{len(self.entries)} claims prepared on this node already, the most this plugin "
                                  "records; unprepare some first")
        self._write({**self.entries, entry.uid: entry})

    def remove(self, uid: str) -> bool:
        """Forgets the claim; False when it was not recorded (nothing written)."""
        if uid not in self.entries:
            return False
        self._write({k: v for k, v in self.entries.items() if k != uid})
        return True

    def _write(self, entries: dict[str, Entry]) -> None:
        data = encode(entries)
        if len(data) > MAX_BYTES:
            # load() refuses a record past the bound: writing it would lose every claim at the next start.
            raise CheckpointError(f"{self.path}: the record would be {len(data)} bytes, more than the {MAX_BYTES} "
                                  "this plugin reads; not written")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The kubelet's claims are its business: readable by root only, as the kubelet's own checkpoints.
            replace_file(self.path, data, 0o600, sync_dir=True)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot write: {e.strerror or e}") from None
        self.entries = entries

    def in_use(self, except_uid: str = "") -> dict[str, str]:
        """Device name -> the claim it is prepared for (started or completed), but for claim `except_uid`;
        admin-access devices are not held (an admin's look must not keep the GPU from its workloads)."""
        return {d.name: str(e) for e in self.entries.values() if e.uid != except_uid for d in e.devices
                if not d.admin_access}
