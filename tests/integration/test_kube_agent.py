"""The kube-agent as a real process against the emulated API server (devtools.kube_api), driven by
the same client library the product uses; the ConfigMap is a real directory laid out as the kubelet
mounts one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common import restarts
from common.bus.messages import KUBE_SOCKET, KubeState
from devtools.kube_api import EVENT_FAULTS, FAULTS
from tests.conftest import Procs, wait_until
from tests.integration.busclient import BusWatch
from tests.integration.fakes import EmulatedApi

LABEL = "nvidia.com/device-plugin.config"
TS4 = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
TS8 = TS4.replace("replicas: 4", "replicas: 8")
MIXED = "version: v1\nflags:\n  migStrategy: mixed\n"
DEFAULT = "version: v1\n"


def config_map(src: Path, configs: dict[str, str], generation: int = 1) -> None:
    """Lays out (or updates, as the kubelet does: a new ..data dir, one symlink swap) a ConfigMap volume."""
    src.mkdir(parents=True, exist_ok=True)
    data = src / f"..2026_12_01_00_00_0{generation}.1"
    data.mkdir()
    for name, text in configs.items():
        (data / name).write_text(text)
    tmp = src / "..data_tmp"
    tmp.symlink_to(data.name)
    old = (src / "..data").resolve() if (src / "..data").exists() else None
    os.replace(tmp, src / "..data")
    for name in configs:
        if not (src / name).is_symlink():
            (src / name).symlink_to(f"..data/{name}")
    for entry in src.iterdir():
        if not entry.name.startswith(".") and entry.name not in configs:
            entry.unlink()
    if old is not None:
        shutil.rmtree(old)


Api = EmulatedApi


@pytest.fixture
def api() -> Iterator[Api]:
    a = Api()
    yield a
    a.close()


class Agent:
    def __init__(self, procs: Procs, root: Path, api: Api | None, name: str = "kube-agent", **env: str) -> None:
        self.root = root
        self.name = name  # its log is <procs' root>/<name>.log
        self.src = root / "available-configs"
        self.dst = root / "config" / "config.yaml"
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        kubeconfig = root / "kubeconfig"
        kubeconfig.write_text(api.emu.kubeconfig() if api else "{}")
        self.env = {"GPU_PLUGIN_RUN_DIR": str(root / "run"), "CONFIG_FILE": str(self.dst),
                    "CONFIG_FILE_SRCDIR": str(self.src), "NODE_NAME": "node-1", "NODE_LABEL": LABEL,
                    "FALLBACK_STRATEGIES": "named,single", "DEFAULT_CONFIG": "", "KUBECONFIG": str(kubeconfig),
                    "GPU_PLUGIN_WATCHDOG_TIMEOUT": "30s", **env}
        self.procs = procs
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.p = self.procs.start(self.name, "kube-agent", env=self.env)
        return self.p

    def config(self) -> str:
        return self.dst.read_text() if self.dst.exists() else ""

    def log(self) -> str:
        return self.procs.log(self.name)

    def wait_config(self, text: str, timeout: float = 30) -> None:
        wait_until(lambda: self.config() == text, timeout, f"config file = {text!r}")

    def state(self, predicate: Callable[[KubeState], bool], timeout: float = 30) -> KubeState:
        with self.bus() as bus:
            return self.wait_state(bus, predicate, timeout)

    def bus(self) -> BusWatch:
        """Subscribed (the publisher's replay proves it) before the test acts: a state the agent
        publishes for a moment only (a failed read before its retry succeeds) is not missed."""
        return BusWatch(self.root / "run" / KUBE_SOCKET, (KubeState.TOPIC,))

    @staticmethod
    def wait_state(bus: BusWatch, predicate: Callable[[KubeState], bool], timeout: float = 30) -> KubeState:
        msg = bus.wait(lambda m: isinstance(m, KubeState) and predicate(m), timeout)
        assert isinstance(msg, KubeState)
        return msg

    def running(self) -> None:
        assert self.p is not None and self.p.poll() is None, f"the kube-agent exited ({self.p and self.p.returncode})"

    def peak_rss_kb(self) -> int:
        """VmHWM: the most memory the process ever held resident."""
        assert self.p is not None
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.fixture
def agent(procs: Procs, short_tmp: Path, api: Api) -> Agent:
    return Agent(procs, short_tmp, api)


def test_label_set_changed_removed(agent: Agent, api: Api) -> None:
    config_map(agent.src, {"default": DEFAULT, "ts-4": TS4, "ts-8": TS8})
    api.do(api.emu.add_node, "node-1", {"kubernetes.io/hostname": "node-1"})
    agent.start()
    agent.wait_config(DEFAULT)
    st = agent.state(lambda m: m.api_reachable and m.why == "fallback strategy named")
    assert (st.node, st.config, st.label) == ("node-1", "default", "")
    api.do(api.emu.set_label, "node-1", LABEL, "ts-4")
    agent.wait_config(TS4)
    api.do(api.emu.set_label, "node-1", LABEL, "ts-8")
    agent.wait_config(TS8)
    st = agent.state(lambda m: m.config == "ts-8")
    assert st.why == f"node label {LABEL}=ts-8" and st.label == "ts-8"
    api.do(api.emu.set_label, "node-1", LABEL, None)
    agent.wait_config(DEFAULT)
    # Least privilege: it only ever read and watched its own Node.
    for r in api.emu.requests:
        assert r.method == "GET"
        assert r.path == "/api/v1/nodes/node-1" or (
            r.path == "/api/v1/nodes" and r.query.get("fieldSelector") == "metadata.name=node-1"), r


def test_configmap_content_change_is_followed(agent: Agent, api: Api) -> None:
    config_map(agent.src, {"default": DEFAULT, "ts": TS4})
    api.do(api.emu.add_node, "node-1", {LABEL: "ts"})
    agent.start()
    agent.wait_config(TS4)
    config_map(agent.src, {"default": DEFAULT, "ts": TS8}, generation=2)
    agent.wait_config(TS8)


@pytest.mark.parametrize(("strategies", "configs", "expected"), [
    ("named", {"default": DEFAULT, "ts": TS4}, DEFAULT),
    ("single", {"only": MIXED}, MIXED),
    ("empty", {"a": TS4, "b": TS8}, "version: v1\n"),
], ids=["named", "single", "empty"])
def test_unknown_name_is_reported_not_fatal(procs: Procs, short_tmp: Path, api: Api, strategies: str,
                                           configs: dict[str, str], expected: str) -> None:
    agent = Agent(procs, short_tmp, api, FALLBACK_STRATEGIES=strategies)
    config_map(agent.src, configs)
    api.do(api.emu.add_node, "node-1", {LABEL: "no-such-config"})
    p = agent.start()
    agent.wait_config(expected)  # a node without a config comes up with the label-less selection
    st = agent.state(lambda m: m.unknown == "no-such-config")
    assert st.why == f"fallback strategy {strategies}"
    # Later, on a running node, an unknown name keeps the active config.
    name = sorted(configs)[0]
    api.do(api.emu.set_label, "node-1", LABEL, name)
    agent.wait_config(configs[name])
    api.do(api.emu.set_label, "node-1", LABEL, "typo")
    agent.state(lambda m: m.unknown == "typo")
    assert agent.config() == configs[name] and p.poll() is None


def test_api_unreachable_at_start_and_later(procs: Procs, short_tmp: Path) -> None:
    api = Api()
    try:
        agent = Agent(procs, short_tmp, api)
        config_map(agent.src, {"default": DEFAULT, "ts": TS4})
        api.do(api.emu.stop)  # nothing listens on its port
        agent.start()
        agent.wait_config(DEFAULT)  # no config yet: selected without the label
        st = agent.state(lambda m: not m.api_reachable and m.error != "")
        assert "Connect" in st.error or "refused" in st.error, st.error
        api.do(api.emu.add_node, "node-1", {LABEL: "ts"})
        api.do(api.emu.start)  # back, on the same port
        agent.wait_config(TS4)
        agent.state(lambda m: m.api_reachable)
        api.do(api.emu.stop)
        agent.state(lambda m: not m.api_reachable)
        assert agent.config() == TS4, "the active config stays while the API is away"
        api.do(api.emu.set_label, "node-1", LABEL, "default")
        api.do(api.emu.start)
        agent.wait_config(DEFAULT)
    finally:
        api.close()


def test_the_other_parts_do_not_wait_for_the_first_read_of_the_node(procs: Procs, short_tmp: Path) -> None:
    """An API server that takes the connection and does not answer holds the first read of the Node
    for the client's read timeout (up to a minute for one that trickles): meanwhile the metrics are
    served and the kube bus answers (the config file comes when the read gives up, as before: 10 s,
    test_api_unreachable_at_start_and_later)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the connections; nothing ever reads or answers them
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        agent = Agent(procs, short_tmp, None, METRICS_PORT=str(port))
        (short_tmp / "kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{silent.getsockname()[1]}"}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        config_map(agent.src, {"default": DEFAULT, "ts": TS4})

        def scraped() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False  # not listening yet

        agent.start()
        wait_until(scraped, 5, "the metrics, while the API holds the first read")
        st = agent.state(lambda m: m.parts == ["per-node configuration", "metrics"], timeout=2)
        assert not st.api_reachable and not agent.dst.exists(), "the first read was still waiting"
        agent.running()
    finally:
        silent.close()


def test_a_crash_loop_is_paused_by_the_agent_itself(procs: Procs, short_tmp: Path) -> None:
    """A part failing at its start: supervisord restarts the kube-agent at once (startsecs=0, so that
    its exit 0 with nothing to do is not a failed start), so the agent pauses before it exits, longer
    with each failure in a row; SIGTERM cuts the pause short. Here the failure is another process
    holding the kube bus (its lock), as a second kube-agent would."""
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"GPU_PLUGIN_RUN_DIR": str(run), "METRICS_PORT": str(port), "GPU_PLUGIN_WATCHDOG_TIMEOUT": "30s"}
    with open(run / f"{KUBE_SOCKET}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        assert procs.start("first", "kube-agent", env=env).wait(15) == 1
        assert time.monotonic() - t0 >= restarts.PAUSE_MIN_S
        assert "(quick failures in a row: 1): BusInUseError" in procs.log("first") and "exiting in 1 s" in \
            procs.log("first")
        second = procs.start("second", "kube-agent", env=env)  # as supervisord restarts it
        wait_until(lambda: "(quick failures in a row: 2)" in procs.log("second") and "exiting in 2 s" in
                   procs.log("second"), 10, "the second failure, paused longer")
        t1 = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 1 and time.monotonic() - t1 < restarts.PAUSE_MIN_S  # not the 2 s


def test_watch_dropped_errors_and_410_gone(agent: Agent, api: Api) -> None:
    config_map(agent.src, {"default": DEFAULT, "ts-4": TS4, "ts-8": TS8})
    api.do(api.emu.add_node, "node-1", {})
    agent.start()
    agent.wait_config(DEFAULT)
    wait_until(lambda: api.emu.watching == 1, 30, "the agent watching")
    api.do(api.emu.drop_watches)
    api.do(api.emu.set_label, "node-1", LABEL, "ts-4")
    agent.wait_config(TS4)
    # A change seen on the new watch: besides, a working watch puts the agent's retry pause back at
    # its shortest (0.5 s), else the errors below would be retried after 1 + 2 + 4 + 8 s.
    wait_until(lambda: api.emu.watching == 1, 30, "the agent watching again")
    api.do(api.emu.set_label, "node-1", LABEL, "default")
    agent.wait_config(DEFAULT)
    # Errors while it reconnects: retried until the API answers, the label change it missed seen.
    api.do(api.emu.failures.extend, [503, 500, 403])
    api.do(api.emu.drop_watches)
    api.do(api.emu.set_label, "node-1", LABEL, "ts-8")
    agent.wait_config(TS8)
    agent.state(lambda m: m.api_reachable and m.error == "")
    # The server ends the watch at its timeout after compacting its history: the client resumes
    # from a version now too old, gets 410 Gone, and the agent reads the node again. Driven again
    # if the watch it ended was one going away anyway (under load the agent's reconnect after the
    # errors can land after the compaction, and a fresh watch then has nothing to be told).
    deadline = time.monotonic() + 30
    while api.emu.gone < 1:
        assert time.monotonic() < deadline, "no 410 Gone within 30 s"
        wait_until(lambda: api.emu.watching == 1, 30, "the agent watching again")
        api.do(api.emu.touch, "node-1")
        api.do(api.emu.bookmark)
        api.do(api.emu.compact)
        api.do(api.emu.end_watches)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: api.emu.gone >= 1, 5, "410 Gone")
    wait_until(lambda: api.emu.gone >= 1 and api.emu.watching == 1, 30, "410 Gone, then a new watch")
    api.do(api.emu.set_label, "node-1", LABEL, "ts-4")
    agent.wait_config(TS4)


