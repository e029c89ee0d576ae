"""What a NodePrepareResources call asks for, checked: the claim references the kubelet sends, the
ResourceClaim the API server answers with, and the devices of ours it was allocated.

The kubelet sends references only (namespace, name, UID: k8s.io/kubelet pkg/apis/dra); the plugin reads
the claim itself, as the kubelet's helper library does (k8s.io/dynamic-resource-allocation/kubeletplugin:
get by namespace and name, refuse a claim whose UID is not the one sent, "got replaced", or that has no
status.allocation, "not allocated"). Of status.allocation.devices.results, the results of our driver are
ours: each names a request of the claim, a pool (our node's) and a device by its DRA name.

Everything here is pure (no I/O), so that each refusal is a unit test; the plugin (plugin.py) does the
reading and the writing. A refusal is a ClaimError: the kubelet gets its text as that claim's error and
asks again later; the other claims of the call are not held up by it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.bus.messages import UNHEALTHY, DeviceState
from common.kubeapi import json_type, show
from services.dra_plugin.names import is_claim_uid, is_device_name
from services.dra_plugin.pool import Taint, taints_of

GROUP = "resource.k8s.io"
# v1 from Kubernetes 1.34 (GA), v1beta1 for 1.32 and 1.33: the claim's allocation has the same shape in both.
VERSIONS = ("v1", "v1beta1")
# The API allows 32 requests per claim and a result per device; a node has at most a few dozen devices.
MAX_RESULTS = 256
MAX_CLAIMS_PER_CALL = 128  # a pod's claims: the API caps a pod at 128 resource claims
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class ClaimError(Exception):
    """This claim cannot be prepared (the text is what the kubelet shows in the pod's events)."""


@dataclass(frozen=True)
class ClaimRef:
    namespace: str
    uid: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.uid})"

    def check(self) -> None:
        """ClaimError unless it is a reference the kubelet sends: every part set and of the API's form."""
        if not _DNS_LABEL.fullmatch(self.namespace):
            raise ClaimError(f"claim reference: namespace {show(self.namespace)} is not a namespace name")
        if not _DNS_SUBDOMAIN.fullmatch(self.name):
            raise ClaimError(f"claim reference: name {show(self.name)} is not a ResourceClaim name")
        if not is_claim_uid(self.uid):
            raise ClaimError(f"claim reference: UID {show(self.uid)} is not a UID")


def claim_path(version: str, ref: ClaimRef) -> str:
    return f"/apis/{GROUP}/{version}/namespaces/{ref.namespace}/resourceclaims/{ref.name}"


MAX_TOLERATIONS = 16  # the API's bound on a request's tolerations (resource.k8s.io v1 validation)
_OPERATORS = ("Equal", "Exists")


@dataclass(frozen=True)
class Toleration:
    """A request's device toleration (KEP-5055), which the scheduler copied into the allocation result."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""  # "": every effect

    def tolerates(self, taint: Taint) -> bool:
        # The API's DeviceToleration.ToleratesTaint: an empty key with Exists tolerates every taint.
        if self.effect and self.effect != taint.effect:
            return False
        if self.key and self.key != taint.key:
            return False
        return self.operator == "Exists" or self.value == taint.value


@dataclass(frozen=True)
class Allocated:
    """One result of the claim's allocation for our driver."""

    request: str
    pool: str
    device: str
    admin_access: bool = False  # allocated for monitoring by an admin: may share a device with another claim
    # The request's tolerations: the scheduler allocated a tainted device because of them; prepare honours them.
    tolerations: tuple[Toleration, ...] = ()


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ClaimError(f"{where}.{key}: {json_type(value)}, not a string")
    return value


