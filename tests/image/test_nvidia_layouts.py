"""NVIDIA's chart (v0.20 line) and the GPU Operator's DaemonSets with our image in place of NVIDIA's:
every container of nvidia_layouts.yaml, run by podman with its command, args, environment, mounts
and security context (nvidia_pods.Node), does its job as far as it can on a machine without a GPU
driver.

The expectations are what NVIDIA's command does in that container, from NVIDIA's code (named per
test), except where ours differs on purpose, said there: without a reachable API server NVIDIA's
config-manager exits 1, ours selects without the node label (the init container) or keeps the
config in place (the sidecar), both logged.

Needs podman and `make image` (run by `make image-test`); each test runs one to four containers of
a few seconds each.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_until
from tests.image.nvidia_pods import (
    PRODUCT_NAME,
    Container,
    Layout,
    Node,
    containers_of,
    distinct_pods,
    job,
    labels,
    layout_of,
    load,
    nvidia_selection,
)
from tests.image.test_container import IMAGE, podman

LAYOUTS = load()
PODS = distinct_pods(LAYOUTS)
CONTAINERS = [c for pod in PODS for c in pod.containers]
# The cause of a missing driver as the last line names it: ours name what is missing (libnvidia-ml,
# or with a CDI strategy or sharing.mps "the NVIDIA driver" and its files), NVIDIA's say "failed to
# initialize NVML" or "no valid resource detected".
DRIVER_CAUSE = re.compile(r"libnvidia-ml|NVML|NVIDIA driver|no valid resource", re.IGNORECASE)
STOP_GRACE_S = 10  # SIGTERM, then SIGKILL (the kubelet's grace period is 30 s; ours need far less)


def _id(c: Container) -> str:
    return c.id


def _params(kind: str) -> list[Container]:
    return list(containers_of(LAYOUTS, kind))


def _layout(c: Container) -> Layout:
    return layout_of(LAYOUTS, next(p for p in PODS if any(x is c for x in p.containers)))


@pytest.fixture
def node_for(tmp_path: Path) -> Iterator[Callable[[Container], Node]]:
    """A fresh fake node for the layout of a container; all of them cleaned up at teardown."""
    nodes: list[Node] = []

    def make(c: Container) -> Node:
        node = Node(tmp_path / f"node{len(nodes)}", _layout(c))
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


def _path_in(node: Node, c: Container, container_path: str) -> Path:
    """Where `container_path` of `c` is on this machine: below the mount that holds it."""
    holders = [m for m in c.mounts if container_path == m.mount_path or container_path.startswith(m.mount_path + "/")]
    mount = max(holders, key=lambda m: len(m.mount_path))
    return node.source(c, mount) / container_path[len(mount.mount_path):].lstrip("/")


def _selected_config(layout: Layout, c: Container) -> str | None:
    """The text of the config the pod's init container selects (no node label); None without one."""
    if c.getenv("CONFIG_FILE") is None:
        return None
    cm = layout.config_maps[c.mount("/available-configs").config_map or ""]
    assert cm.selected_without_label is not None
    return cm.data[cm.selected_without_label]


def _shares_by_mps(layout: Layout, c: Container) -> bool:
    text = _selected_config(layout, c)
    config = yaml.safe_load(text) if text else None
    return bool(((config or {}).get("sharing") or {}).get("mps"))


# -- the data ----------------------------------------------------------------------------------