def test_bad_config_is_not_written(agent: Agent, api: Api) -> None:
    config_map(agent.src, {"default": DEFAULT, "bad": "version: v1\nflags:\n  migStrategy: sideways\n"})
    api.do(api.emu.add_node, "node-1", {})
    agent.start()
    agent.wait_config(DEFAULT)
    api.do(api.emu.set_label, "node-1", LABEL, "bad")
    st = agent.state(lambda m: "sideways" in m.error)
    assert st.config == "default" and agent.config() == DEFAULT


def test_without_per_node_configuration_it_exits_0_at_once(procs: Procs, short_tmp: Path) -> None:
    agent = Agent(procs, short_tmp, None, CONFIG_FILE_SRCDIR="")
    assert agent.start().wait(30) == 0
    assert "per-node configuration is off" in procs.log("kube-agent")


def test_a_silently_dead_watch_is_renewed(short_tmp: Path, api: Api) -> None:
    """In-process (to shorten the renewal): the real client against a watch that never answers."""
    from common.kubeapi import default_client
    from services.kube_agent.agent import KubeAgent
    from services.kube_agent.selection import Rules

    src = short_tmp / "configs"
    config_map(src, {"default": DEFAULT, "ts": TS4})
    api.do(api.emu.add_node, "node-1", {})
    (short_tmp / "kubeconfig").write_text(api.emu.kubeconfig())
    os.environ["KUBECONFIG"] = str(short_tmp / "kubeconfig")
    dst = short_tmp / "config.yaml"
    try:
        agent = KubeAgent(Rules(src), "node-1", dst, None, default_client, renew_s=1.0)
        api.do(agent.start)
        api.emu.black_hole = True  # the agent's watches now hang: a dead route
        api.lt.spawn(agent.follow_node())
        wait_until(lambda: any(r.query.get("watch") for r in api.emu.requests), 30, "the agent's watch")
        api.do(api.emu.set_label, "node-1", LABEL, "ts")  # lost in the black hole
        api.emu.black_hole = False
        wait_until(lambda: dst.read_text() == TS4, 30, "the label seen after the watch's renewal")
    finally:
        os.environ.pop("KUBECONFIG", None)


