"""The kube-agent's checks of what the API server answers (services.kube_agent.agent.NodeApi),
as pure functions of the answer: what is taken from it, and what makes it a failed read."""

from __future__ import annotations

import json
from typing import Any, cast

import httpx2
import pytest

from common.kubeapi import ApiStatus, BadAnswer, reason
from services.kube_agent.agent import NodeApi, Seen

LABEL = "nvidia.com/device-plugin.config"
API = NodeApi(cast(httpx2.AsyncClient, None), "node-1", LABEL)  # the checks never touch the connection


def node(**meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1", "resourceVersion": "7", "labels": {LABEL: "ts-4"}, **meta}}


def test_a_node_gives_its_label_and_version() -> None:
    assert API._node(node(), "GET") == Seen("ts-4", "7")
    assert API._node(node(labels=None), "GET") == Seen(None, "7")
    assert API._node(node(labels={"other": "x"}), "GET") == Seen(None, "7")
    item = node()
    del item["kind"], item["apiVersion"]  # a list's items go without them
    assert API._node(item, "list", listed=True) == Seen("ts-4", "7")


@pytest.mark.parametrize(("obj", "why"), [
    ({**node(), "kind": "Pod"}, "a 'Pod' where a Node was expected"),
    ({k: v for k, v in node().items() if k != "kind"}, "an object where a Node was expected"),
    ([node()], "an array where a Node was expected"),
    ({**node(), "apiVersion": "v2"}, "apiVersion 'v2'"),
    ({**node(), "metadata": "node-1"}, "metadata is a string"),
    (node(name="node-2"), "named 'node-2'"),
    (node(name=None), "named None"),
    (node(namespace="default"), "has a namespace"),
    (node(resourceVersion=7), "resourceVersion is 7"),
    (node(labels=["a=b"]), "metadata.labels is an array"),
    (node(labels={"a": 1}), "label 'a' has a number"),
    (node(labels={LABEL: "ts-4\nFORGED log line"}), "is not a label value"),
    (node(labels={LABEL: "x" * 64}), "is not a label value"),
])
def test_what_is_not_this_node_is_refused(obj: Any, why: str) -> None:
    with pytest.raises(BadAnswer, match=why.replace("(", r"\(")):
        API._node(obj, "GET")


def event(kind: str, obj: Any) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode()


def test_watch_events() -> None:
    assert API._event(event("MODIFIED", node()), "watch") == ("MODIFIED", Seen("ts-4", "7"))
    assert API._event(event("DELETED", node()), "watch") == ("DELETED", Seen("ts-4", "7"))
    bookmark = {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": "9"}}
    assert API._event(event("BOOKMARK", bookmark), "watch") == ("BOOKMARK", Seen(None, "9"))
    with pytest.raises(ApiStatus) as gone:
        API._event(event("ERROR", {"kind": "Status", "code": 410, "message": "too old"}), "watch")
    assert gone.value.code == 410


@pytest.mark.parametrize(("line", "why"), [
    (event("RENAMED", node()), "an event of type 'RENAMED'"),
    (event("DELETED", node(name="node-2")), "named 'node-2'"),
    (event("MODIFIED", {"kind": "Status", "code": 200}), "a 'Status' where a Node was expected"),
    (event("BOOKMARK", {"kind": "Node", "metadata": {"resourceVersion": 9}}), "resourceVersion is 9"),
    (event("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "9"}}), "a BOOKMARK of a 'Pod'"),
    (event("ERROR", "gone"), "an ERROR event without a Status"),
    (b'{"type": "MODIFIED"}', "not a watch event"),
    (b"[1, 2]", "not a watch event"),
    (b'{"type": "MODIFIED", "object": {', "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000, "not JSON"),
])
def test_what_is_not_a_watch_event_of_this_node_is_refused(line: bytes, why: str) -> None:
    with pytest.raises(BadAnswer, match=why):
        API._event(line, "watch")


def test_a_reason_quotes_an_answer_short_and_escaped() -> None:
    with pytest.raises(BadAnswer) as e:
        API._node(node(name="n\n" * 1_000_000), "GET")
    text = reason(e.value)
    assert len(text) < 200 and "\n" not in text and text.startswith("answer refused: GET: the Node is named 'n\\n")
