"""The labels as NFD's NodeFeature object, NVIDIA's GFD output since v0.19 (internal/lm/output.go).

One object per node, `nvidia-features-for-<node>` in the pod's namespace, labelled with the node it
is for (`nfd.node.kubernetes.io/node-name`, which nfd-master filters by), its spec the labels and no
raw features. Each pass reads it: absent, it is created; present, its labels and spec are replaced
and it is written back with the resourceVersion read (an update, not a patch: the object becomes
what this pass says, whatever another writer left in it); already as wanted, nothing is written.

A write that loses a race (409: another writer updated the object after the read, or created it
after a 404) is read again and retried, ATTEMPTS in all. NVIDIA's fails the pass instead and
its pod restarts; a conflict is a normal answer to an update that carries a resourceVersion
(client-go's RetryOnConflict exists for it), and the retry costs one read.

Every answer is checked before it is used: a NodeFeature of this name and namespace with a
resourceVersion, and after a write the labels that were sent. Anything else (a proxy's answer, a
misrouted one) is a failed write, said in one line, as is any refusal (403 names the RBAC it needs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.kubeapi import ApiStatus, BadAnswer, Http, kind_of, request, show

log = logging.getLogger("gpu-feature-discovery")

API_VERSION = "nfd.k8s-sigs.io/v1alpha1"
KIND = "NodeFeature"
NAME_PREFIX = "nvidia-features-for"  # output.go nodeFeatureVendorPrefix
NODE_NAME_LABEL = "nfd.node.kubernetes.io/node-name"  # nfdv1alpha1.NodeFeatureObjNodeNameLabel
ATTEMPTS = 3  # reads and writes of one pass when writes lose races


@dataclass(frozen=True)
class Target:
    node: str
    namespace: str

    @property
    def name(self) -> str:
        return f"{NAME_PREFIX}-{self.node}"

    @property
    def collection(self) -> str:
        return f"/apis/{API_VERSION}/namespaces/{self.namespace}/nodefeatures"

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.name}"

    def __str__(self) -> str:
        return f"NodeFeature {self.namespace}/{self.name}"


def spec_of(labels: Mapping[str, str]) -> dict[str, Any]:
    """nfdv1alpha1.NodeFeatureSpec{Features: *NewFeatures(), Labels: labels}: no raw features."""
    return {"features": {"flags": {}, "attributes": {}, "instances": {}}, "labels": dict(labels)}


def _checked(answer: Any, target: Target, what: str) -> dict[str, Any]:
    """The answer if it is the NodeFeature asked for, with what a write needs of it; else BadAnswer."""
    if not isinstance(answer, dict) or answer.get("kind") != KIND or answer.get("apiVersion") != API_VERSION:
        raise BadAnswer(f"{what}: {kind_of(answer)} where a {KIND} ({API_VERSION}) was asked for")
    meta = answer.get("metadata")
    if not isinstance(meta, dict):
        raise BadAnswer(f"{what}: metadata is {kind_of(meta)}")
    if meta.get("name") != target.name or meta.get("namespace", target.namespace) != target.namespace:
        raise BadAnswer(f"{what}: the {KIND} {show(meta.get('namespace'))}/{show(meta.get('name'))}, "
                        f"not {target.namespace}/{target.name}")
    version = meta.get("resourceVersion")
    if not isinstance(version, str) or not version:
        raise BadAnswer(f"{what}: metadata.resourceVersion is {show(version)}")
    labels = meta.get("labels")
    if labels is not None and not isinstance(labels, dict):
        raise BadAnswer(f"{what}: metadata.labels is {kind_of(labels)}")
    spec = answer.get("spec")
    if spec is not None and not isinstance(spec, dict):
        raise BadAnswer(f"{what}: spec is {kind_of(spec)}")
    spec_labels = (spec or {}).get("labels")
    if spec_labels is not None and not (isinstance(spec_labels, dict) and
                                        all(isinstance(v, str) for v in spec_labels.values())):
        raise BadAnswer(f"{what}: spec.labels is {kind_of(spec_labels)}, not names to strings")
    return answer


def _written(answer: Any, target: Target, labels: Mapping[str, str], what: str) -> dict[str, Any]:
    """A write's answer: the object as stored, which must hold the labels sent."""
    obj = _checked(answer, target, what)
    if (obj.get("spec") or {}).get("labels") != dict(labels):
        raise BadAnswer(f"{what}: the answer does not hold the labels that were sent")
    return obj


def _as_wanted(obj: dict[str, Any], target: Target, labels: Mapping[str, str]) -> bool:
    """output.go's DeepEqual after setting metadata.labels and spec: nothing to write. Empty raw
    features compare equal however the server kept them (absent, null or empty maps)."""
    spec = obj.get("spec") or {}
    features = spec.get("features") or {}
    return (obj["metadata"].get("labels") == {NODE_NAME_LABEL: target.node}
            and spec.get("labels") == dict(labels)
            and not any(features.get(k) for k in ("flags", "attributes", "instances"))
            and set(features) <= {"flags", "attributes", "instances"})


async def _get(http: Http, target: Target) -> dict[str, Any] | None:
    """The object, or None where the server says it does not exist."""
    try:
        answer = await request(http, "GET", target.path, f"GET {target}")
    except ApiStatus as e:
        if e.code == 404:
            return None
        raise
    return _checked(answer, target, f"GET {target}")


async def publish(http: Http, target: Target, labels: Mapping[str, str]) -> str:
    """Creates or updates the object so that it holds `labels`: "created", "updated" or "unchanged".
    Raises what common.kubeapi's requests raise (READ_ERRORS) when it cannot."""
    for attempt in range(1, ATTEMPTS + 1):
        current = await _get(http, target)
        try:
            if current is None:
                body = {"apiVersion": API_VERSION, "kind": KIND,
                        "metadata": {"name": target.name, "namespace": target.namespace,
                                     "labels": {NODE_NAME_LABEL: target.node}},
                        "spec": spec_of(labels)}
                what = f"POST {target}"
                _written(await request(http, "POST", target.collection, what, body=body), target, labels, what)
                return "created"
            if _as_wanted(current, target, labels):
                return "unchanged"
            # output.go: the object read, its labels and spec replaced (the rest, resourceVersion
            # first, kept: the update is refused if anyone wrote since).
            body = {**current, "metadata": {**current["metadata"], "labels": {NODE_NAME_LABEL: target.node}},
                    "spec": spec_of(labels)}
            what = f"PUT {target}"
            _written(await request(http, "PUT", target.path, what, body=body), target, labels, what)
            return "updated"
        except ApiStatus as e:
            # 409: Conflict (written since the read) or AlreadyExists (created since the 404);
            # 404 on an update: deleted since the read. Each is a race: read again.
            if attempt == ATTEMPTS or not (e.code == 409 or (e.code == 404 and current is not None)):
                raise
            log.info("%s: %s; reading it again (attempt %d of %d)", target, e, attempt + 1, ATTEMPTS)
    raise AssertionError("unreachable: the last attempt returns or raises")


def hint(e: BaseException, target: Target) -> str:
    """What an operator can do about a refusal, where the answer says it."""
    if isinstance(e, ApiStatus) and e.code == 403:
        return (f" (the pod's service account needs get, create and update on nodefeatures.nfd.k8s-sigs.io "
                f"in namespace {target.namespace})")
    if isinstance(e, ApiStatus) and e.code == 404:
        return " (is NFD's NodeFeature CRD, nodefeatures.nfd.k8s-sigs.io, installed?)"
    return ""