# -- answers that are not our Node ----------------------------------------------------------------
# What the reason on the bus names, per fault: the agent says what was wrong with the answer.
REASON = {"pod": "Pod", "status": "Status", "other-name": "node-1-other", "two-nodes": "2 items",
          "labels-list": "metadata.labels", "label-number": "a number", "invalid": "resourceVersion",
          "not-json": "not JSON", "truncated": "not JSON", "cut": "RemoteProtocolError", "huge": "larger than",
          "unknown-type": "RENAMED"}
EVENT_REASON = {**REASON, "two-nodes": "NodeList", "cut": "incomplete chunked read"}
GET_REASON = {**REASON, "two-nodes": "NodeList"}


def following(agent: Agent, api: Api, label: str = "ts-4") -> None:
    config_map(agent.src, {"default": DEFAULT, "ts-4": TS4, "ts-8": TS8})
    api.do(api.emu.add_node, "node-1", {LABEL: label})
    agent.start()
    agent.wait_config({"ts-4": TS4, "ts-8": TS8}[label])
    wait_until(lambda: api.emu.watching == 1, 30, "the agent watching")


def label_followed_again(agent: Agent, api: Api, bus: BusWatch, *active: str) -> None:
    """Once the API answers properly, a label change is followed, and no state published while it
    misbehaved had a config other than `active`."""
    api.do(api.emu.set_label, "node-1", LABEL, "ts-8")
    agent.wait_config(TS8)
    agent.wait_state(bus, lambda m: m.api_reachable and m.error == "" and m.config == "ts-8")
    only_configs(bus, *active, "ts-8")