def _tolerations(value: Any, where: str) -> tuple[Toleration, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOLERATIONS:
        raise ClaimError(f"{where}.tolerations: {json_type(value)}, not a list of at most {MAX_TOLERATIONS}")
    out = []
    for i, t in enumerate(value):
        at = f"{where}.tolerations[{i}]"
        if not isinstance(t, dict):
            raise ClaimError(f"{at}: {json_type(t)}, not an object")
        fields = {k: t.get(k) or "" for k in ("key", "operator", "value", "effect")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise ClaimError(f"{at}: key, operator, value and effect must be strings")
        fields["operator"] = fields["operator"] or "Equal"
        if fields["operator"] not in _OPERATORS:
            raise ClaimError(f"{at}.operator: {show(fields['operator'])}, not one of {', '.join(_OPERATORS)}")
        out.append(Toleration(**fields))
    return tuple(out)


def allocated(answer: Any, ref: ClaimRef, version: str, driver: str, pool: str) -> list[Allocated]:
    """The results of `driver` in the claim the API answered with, once it is checked to be the claim
    asked for (kind, namespace, name, UID) and allocated; every one of them must be in `pool` (this node's).

    Results of other drivers are theirs to prepare and are left out."""
    what = f"ResourceClaim {ref.namespace}/{ref.name}"
    if not isinstance(answer, dict):
        raise ClaimError(f"{what}: the API answered {json_type(answer)}, not a ResourceClaim")
    kind, api_version = answer.get("kind"), answer.get("apiVersion")
    if kind is not None and kind != "ResourceClaim":
        raise ClaimError(f"{what}: the API answered a {show(kind)}, not a ResourceClaim")
    if api_version is not None and api_version != f"{GROUP}/{version}":
        raise ClaimError(f"{what}: the API answered apiVersion {show(api_version)}, where {GROUP}/{version} "
                         "was asked for")
    meta = answer.get("metadata")
    if not isinstance(meta, dict):
        raise ClaimError(f"{what}: no metadata in the answer")
    if meta.get("namespace") != ref.namespace or meta.get("name") != ref.name:
        raise ClaimError(f"{what}: the API answered {show(meta.get('namespace'))}/{show(meta.get('name'))}")
    if meta.get("uid") != ref.uid:
        # The kubelet's helper says "got replaced": the name now holds another claim than the pod's.
        raise ClaimError(f"{what} got replaced: its UID is {show(meta.get('uid'))}, the kubelet asked for {ref.uid}")
    status = answer.get("status")
    allocation = status.get("allocation") if isinstance(status, dict) else None
    if not isinstance(allocation, dict):
        raise ClaimError(f"{what} is not allocated (no status.allocation)")
    devices = allocation.get("devices", {})
    results = devices.get("results", []) if isinstance(devices, dict) else None
    if not isinstance(results, list):
        raise ClaimError(f"{what}: status.allocation.devices.results is {json_type(results)}, not a list")
    if len(results) > MAX_RESULTS:
        raise ClaimError(f"{what}: {len(results)} allocation results, more than {MAX_RESULTS}")
    out: list[Allocated] = []
    for i, result in enumerate(results):
        where = f"{what}: status.allocation.devices.results[{i}]"
        if not isinstance(result, dict):
            raise ClaimError(f"{where}: {json_type(result)}, not an object")
        if _text(result, "driver", where) != driver:
            continue
        # A subrequest's result ("gpus/h100", firstAvailable) is answered for its request, as the kubelet's
        # helper does: containers name requests, not subrequests.
        request = _text(result, "request", where).split("/", 1)[0]
        got = Allocated(request, _text(result, "pool", where), _text(result, "device", where),
                        result.get("adminAccess") is True, _tolerations(result.get("tolerations"), where))
        if got.pool != pool:
            # Another node's device: preparing the rest would give the pod fewer devices than it claimed.
            raise ClaimError(f"{what}: device {show(got.device)} of pool {show(got.pool)} is not on this node "
                             f"(pool {pool})")
        out.append(got)
    return out


@dataclass(frozen=True)
class Chosen:
    """A device of ours to prepare for a claim: the allocation result and the device it names."""

    requests: tuple[str, ...]
    pool: str
    name: str
    device: DeviceState
    admin_access: bool = False  # every result naming it is for admin access


def choose(results: Iterable[Allocated], offered: Mapping[str, DeviceState],
           in_use: Mapping[str, str], ref: ClaimRef, kubelet_held: frozenset[str] = frozenset()) -> list[Chosen]:
    """The devices of the claim's results: each must be one DRA offers on this node (`offered`, name ->
    device), Healthy or with every taint the slices publish for it tolerated by the result, and not
    prepared for another claim (`in_use`, name -> that claim), nor of a GPU the kubelet's device manager
    has given to a pod (`kubelet_held`, GPU UUIDs). A result for admin access is prepared
    whatever the device's health and use: looking at a broken or busy GPU is what it is for. ClaimError
    names the first device that is not."""
    out: dict[str, Chosen] = {}
    for r in results:
        if not is_device_name(r.device):
            raise ClaimError(f"claim {ref}: device {show(r.device)} is not a device name")
        device = offered.get(r.device)
        if device is None:
            known = ", ".join(sorted(offered)[:8]) + (", ..." if len(offered) > 8 else "")
            raise ClaimError(f"claim {ref}: device {r.device} is not one this node offers through DRA "
                             f"(offered: {known or 'none'})")
        if device.health == UNHEALTHY and not r.admin_access:
            # The taints the slices publish (effect None keeps no one off a device); the scheduler gave the
            # device to the claim because its request tolerates them, e.g. a cordon the user accepts.
            held = [t for t in taints_of(device, {}) if t.effect != "None"]
            untolerated = [t for t in held if not any(tol.tolerates(t) for tol in r.tolerations)]
            if untolerated or not held:
                named = ", ".join(f"{t.key}{'=' + t.value if t.value else ''}:{t.effect}" for t in untolerated)
                raise ClaimError(f"claim {ref}: device {r.device} ({device.id}) is Unhealthy: "
                                 f"{device.reason or 'no reason given'}; request {r.request} does not tolerate its "
                                 f"taint {named or '(none)'}")
        gpu = device.id if device.kind == "gpu" else device.parent
        if gpu in kubelet_held and not r.admin_access:
            raise ClaimError(f"claim {ref}: device {r.device} ({device.id}) is held by a pod through the device "
                             f"plugin (the kubelet's device manager allocated GPU {gpu}); it is DRA's once that "
                             "pod is gone")
        other = in_use.get(r.device)
        if other is not None and not r.admin_access:
            raise ClaimError(f"claim {ref}: device {r.device} is prepared for another claim, {other}")
        before = out.get(r.device)
        if before is not None:  # one device for two requests (admin access): one CDI device, both requests
            out[r.device] = Chosen((*before.requests, r.request), r.pool, r.device, device,
                                   before.admin_access and r.admin_access)
        else:
            out[r.device] = Chosen((r.request,), r.pool, r.device, device, r.admin_access)
    return list(out.values())