def test_the_layouts_are_the_six_asked_for_and_name_only_nvidias_commands() -> None:
    assert [lay.id for lay in LAYOUTS] == ["chart-default", "chart-config-map-mps", "chart-gfd",
                                           "operator-device-plugin", "operator-mps-control-daemon", "operator-gfd"]
    for c in CONTAINERS:
        assert job(c) != "unknown", f"{c.id}: {c.argv} is none of NVIDIA's commands: no test runs it"
        for m in c.mounts:
            assert m.host_path is not None or m.config_map or m.empty_dir, f"{c.id}: {m.mount_path} has no volume"
    for lay in LAYOUTS:
        for cm in lay.config_maps.values():
            if cm.selected_without_label is None:
                continue
            # The key written down is the one NVIDIA's selection gives for the init container's env.
            init = next(c for pod in lay.pods for c in pod.containers
                        if job(c) == "config-manager-oneshot" and c.mount("/available-configs").config_map == cm.name)
            strategies = (init.getenv("FALLBACK_STRATEGIES") or "named,single").split(",")
            assert nvidia_selection(sorted(cm.data), init.getenv("DEFAULT_CONFIG") or "", strategies) == \
                cm.selected_without_label, f"{lay.id}: {cm.name}"


@pytest.mark.parametrize("command", sorted({c.command[0] for c in CONTAINERS}))
def test_every_command_of_the_layouts_is_in_the_image(command: str) -> None:
    found = podman("run", "--rm", "--network", "none", "--pull", "never", "--entrypoint", "/bin/sh", IMAGE,
                   "-c", 'command -v "$1"', "sh", command, timeout=60)
    assert found.returncode == 0 and found.stdout.strip(), f"{command} is not in the image: {found.stderr}"


# -- config-manager ----------------------------------------------------------------------------

