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


@dataclass(frozen=True)
class Allocated:
    """One result of the claim's allocation for our driver."""

    request: str
    pool: str
    device: str
    admin_access: bool = False  # allocated for monitoring by an admin: may share a device with another claim


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ClaimError(f"{where}.{key}: {json_type(value)}, not a string")
    return value


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
                        result.get("adminAccess") is True)
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


def choose(results: Iterable[Allocated], offered: Mapping[str, DeviceState],
           in_use: Mapping[str, str], ref: ClaimRef) -> list[Chosen]:
    """The devices of the claim's results: each must be one DRA offers on this node (`offered`, name ->
    device) and Healthy, and not prepared for another claim (`in_use`, name -> that claim) unless the
    result is for admin access. ClaimError names the first device that is not."""
    out: dict[str, Chosen] = {}
    for r in results:
        if not is_device_name(r.device):
            raise ClaimError(f"claim {ref}: device {show(r.device)} is not a device name")
        device = offered.get(r.device)
        if device is None:
            known = ", ".join(sorted(offered)[:8]) + (", ..." if len(offered) > 8 else "")
            raise ClaimError(f"claim {ref}: device {r.device} is not one this node offers through DRA "
                             f"(offered: {known or 'none'})")
        if device.health == UNHEALTHY:
            raise ClaimError(f"claim {ref}: device {r.device} ({device.id}) is Unhealthy: "
                             f"{device.reason or 'no reason given'}")
        other = in_use.get(r.device)
        if other is not None and not r.admin_access:
            raise ClaimError(f"claim {ref}: device {r.device} is prepared for another claim, {other}")
        before = out.get(r.device)
        if before is not None:  # one device for two requests (admin access): one CDI device, both requests
            out[r.device] = Chosen((*before.requests, r.request), r.pool, r.device, device)
        else:
            out[r.device] = Chosen((r.request,), r.pool, r.device, device)
    return list(out.values())