def only_configs(bus: BusWatch, *names: str) -> None:
    """No state the agent published while the API misbehaved had another config active."""
    seen = {m.config for m in bus.seen if isinstance(m, KubeState)}
    assert seen <= set(names), f"configs active meanwhile: {seen}"


def each_fault_at_once(procs: Procs, tmp: Path, faults: Iterable[str],
                       scenario: Callable[[Agent, Api, str], None]) -> None:
    """`scenario(agent, api, fault)` for every fault, all at the same time, each with an API server
    and a kube-agent of its own (nothing is shared between two faults). A scenario waits mostly on
    the agent's retry pauses (0.5, 1, 2 s...): here they overlap instead of adding up, one test
    instead of one per fault. Every fault's failure is reported, named."""

    def one(fault: str) -> None:
        api = Api()
        try:
            scenario(Agent(procs, tmp / fault, api, name=f"kube-agent-{fault}"), api, fault)
        finally:
            api.close()

    faults = list(faults)
    with ThreadPoolExecutor(len(faults)) as pool:
        futures = {fault: pool.submit(one, fault) for fault in faults}
    failed = {fault: e for fault, f in futures.items() if (e := f.exception()) is not None}
    assert not failed, f"{len(failed)} of {len(faults)} faults failed:\n" + "\n".join(
        f"--- {fault}:\n{''.join(traceback.format_exception(e))}" for fault, e in failed.items())