@pytest.mark.parametrize("c", _params("config-manager-oneshot"), ids=_id)
def test_config_manager_init_writes_the_selected_config_and_exits_0_without_an_api_server(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """cmd/config-manager (ONESHOT=true): the config the node label names, else DEFAULT_CONFIG,
    else the fallback strategies, at CONFIG_FILE_DST, exit 0. Here no API server is reachable (no
    in-cluster service account, KUBECONFIG as rendered, no network): NVIDIA's exits 1 ("error
    building kubernetes clientcmd config") and the pod never starts; ours logs that the label is
    not read and selects without it, so that the node comes up with the DEFAULT_CONFIG / fallback
    config."""
    node = node_for(c)
    cm = node.layout.config_maps[c.mount("/available-configs").config_map or ""]
    dst_path = c.getenv("CONFIG_FILE_DST") or ""
    res = node.run(c, timeout=60)
    assert res.returncode == 0, str(res)
    assert cm.selected_without_label is not None
    assert _path_in(node, c, dst_path).read_text() == cm.data[cm.selected_without_label], str(res)
    assert "not read" in res.stderr and (c.getenv("NODE_NAME") or "?") in res.stderr, str(res)

    # DEFAULT_CONFIG empty (the chart's config.default, the ClusterPolicy's devicePlugin.config.default
    # left out): the fallback strategies decide, on a fresh node (a config in place would be kept).
    fresh = node_for(c)
    strategies = (c.getenv("FALLBACK_STRATEGIES") or "named,single").split(",")
    expected = nvidia_selection(sorted(cm.data), "", strategies)
    res = fresh.run(c, env={"DEFAULT_CONFIG": ""}, timeout=60)
    assert res.returncode == 0, str(res)
    text = _path_in(fresh, c, dst_path).read_text()
    if expected is None:
        # NVIDIA's links the destination to /dev/null: an empty file, the defaults.
        assert yaml.safe_load(text) in (None, {"version": "v1"}), text
    else:
        assert text == cm.data[expected]


@pytest.mark.parametrize("c", _params("config-manager-sidecar"), ids=_id)
def test_config_manager_sidecar_keeps_the_config_and_runs_until_sigterm_without_an_api_server(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """cmd/config-manager (ONESHOT=false): follows the node label, rewrites CONFIG_FILE_DST and
    signals PROCESS_TO_SIGNAL after each change, until stopped. Without an API server NVIDIA's exits
    1 (the container restarts until the API answers); ours is documented to do better and that is
    what is asserted: the config the init container wrote is kept (it may have been selected with
    the label), the API retried while it keeps running ("the active config stays as it is ... and
    the agent retries": services/kube_agent/agent.py, the code the sidecar runs), and SIGTERM stops
    it with exit 0 at once."""
    node = node_for(c)
    node.run_init_containers(c)  # the pod's config-manager init writes the config first
    dst = _path_in(node, c, c.getenv("CONFIG_FILE_DST") or "")
    before = dst.read_text()
    started = node.start(c)
    wait_until(lambda: not started.running() or "following" in started.stderr, 60, "the sidecar to start following")
    assert started.running(), f"exit {started.proc.returncode}: {started.stderr}"
    assert dst.read_text() == before
    rc, took = node.stop(started, STOP_GRACE_S)
    assert rc == 0, f"exit {rc} after {took:.1f} s: {started.stderr}"  # 137 had the grace run out


# -- nvidia-device-plugin ------------------------------------------------------------------------

@pytest.mark.timeout(240)
@pytest.mark.parametrize("c", _params("device-plugin"), ids=_id)
def test_device_plugin_without_a_driver_exits_1_with_the_driver_cause_last(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """cmd/nvidia-device-plugin with FAIL_ON_INIT_ERROR as rendered (unset: NVIDIA's default true;
    the Operator: true): no driver, exit 1, the cause last. The pod's init containers run first (the
    selected config must be accepted: the failure is the driver's). The Operator's entry point
    waits for and exports driver-ready, so the driver is looked for below its DRIVER_ROOT_CTR_PATH."""
    node = node_for(c)
    node.run_init_containers(c)
    res = node.run(c, timeout=120)
    assert res.returncode == 1, str(res)
    assert DRIVER_CAUSE.search(res.last_line), str(res)
    ready = node.layout.host_files.get("/run/nvidia/validations/driver-ready")
    if c.args == ("/bin/entrypoint.sh",):
        assert ready is not None and "Starting nvidia-device-plugin" in res.stdout, str(res)
        ctr_root = dict(line.split("=", 1) for line in ready.splitlines())["DRIVER_ROOT_CTR_PATH"]
        assert f"{ctr_root.rstrip('/')}/" in res.last_line, str(res)


def test_the_operator_entrypoint_detects_kernel_modules_with_lsmod_in_the_image(
        node_for: Callable[[Container], Node]) -> None:
    """assets/state-device-plugin/0400_configmap.yaml (June 2026, gpu-operator v26.7 with plugin
    v0.20): the entry point sets GDRCOPY_ENABLED, GDS_ENABLED and MOFED_ENABLED where gdrdrv /
    nvidia_fs are loaded, asking `lsmod`. NVIDIA's image has it (busybox's applet, next to
    /bin/sh); without it the detection fails silently ("lsmod: not found" and no flag), so GPU
    containers on such nodes get no GDRCopy, GDS or MOFED devices."""
    c = next(c for c in CONTAINERS if c.args == ("/bin/entrypoint.sh",))
    node = node_for(c)
    node.run_init_containers(c)
    res = node.run(c, timeout=120)
    assert "lsmod" not in res.stderr, f"the entry point's module detection does not run in our image: {res}"
    listed = podman("run", "--rm", "--network", "none", "--pull", "never", "--entrypoint", "/bin/sh", IMAGE,
                    "-c", "lsmod", timeout=60)
    if Path("/proc/modules").exists():
        assert listed.returncode == 0 and listed.stdout.startswith("Module"), listed.stdout + listed.stderr
    else:  # a kernel built without loadable modules (this project's VMs): lsmod runs and says so
        assert "could not open /proc/modules" in listed.stderr, listed.stdout + listed.stderr


# -- gpu-feature-discovery -----------------------------------------------------------------------

def _fail_on_init_error_var(c: Container) -> str:
    """The variable that decides it in this container (NVIDIA's reads GFD_FAIL_ON_INIT_ERROR first)."""
    return "GFD_FAIL_ON_INIT_ERROR" if c.getenv("GFD_FAIL_ON_INIT_ERROR") is not None else "FAIL_ON_INIT_ERROR"


def _gfd_output(node: Node, c: Container) -> Path:
    # NVIDIA's --output-file default: NFD's features.d, file gfd.
    return _path_in(node, c, "/etc/kubernetes/node-feature-discovery/features.d/gfd")


def _assert_no_driver_labels(text: str, since: float, until: float) -> None:
    """internal/lm: without a driver (the null resource manager) only the machine type labeler
    (/sys/class/dmi/id/product_name, spaces as dashes) and the timestamp labeler have labels."""
    got = labels(text)
    assert set(got) == {"nvidia.com/gpu.machine", "nvidia.com/gfd.timestamp"}, text
    assert got["nvidia.com/gpu.machine"] == PRODUCT_NAME.replace(" ", "-"), text
    assert int(since) <= int(got["nvidia.com/gfd.timestamp"]) <= until + 1, text


@pytest.mark.timeout(240)
@pytest.mark.parametrize("c", _params("gpu-feature-discovery"), ids=_id)
def test_gfd_without_a_driver_exits_1_with_the_driver_cause_last(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """cmd/gpu-feature-discovery with the layout's environment: fail-on-init-error is NVIDIA's
    default (true) in the chart and GFD_FAIL_ON_INIT_ERROR=true in the Operator, so without a driver
    "failed to create resource manager: no valid resource detected", exit 1, no label file. The
    NodeFeature API (the default) is never reached: NVIDIA's start() makes the resource manager
    before the API client, and ours asks the driver before it publishes."""
    node = node_for(c)
    node.run_init_containers(c)
    res = node.run(c, timeout=90)
    assert res.returncode == 1, str(res)
    assert DRIVER_CAUSE.search(res.last_line), str(res)
    assert not _gfd_output(node, c).exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("c", _params("gpu-feature-discovery"), ids=_id)
def test_gfd_oneshot_without_a_driver_and_fail_on_init_error_false_writes_nvidias_no_driver_labels(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """The same container with GFD_ONESHOT=true and fail-on-init-error false (NVIDIA's null
    manager): the labels go to the features.d file (GFD_USE_NODE_FEATURE_API=false said outright:
    since v0.19 NVIDIA's default, and ours, is the NodeFeature object, and no API server runs here;
    test_feature_discovery_nfd_api has the object), exit 0, the file kept."""
    node = node_for(c)
    node.run_init_containers(c)
    since = time.time()
    res = node.run(c, env={_fail_on_init_error_var(c): "false", "GFD_ONESHOT": "true",
                           "GFD_USE_NODE_FEATURE_API": "false"}, timeout=90)
    assert res.returncode == 0, str(res)
    out = _gfd_output(node, c)
    assert out.exists(), str(res)
    _assert_no_driver_labels(out.read_text(), since, time.time())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("c", _params("gpu-feature-discovery"), ids=_id)
def test_gfd_without_a_driver_and_fail_on_init_error_false_labels_until_sigterm_then_removes_the_file(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """The DaemonSet's mode (no oneshot) with fail-on-init-error false: the no-driver labels are
    written and kept while it runs (again every sleep interval); SIGTERM ends it with exit 0 and
    removes the file (NVIDIA's run(): removeOutputFile unless oneshot), so NFD drops the labels."""
    node = node_for(c)
    node.run_init_containers(c)
    out = _gfd_output(node, c)
    since = time.time()
    started = node.start(c, env={_fail_on_init_error_var(c): "false", "GFD_USE_NODE_FEATURE_API": "false"})
    wait_until(lambda: not started.running() or out.exists(), 90, "the labels file")
    assert started.running(), f"exit {started.proc.returncode}: {started.stderr}"
    _assert_no_driver_labels(out.read_text(), since, time.time())
    rc, took = node.stop(started, STOP_GRACE_S)
    assert rc == 0, f"exit {rc} after {took:.1f} s: {started.stderr}"  # 137 had the grace run out
    assert not out.exists(), "the labels outlived the daemon"


# -- mps-control-daemon --------------------------------------------------------------------------

@pytest.mark.parametrize("c", _params("mps-mount-shm"), ids=_id)
def test_mps_mount_shm_mounts_nvidias_tmpfs_at_mps_shm(node_for: Callable[[Container], Node], c: Container) -> None:
    """cmd/mps-control-daemon/mount/mount-shm.go: a tmpfs at /mps/shm (the directory made first),
    options rw,nosuid,nodev,noexec,relatime,size=65536k, exit 0. The mount is seen from inside: the
    command runs unchanged and the container's mount table is printed after it (mount propagation
    to this machine is not reproduced, see nvidia_pods)."""
    node = node_for(c)
    script = '"$@"; rc=$?; echo "-- mountinfo"; cat /proc/self/mountinfo; exit $rc'
    observed = dataclasses.replace(c, command=("/bin/sh", "-c", script, "sh", *c.argv), args=())
    res = node.run(observed, timeout=60)
    assert res.returncode == 0, str(res)
    mountinfo = res.stdout.split("-- mountinfo\n", 1)[-1]
    shm = [line for line in mountinfo.splitlines() if line.split()[4:5] == ["/mps/shm"]]
    assert shm, f"no mount at /mps/shm: {res}"
    fields = shm[-1].split()
    options = set(fields[5].split(","))
    fstype, super_options = fields[fields.index("-") + 1], fields[fields.index("-") + 3].split(",")
    assert fstype == "tmpfs" and {"rw", "nosuid", "nodev", "noexec"} <= options, shm[-1]
    assert "size=65536k" in super_options, shm[-1]
    assert _path_in(node, c, "/mps/shm").is_dir()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("c", [c for c in _params("mps-control-daemon") if not _shares_by_mps(_layout(c), c)], ids=_id)
def test_mps_control_daemon_without_an_mps_config_waits_with_mps_ready_until_sigterm(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """cmd/mps-control-daemon without sharing.mps (no CONFIG_FILE, or a time-slicing config): no
    daemon to start ("No devices are configured for MPS sharing; Waiting indefinitely."), no driver
    needed, and startDaemons creates /mps/.ready all the same (after its loop over no daemons);
    SIGTERM removes it and exits 0 (stopDaemons)."""
    node = node_for(c)
    node.run_init_containers(c)
    ready = _path_in(node, c, "/mps/.ready")
    started = node.start(c)
    wait_until(lambda: not started.running() or ready.exists() or "waiting" in started.stderr.lower(), 60,
               "/mps/.ready or the daemon saying it waits")
    assert started.running(), f"exit {started.proc.returncode}: {started.stderr}"
    # NVIDIA's logs that it waits just before it creates the file: a few seconds for the file.
    wait_until(ready.exists, 5, "/mps/.ready, which NVIDIA's creates while it waits without sharing.mps")
    rc, took = node.stop(started, STOP_GRACE_S)
    assert rc == 0, f"exit {rc} after {took:.1f} s: {started.stderr}"  # 137 had the grace run out
    assert not ready.exists(), "/mps/.ready outlived the daemon"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("c", [c for c in _params("mps-control-daemon") if _shares_by_mps(_layout(c), c)], ids=_id)
def test_mps_control_daemon_with_an_mps_config_and_no_driver_exits_1_with_the_cause_last(
        node_for: Callable[[Container], Node], c: Container) -> None:
    """cmd/mps-control-daemon with the MPS config the init container selected: the daemons are
    built from NVML (internal/rm NewNVMLResourceManagers), which fails without a driver: "error
    getting daemons: failed to initialize NVML", exit 1; /mps/.ready is not created."""
    node = node_for(c)
    node.run_init_containers(c)
    res = node.run(c, timeout=90)
    assert res.returncode == 1, str(res)
    assert DRIVER_CAUSE.search(res.last_line), str(res)
    assert not _path_in(node, c, "/mps/.ready").exists()
