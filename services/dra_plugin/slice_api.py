"""This node's ResourceSlices of our driver in the API: discovery of the version served, list, watch,
create, update, delete, and a dry-run write that tells whether the server keeps device taints. Every
answer is read within common.kubeapi's bounds and checked before anything is taken from it: the kind,
the slice's driver and node (an answer naming another node means the field selector was not honoured),
the shapes we read. Slices go in and come out in v1's layout (devices flat); v1beta1 wraps each device's
fields in `basic`, and this module alone knows it.

Versions: resource.k8s.io/v1 (Kubernetes 1.34+), else v1beta2 (1.33+; v1's layout), else v1beta1
(1.32+), as the group's discovery document lists them (GET /apis/resource.k8s.io, which every server
answers with the versions it serves, or 404 when DRA is off).

Requests are those of NVIDIA's kubelet plugin and the RBAC it gets: get, list, watch, create, update,
delete of resourceslices.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any, Final
from urllib.parse import quote

from common.kubeapi import (
    HEADERS,
    MAX_ANSWER_BYTES,
    WATCH_TIMEOUT,
    ApiStatus,
    BadAnswer,
    Http,
    body_of,
    json_type,
    kind_of,
    lines_of,
    parse_json,
    plain,
    request,
    show,
    status_of,
)
from services.dra_plugin.names import DRIVER_NAME, pool_name
from services.dra_plugin.pool import Capabilities, Held, Taint, same_devices

GROUP: Final = "resource.k8s.io"
VERSIONS: Final = ("v1", "v1beta2", "v1beta1")  # ours, most preferred first
# A node's slices: a few devices of a few KB each. Bounded well above (a 128-device slice is ~100 KB).
ANSWER_LIMIT: Final = MAX_ANSWER_BYTES
PROBE_DEVICE: Final = "taint-probe"
# Marks the slices this plugin writes, so that another writer's slices of the same driver on this node
# (NVIDIA's DRA driver) are never taken for ours, updated or deleted.
MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGER: Final = "gpu-device-plugin-dra"


def _ours(meta: dict[str, Any]) -> bool:
    """Whether a slice is this plugin's: our label; or no manager label and no owner at all, as the slices of
    versions of this plugin before the label were (adopted, and labelled at their next write). Another
    manager's label, or owner references (what other drivers' slice controllers set: the Node), are not."""
    labels = meta.get("labels")
    manager = labels.get(MANAGED_BY) if isinstance(labels, dict) else None
    if manager is not None:
        return bool(manager == MANAGER)
    return not meta.get("ownerReferences")


class SliceApi:
    def __init__(self, http: Http, node: str, version: str) -> None:
        self._http = http
        self.node = node
        self.version = version
        self._base = f"/apis/{GROUP}/{version}/resourceslices"
        self._selector = {"fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER_NAME}"}

    # -- discovery ----------------------------------------------------------------------
    @staticmethod
    async def discover(http: Http) -> str:
        """The version of resource.k8s.io to speak: the first of VERSIONS the server serves. ApiStatus
        404: the server serves no resource.k8s.io (DRA is off in this cluster)."""
        what = f"discovery of {GROUP}"
        answer = await request(http, "GET", f"/apis/{GROUP}", what, limit=1 << 20)
        if not isinstance(answer, dict) or answer.get("kind", "APIGroup") != "APIGroup" or answer.get("name") != GROUP:
            raise BadAnswer(f"{what}: {kind_of(answer)} where the APIGroup {GROUP} was expected")
        versions = answer.get("versions")
        served = [v.get("version") for v in versions if isinstance(v, dict)] if isinstance(versions, list) else None
        if served is None:
            raise BadAnswer(f"{what}: versions is {json_type(versions)}, not an array")
        for version in VERSIONS:
            if version in served:
                return version
        raise BadAnswer(f"{what}: the server serves {', '.join(map(str, served)) or 'no version'}; this plugin "
                        f"speaks {', '.join(VERSIONS)} (Kubernetes 1.32 or later)")

    # -- reading ------------------------------------------------------------------------
    async def read(self) -> tuple[list[Held], str]:
        """This node's slices of our driver, and the list's resourceVersion (to watch from)."""
        what = f"list of {self.node}'s ResourceSlices"
        answer = await request(self._http, "GET", self._base, what, params=self._selector, limit=ANSWER_LIMIT)
        if not isinstance(answer, dict) or answer.get("kind", "ResourceSliceList") != "ResourceSliceList":
            raise BadAnswer(f"{what}: {kind_of(answer)} where a ResourceSliceList was expected")
        meta, items = answer.get("metadata"), answer.get("items")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version:
            raise BadAnswer(f"{what}: the list has no metadata.resourceVersion to watch from")
        if items is None:  # an empty list's items may be null
            items = []
        if not isinstance(items, list):
            raise BadAnswer(f"{what}: items are {json_type(items)}, not an array")
        return [self._slice(item, what, listed=True) for item in items], version

    async def watch(self, version: str, server_timeout: int) -> AsyncGenerator[tuple[str, Held | None, str], None]:
        """(event type, the slice (None for a BOOKMARK), the resourceVersion after it) from `version` on,
        until the server ends the watch. An ERROR event raises its Status (410: watch from a new list)."""
        what = f"watch of {self.node}'s ResourceSlices"
        params = {**self._selector, "watch": "true", "allowWatchBookmarks": "true", "resourceVersion": version,
                  "timeoutSeconds": str(server_timeout)}
        # No read timeout: a watch is silent while nothing changes (the caller bounds it).
        async with self._http.stream("GET", self._base, params=params, headers=HEADERS, timeout=WATCH_TIMEOUT) as resp:
            if resp.status_code != 200:
                raise status_of(resp.status_code, resp.reason_phrase, await body_of(resp, what, ANSWER_LIMIT))
            async for line in lines_of(resp, what, ANSWER_LIMIT):
                yield self._event(line, what)

    # -- writing ------------------------------------------------------------------------
    async def create(self, spec: dict[str, Any]) -> Held:
        what = f"create of a ResourceSlice of {self.node}"
        body = self._object({"generateName": self._generate_name()}, spec)
        return self._written(await request(self._http, "POST", self._base, what, body=body, limit=ANSWER_LIMIT),
                             what, spec)

    async def update(self, name: str, version: str, spec: dict[str, Any]) -> Held:
        what = f"update of ResourceSlice {name}"
        body = self._object({"name": name, "resourceVersion": version}, spec)
        held = self._written(await request(self._http, "PUT", f"{self._base}/{quote(name, safe='')}", what, body=body,
                                           limit=ANSWER_LIMIT), what, spec)
        if held.name != name:
            raise BadAnswer(f"{what}: the answer is ResourceSlice {show(held.name)}")
        return held

    async def delete(self, name: str, version: str) -> bool:
        """Deletes the slice if it is still the one of `version` (else 409). False: it was gone already."""
        what = f"delete of ResourceSlice {name}"
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": version}}
        try:
            await request(self._http, "DELETE", f"{self._base}/{quote(name, safe='')}", what, body=body,
                          limit=ANSWER_LIMIT)
        except ApiStatus as e:
            if e.code == 404:
                return False
            raise
        return True

    async def capabilities(self) -> Capabilities:
        """What the server keeps of device taints, from dry-run creates (nothing stored): a device with a
        NoSchedule and a None taint; when the server refuses effect None (422, before 1.35), one with a
        NoSchedule taint. A server without device taints (v1beta1 before 1.33, DRADeviceTaints off)
        accepts the slice and drops the field without a word: only the answer shows it."""
        now = time.time()
        taints = [Taint(f"{DRIVER_NAME}/probe", "", "NoSchedule", now),
                  Taint(f"{DRIVER_NAME}/probe-none", "", "None", now)]
        try:
            kept = await self._dry_run(taints)
            return Capabilities(taints=len(kept) == 2, none_effect=len(kept) == 2)
        except ApiStatus as e:
            if e.code not in (400, 422):
                raise
        return Capabilities(taints=len(await self._dry_run(taints[:1])) == 1, none_effect=False)

    async def _dry_run(self, taints: list[Taint]) -> list[dict[str, Any]]:
        what = f"dry-run create of a ResourceSlice of {self.node} (do device taints stay?)"
        spec = {"driver": DRIVER_NAME, "nodeName": self.node,
                "pool": {"name": pool_name(self.node), "generation": 0, "resourceSliceCount": 1},
                "devices": [{"name": PROBE_DEVICE, "taints": [t.to_api() for t in taints]}]}
        answer = await request(self._http, "POST", self._base, what, params={"dryRun": "All"},
                               body=self._object({"generateName": self._generate_name()}, spec), limit=ANSWER_LIMIT)
        held = self._slice(answer, what)
        device = next((d for d in held.devices if d.get("name") == PROBE_DEVICE), None)
        if device is None:
            raise BadAnswer(f"{what}: the answer has no device {PROBE_DEVICE}")
        return list(device.get("taints") or [])

    # -- shapes ---------------------------------------------------------------------------
    def _generate_name(self) -> str:
        # As the kubelet plugin helper names them: <node>-<driver>-<random>. The server appends 5 characters;
        # a name may hold 253 in all.
        return f"{self.node}-{DRIVER_NAME}-"[:240]

    def _object(self, meta: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        out = dict(spec)
        if self.version == "v1beta1":
            out["devices"] = [{"name": d["name"], "basic": {k: v for k, v in d.items() if k != "name"}}
                              for d in spec.get("devices") or []]
        meta = {**meta, "labels": {MANAGED_BY: MANAGER}}
        return {"apiVersion": f"{GROUP}/{self.version}", "kind": "ResourceSlice", "metadata": meta, "spec": out}

    def _written(self, answer: Any, what: str, spec: dict[str, Any]) -> Held:
        held = self._slice(answer, what)
        pool = spec["pool"]
        if (held.pool, held.generation, held.count) != (pool["name"], pool["generation"], pool["resourceSliceCount"]):
            raise BadAnswer(f"{what}: the answer's pool is {show(held.pool)} generation {held.generation} of "
                            f"{held.count}, not the one written")
        if not same_devices(held.devices, spec["devices"]):
            # A field the server drops or changes (device taints turned off since they were found kept): the
            # pool in the API is not what we mean, and writing it again would change nothing.
            wrote = {d["name"]: d for d in spec["devices"]}
            differs = next((d.get("name") for d in held.devices
                            if not same_devices([d], [wrote.get(d.get("name"), {})])), None)
            raise BadAnswer(f"{what}: the server holds other devices than were written"
                            f"{f' ({show(differs)} differs)' if differs else ''}")
        return held

    def _slice(self, obj: Any, what: str, listed: bool = False) -> Held:
        """A ResourceSlice of ours on this node, from an answer (a list's items may go without kind)."""
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or kind not in ("ResourceSlice", *((None,) if listed else ())):
            raise BadAnswer(f"{what}: {kind_of(obj)} where a ResourceSlice was expected")
        if obj.get("apiVersion", f"{GROUP}/{self.version}") != f"{GROUP}/{self.version}":
            raise BadAnswer(f"{what}: a ResourceSlice of {show(obj['apiVersion'])}, where {GROUP}/{self.version} "
                            "was asked for")
        meta, spec = obj.get("metadata"), obj.get("spec")
        if not isinstance(meta, dict) or not isinstance(spec, dict):
            raise BadAnswer(f"{what}: metadata and spec must be objects")
        name, version = meta.get("name"), meta.get("resourceVersion", "")
        if not isinstance(name, str) or not name or not isinstance(version, str):
            raise BadAnswer(f"{what}: metadata.name {show(name)}, resourceVersion {show(version)}")
        if spec.get("driver") != DRIVER_NAME or spec.get("nodeName") != self.node:
            raise BadAnswer(f"{what}: slice {show(name)} is of driver {show(spec.get('driver'))} on node "
                            f"{show(spec.get('nodeName'))}, not of {DRIVER_NAME} on {self.node}")
        pool = spec.get("pool")
        if not isinstance(pool, dict):
            raise BadAnswer(f"{what}: slice {show(name)}: spec.pool is {json_type(pool)}, not an object")
        pname, generation, count = pool.get("name"), pool.get("generation"), pool.get("resourceSliceCount")
        if not isinstance(pname, str) or not all(isinstance(n, int) and not isinstance(n, bool)
                                                 for n in (generation, count)):
            raise BadAnswer(f"{what}: slice {show(name)}: pool {show(pname)} generation {show(generation)} count "
                            f"{show(count)}")
        assert isinstance(generation, int) and isinstance(count, int)
        return Held(name, version, pname, generation, count, self._devices(spec.get("devices"), what, name),
                    _ours(meta))

    def _devices(self, devices: Any, what: str, name: str) -> list[dict[str, Any]]:
        if devices is None:
            return []
        if not isinstance(devices, list):
            raise BadAnswer(f"{what}: slice {show(name)}: devices are {json_type(devices)}, not an array")
        out = []
        for d in devices:
            if not isinstance(d, dict) or not isinstance(d.get("name"), str):
                raise BadAnswer(f"{what}: slice {show(name)}: a device that is {json_type(d)} without a name")
            if self.version == "v1beta1":
                basic = d.get("basic") or {}
                if not isinstance(basic, dict):
                    raise BadAnswer(f"{what}: slice {show(name)}: device {show(d['name'])}'s basic is not an object")
                d = {"name": d["name"], **basic}
            for key in ("attributes", "capacity"):
                if not isinstance(d.get(key) or {}, dict):
                    raise BadAnswer(f"{what}: slice {show(name)}: device {show(d['name'])}'s {key} is not an object")
            if not isinstance(d.get("taints") or [], list):
                raise BadAnswer(f"{what}: slice {show(name)}: device {show(d['name'])}'s taints are not an array")
            out.append(d)
        return out

    def _event(self, line: bytes, what: str) -> tuple[str, Held | None, str]:
        event = parse_json(line, what)
        kind = event.get("type") if isinstance(event, dict) else None
        if not isinstance(event, dict) or not isinstance(kind, str) or not isinstance(event.get("object"), dict):
            raise BadAnswer(f"{what}: {json_type(event)} that is not a watch event")
        obj = event["object"]
        if kind == "ERROR":
            code, message = obj.get("code"), obj.get("message")
            if not isinstance(code, int) or not isinstance(message, str):
                raise BadAnswer(f"{what}: an ERROR event without a Status")
            raise ApiStatus(code, plain(message), str(obj.get("reason", "")))
        meta = obj.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version:
            raise BadAnswer(f"{what}: a {show(kind)} event without metadata.resourceVersion")
        if kind == "BOOKMARK":
            return kind, None, version
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise BadAnswer(f"{what}: an event of type {show(kind)}")
        return kind, self._slice(obj, what), version