def test_a_bad_answer_to_the_list_is_a_failed_read(procs: Procs, short_tmp: Path) -> None:
    """The node read again (after its watch was cut) is answered with something that is not the
    Node: the config stays, the reason is on the bus, the agent retries and does not exit; once
    the API answers properly the label is followed again. Each of FAULTS."""
    each_fault_at_once(procs, short_tmp, FAULTS, a_bad_answer_to_the_list)


def a_bad_answer_to_the_list(agent: Agent, api: Api, fault: str) -> None:
    following(agent, api)
    with agent.bus() as bus:
        api.emu.fault = fault
        api.do(api.emu.drop_watches)
        st = agent.wait_state(bus, lambda m: not m.api_reachable and REASON[fault] in m.error)
        assert st.config == "ts-4" and st.label == "ts-4", st
        wait_until(lambda: api.emu.faulted >= 2, 30, "a retry after the failed read")
        agent.running()
        assert agent.config() == TS4
        api.emu.fault = None
        label_followed_again(agent, api, bus, "ts-4")
    agent.running()


def test_a_bad_watch_event_is_a_failed_read(procs: Procs, short_tmp: Path) -> None:
    """As a bad answer to the list, for each of EVENT_FAULTS sent as the next event of the watch."""
    each_fault_at_once(procs, short_tmp, EVENT_FAULTS, a_bad_watch_event)


def a_bad_watch_event(agent: Agent, api: Api, fault: str) -> None:
    following(agent, api)
    with agent.bus() as bus:
        api.do(api.emu.bad_event, fault)
        st = agent.wait_state(bus, lambda m: not m.api_reachable and EVENT_REASON[fault] in m.error)
        assert st.config == "ts-4", st
        agent.running()
        assert agent.config() == TS4
        wait_until(lambda: api.emu.watching == 1, 30, "the agent watching again")
        label_followed_again(agent, api, bus, "ts-4")
    agent.running()


def test_a_bad_answer_at_start_keeps_the_config_in_place(procs: Procs, short_tmp: Path) -> None:
    """A restart while the API answers badly: the config the node runs stays (it used to be
    replaced by the label-less choice: 64 devices became 8 at the kubelet)."""
    each_fault_at_once(procs, short_tmp, ["pod", "status", "two-nodes", "labels-list", "invalid", "not-json", "huge"],
                       a_bad_answer_at_start)


def a_bad_answer_at_start(agent: Agent, api: Api, fault: str) -> None:
    config_map(agent.src, {"default": DEFAULT, "ts-4": TS4, "ts-8": TS8})
    agent.dst.write_text(TS4)
    api.do(api.emu.add_node, "node-1", {LABEL: "ts-4"})
    api.emu.fault = fault
    agent.start()
    with agent.bus() as bus:
        agent.wait_state(bus, lambda m: not m.api_reachable and GET_REASON[fault] in m.error)
        wait_until(lambda: api.emu.faulted >= 3, 30, "the start's read and two of the follower's")
        agent.running()
        assert agent.config() == TS4
        api.emu.fault = None
        label_followed_again(agent, api, bus, "", "ts-4")
    agent.running()


