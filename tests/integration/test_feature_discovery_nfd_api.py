"""gpu-feature-discovery with NVIDIA's default output since v0.19 (k8s-device-plugin#1504): NFD's
NodeFeature object, which nfd-master turns into node labels. The real process on the simulated
driver, through real HTTP to the emulated API server (devtools.kube_api), with the environment
NVIDIA's chart and the GPU Operator give it (NODE_NAME, NAMESPACE from the downward API).

What NVIDIA's does (internal/lm/output.go, cmd/gpu-feature-discovery/main.go): the object
`nvidia-features-for-<node>` in NAMESPACE, labelled nfd.node.kubernetes.io/node-name=<node>, its
spec the labels (no raw features); a GET, then a create on 404 or an update of what was read; no
file written, nothing removed at exit; a failed write fails the pass and the command exits 1.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.kubeapi import BadAnswer, default_client
from devtools.kube_api import NODEFEATURE_FAULTS
from services.feature_discovery.nodefeature import ATTEMPTS, Target, publish
from tests.conftest import Procs, wait_until
from tests.integration.test_feature_discovery import DGX_H100, TIME_SLICING, Gfd, without_timestamp
from tests.integration.test_kube_agent import Api

NODE = "gpu-node-1"
NS = "gpu-operator"
NAME = f"nvidia-features-for-{NODE}"
COLLECTION = f"/apis/nfd.k8s-sigs.io/v1alpha1/namespaces/{NS}/nodefeatures"
OBJECT = f"{COLLECTION}/{NAME}"
NO_FEATURES = {"flags": {}, "attributes": {}, "instances": {}}  # nfdv1alpha1.NewFeatures()


class NfdGfd(Gfd):
    """The command as NVIDIA's manifests run it: no output variable, so NVIDIA's default (the object)."""

    OUTPUT_ENV: dict[str, str] = {}

    def __init__(self, procs: Procs, root: Path, api: Api) -> None:
        super().__init__(procs, root)
        self.api = api
        self.kubeconfig = root / "kubeconfig"
        self.kubeconfig.write_text(api.emu.kubeconfig())
        self.access = {"NODE_NAME": NODE, "NAMESPACE": NS, "KUBECONFIG": str(self.kubeconfig)}

    def start(self, *args: str, fleet: str = "dgx-h100-8", config: str | None = None,
              **env: str) -> subprocess.Popen[bytes]:
        return super().start(*args, fleet=fleet, config=config, **{**self.access, **env})

    def run_once(self, *args: str, **env: str) -> int:
        return self.exited(self.start("--oneshot", *args, **env))

    def stored(self) -> dict[str, Any]:
        return self.api.do(lambda: self.api.emu.nodefeatures.objects[(NS, NAME)])  # type: ignore[no-any-return]

    def calls(self) -> list[tuple[str, str]]:
        return self.api.do(lambda: [(r.method, r.path) for r in self.api.emu.requests])  # type: ignore[no-any-return]


@pytest.fixture
def api() -> Iterator[Api]:
    a = Api()
    yield a
    a.close()


@pytest.fixture
def gfd(procs: Procs, short_tmp: Path, api: Api) -> NfdGfd:
    return NfdGfd(procs, short_tmp, api)


def test_oneshot_creates_the_object_with_the_labels_the_file_would_hold(gfd: NfdGfd) -> None:
    before = int(time.time())
    assert gfd.run_once() == 0, gfd.log()
    after = int(time.time())
    obj = gfd.stored()
    assert (obj["apiVersion"], obj["kind"]) == ("nfd.k8s-sigs.io/v1alpha1", "NodeFeature")
    assert obj["metadata"]["labels"] == {"nfd.node.kubernetes.io/node-name": NODE}  # what nfd-master filters by
    assert obj["spec"]["features"] == NO_FEATURES
    assert gfd.calls() == [("GET", OBJECT), ("POST", COLLECTION)]
    assert not gfd.output.exists()  # the object instead of the file, not beside it
    published = obj["spec"]["labels"]
    assert before <= int(published["nvidia.com/gfd.timestamp"]) <= after
    # The file this command writes with --use-node-feature-api=false, for the same node: the same labels.
    assert gfd.run_once("--no-timestamp", GFD_USE_NODE_FEATURE_API="false") == 0, gfd.log()
    assert without_timestamp(published) == gfd.labels() == DGX_H100
    assert len(gfd.calls()) == 2  # the file's pass asked nothing of the API


def test_later_passes_update_the_one_object_and_sigterm_leaves_it(gfd: NfdGfd) -> None:
    p = gfd.start("--sleep-interval=infinite", "--no-timestamp", config="version: v1\n")
    wait_until(lambda: ("POST", COLLECTION) in gfd.calls(), 20, "the object to be created")
    created = gfd.stored()
    assert created["spec"]["labels"] == DGX_H100
    # A new config (the config-manager sidecar's switch, then SIGHUP): the next pass updates the object read.
    (gfd.root / f"config{gfd.runs}.yaml").write_text(TIME_SLICING.format(rename=""))
    p.send_signal(signal.SIGHUP)
    wait_until(lambda: ("PUT", OBJECT) in gfd.calls(), 20, "the object to be updated")
    updated = gfd.stored()
    assert updated["spec"]["labels"] == {**DGX_H100, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED",
                                         "nvidia.com/gpu.replicas": "4",
                                         "nvidia.com/gpu.sharing-strategy": "time-slicing"}
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]  # the same object, a new version
    assert int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    # Nothing changed: read, and not written (output.go: "no changes in NodeFeature object").
    p.send_signal(signal.SIGHUP)
    wait_until(lambda: "unchanged" in gfd.log(), 20, "the third pass")
    assert gfd.calls() == [("GET", OBJECT), ("POST", COLLECTION), ("GET", OBJECT), ("PUT", OBJECT), ("GET", OBJECT)]
    assert gfd.procs.stop(p) == 0
    # NVIDIA's run(): nothing is removed with the NodeFeature API; the labels stay with the object.
    assert gfd.api.do(lambda: list(gfd.api.emu.nodefeatures.objects)) == [(NS, NAME)]
    assert gfd.stored() == updated
    assert not gfd.output.exists()


def test_a_config_that_turns_the_api_on_moves_the_labels_from_the_file(gfd: NfdGfd) -> None:
    # flags.useNodeFeatureAPI in the config file, switched by the config-manager sidecar: NVIDIA's
    # restart on SIGHUP removes the old config's file, and the new config publishes the object.
    p = gfd.start("--sleep-interval=infinite", "--no-timestamp",
                  config="version: v1\nflags:\n  useNodeFeatureAPI: false\n")
    wait_until(gfd.output.exists, 20, "the labels file")
    assert gfd.labels() == DGX_H100 and gfd.calls() == []
    (gfd.root / f"config{gfd.runs}.yaml").write_text("version: v1\n")  # the default: the object
    p.send_signal(signal.SIGHUP)
    wait_until(lambda: ("POST", COLLECTION) in gfd.calls(), 20, "the object to be created")
    assert gfd.stored()["spec"]["labels"] == DGX_H100
    assert not gfd.output.exists()  # not both: NFD would merge a stale file with the object
    assert gfd.procs.stop(p) == 0


@pytest.mark.parametrize("races", [ATTEMPTS - 1, ATTEMPTS])
def test_a_write_that_loses_a_race_reads_again_a_bounded_number_of_times(gfd: NfdGfd, races: int) -> None:
    # Another writer goes first each time: it creates the object after the 404 (POST: 409
    # AlreadyExists), then writes it after each read (PUT: 409 Conflict).
    gfd.api.do(lambda: setattr(gfd.api.emu.nodefeatures, "races", races))
    rc = gfd.run_once("--no-timestamp")
    calls = gfd.calls()
    assert calls[:2] == [("GET", OBJECT), ("POST", COLLECTION)]
    assert calls[2:] == [("GET", OBJECT), ("PUT", OBJECT)] * (ATTEMPTS - 1)  # never more than ATTEMPTS writes
    assert gfd.log().count("reading it again") == ATTEMPTS - 1
    if races < ATTEMPTS:
        assert rc == 0, gfd.log()
        assert gfd.stored()["spec"]["labels"] == DGX_H100  # the other writer's labels replaced, not merged
        assert gfd.stored()["metadata"]["labels"] == {"nfd.node.kubernetes.io/node-name": NODE}
    else:
        assert rc == 1, gfd.log()
        assert gfd.last_line().startswith(f"gpu-feature-discovery: error: cannot publish the labels as "
                                          f"NodeFeature {NS}/{NAME}: HTTP 409: Operation cannot be fulfilled")


@pytest.mark.parametrize(("case", "said"), [
    ("rbac", f"HTTP 403: injected 403 (the pod's service account needs get, create and update on "
             f"nodefeatures.nfd.k8s-sigs.io in namespace {NS})"),
    ("no-node-name", "the NodeFeature API needs the node's name: set NODE_NAME"),
    ("no-kubeconfig", "no API access configured"),
])
def test_a_refusal_fails_the_pass_in_one_line(gfd: NfdGfd, case: str, said: str) -> None:
    env: dict[str, str] = {}
    if case == "rbac":
        gfd.api.do(lambda: gfd.api.emu.failures.append(403))
    elif case == "no-node-name":
        env["NODE_NAME"] = ""
    else:
        env["KUBECONFIG"] = str(gfd.root / "absent")
    p = gfd.start(**env)  # the DaemonSet's mode: NVIDIA's exits 1 on a failed pass, the pod restarts
    assert gfd.exited(p) == 1, gfd.log()
    assert said in gfd.last_line(), gfd.log()
    assert "Traceback" not in gfd.log()
    assert gfd.log().count(said) == 1  # said once, last
    assert not gfd.output.exists()
    assert gfd.calls() == ([("GET", OBJECT)] if case == "rbac" else [])


@pytest.mark.parametrize("fault", NODEFEATURE_FAULTS)
def test_an_answer_that_is_not_the_object_is_refused(api: Api, short_tmp: Path, fault: str) -> None:
    """Whatever answers in the object's place (another name, a Node, no resourceVersion, malformed
    labels, a write's answer without the labels sent) fails the pass before anything is trusted."""
    kubeconfig = short_tmp / "kubeconfig"
    kubeconfig.write_text(api.emu.kubeconfig())
    api.do(lambda: api.emu.nodefeatures.add(NS, NAME, {"nvidia.com/gpu.count": "7"}, node=NODE))
    api.do(lambda: setattr(api.emu.nodefeatures, "fault", fault))

    async def attempt() -> str:
        async with default_client(str(kubeconfig)) as http:
            with pytest.raises(BadAnswer) as info:
                await publish(http, Target(NODE, NS), {"nvidia.com/gpu.count": "8"})
        return str(info.value)

    message = asyncio.run(attempt())
    calls = [(r.method, r.path) for r in api.do(lambda: list(api.emu.requests))]
    if fault == "other-labels":  # the read is fine; the write's answer does not show the write
        assert message == f"PUT NodeFeature {NS}/{NAME}: the answer does not hold the labels that were sent"
        assert calls == [("GET", OBJECT), ("PUT", OBJECT)]
    else:
        assert message.startswith(f"GET NodeFeature {NS}/{NAME}: "), message
        assert calls == [("GET", OBJECT)]  # nothing written on the strength of a bad read