def test_api_failing_at_restart_keeps_the_config_in_place(agent: Agent, api: Api) -> None:
    """As with a bad answer: the ConfigMap follower's first look used to select without the label."""
    config_map(agent.src, {"default": DEFAULT, "ts-4": TS4, "ts-8": TS8})
    agent.dst.write_text(TS4)
    api.do(api.emu.add_node, "node-1", {LABEL: "ts-8"})
    api.emu.failures.extend([503] * 5)  # answered again after 0.5 + 1 + 2 + 4 s of retries
    agent.start()
    with agent.bus() as bus:
        wait_until(lambda: len(api.emu.requests) >= 2, 30, "the start's read, then the follower's")
        assert agent.config() == TS4
        agent.wait_state(bus, lambda m: not m.api_reachable and "HTTP 503" in m.error)
        agent.wait_config(TS8)
        only_configs(bus, "", "ts-8")
    agent.running()


def test_a_bad_answer_at_first_start_selects_without_the_label(agent: Agent, api: Api) -> None:
    """No config in place yet: the node must come up, so as with the API away, the label-less choice."""
    config_map(agent.src, {"default": DEFAULT, "ts-4": TS4})
    api.do(api.emu.add_node, "node-1", {LABEL: "ts-4"})
    api.emu.fault = "pod"
    agent.start()
    agent.wait_config(DEFAULT)
    agent.state(lambda m: not m.api_reachable and "Pod" in m.error and m.config == "default")
    api.emu.fault = None
    agent.wait_config(TS4)
    agent.running()


def test_deleted_and_bookmark_events_keep_the_config(agent: Agent, api: Api) -> None:
    following(agent, api)
    with agent.bus() as bus:
        api.do(api.emu.bookmark)
        api.do(api.emu.delete_node, "node-1")
        api.do(api.emu.add_node, "node-1", {LABEL: "ts-8"})  # the node registers again: its ADDED is followed
        agent.wait_config(TS8)
        only_configs(bus, "ts-4", "ts-8")
        assert not [m for m in bus.seen if isinstance(m, KubeState) and m.error], "no failed read"
    assert "was removed" not in agent.log()
    agent.running()


def test_a_huge_node_costs_about_the_bound(agent: Agent, api: Api) -> None:
    """200 MB of annotations, as the list's answer and as a watch event: read up to the bound
    (8 MiB), then refused; it cost 651 MB at the peak when it was read whole."""
    following(agent, api)
    before = agent.peak_rss_kb()
    with agent.bus() as bus:
        api.emu.fault = "huge"
        api.do(api.emu.drop_watches)
        agent.wait_state(bus, lambda m: not m.api_reachable and "larger than" in m.error)
        wait_until(lambda: api.emu.faulted >= 2, 30, "a retry after the failed read")
        api.emu.fault = None
        wait_until(lambda: api.emu.watching == 1, 30, "the agent watching again")
        api.do(api.emu.bad_event, "huge")
        agent.wait_state(bus, lambda m: not m.api_reachable and "watch" in m.error and "larger than" in m.error)
        agent.wait_state(bus, lambda m: m.api_reachable)
    grown = agent.peak_rss_kb() - before
    print(f"kube-agent peak RSS (VmHWM): {before} kB before, +{grown} kB after the 200 MB answers")
    assert grown < 32 << 10, f"peak RSS grew by {grown} kB reading 200 MB answers"
    assert agent.config() == TS4
    agent.running()


def test_a_symlink_loop_in_the_configmap_is_left_out(agent: Agent, api: Api) -> None:
    """One bad entry (a link to itself) used to fail every selection; now it is left out, named
    once in the log, and the rest stays selectable."""
    config_map(agent.src, {"default": DEFAULT, "ts-4": TS4, "ts-8": TS8})
    (agent.src / "loop").symlink_to("loop")
    api.do(api.emu.add_node, "node-1", {LABEL: "ts-4"})
    agent.start()
    agent.wait_config(TS4)
    api.do(api.emu.set_label, "node-1", LABEL, "ts-8")
    agent.wait_config(TS8)
    api.do(api.emu.set_label, "node-1", LABEL, "loop")
    agent.state(lambda m: m.unknown == "loop" and m.config == "ts-8")
    assert agent.config() == TS8
    log = agent.log()
    assert len([line for line in log.splitlines() if "'loop'" in line and "left out" in line]) == 1, log
    agent.running()
