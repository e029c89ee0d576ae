"""`config-manager` as NVIDIA's chart and the GPU Operator run it: a real process, its environment
as the only interface, a mounted-ConfigMap-like directory (keys as symlinks into `..data`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until

BIN = Path(sys.executable).parent
TIME_SLICING = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"
MIG_MIXED = "version: v1\nflags:\n  migStrategy: mixed\n"


def config_map(root: Path, configs: dict[str, str]) -> Path:
    """The layout the kubelet gives a ConfigMap volume: ..data -> a timestamped dir, keys -> ..data/key."""
    src = root / "available-configs"
    data = src / "..2026_12_01_00_00_00.1"
    data.mkdir(parents=True)
    for name, text in configs.items():
        (data / name).write_text(text)
    (src / "..data").symlink_to(data.name)
    for name in configs:
        (src / name).symlink_to(f"..data/{name}")
    return src


def env(root: Path, src: Path, **extra: str) -> dict[str, str]:
    (root / "config").mkdir(exist_ok=True)
    return {"PATH": os.environ["PATH"], "ONESHOT": "true", "NODE_NAME": "node-1",
            "NODE_LABEL": "nvidia.com/device-plugin.config", "CONFIG_FILE_SRCDIR": str(src),
            "CONFIG_FILE_DST": str(root / "config" / "config.yaml"), "DEFAULT_CONFIG": "",
            "FALLBACK_STRATEGIES": "named,single", "SEND_SIGNAL": "false", "SIGNAL": "", "PROCESS_TO_SIGNAL": "",
            "KUBECONFIG": "", **extra}


def run(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "config-manager"), *args], env=environ, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("configs", "extra", "chosen"), [
    ({"config0": TIME_SLICING, "config1": MIG_MIXED}, {"DEFAULT_CONFIG": "config1"}, MIG_MIXED),
    ({"default": TIME_SLICING, "other": MIG_MIXED}, {}, TIME_SLICING),
    ({"only": MIG_MIXED}, {}, MIG_MIXED),
    ({"a": TIME_SLICING, "b": MIG_MIXED}, {"FALLBACK_STRATEGIES": "named,single,empty"}, "version: v1\n"),
], ids=["default-config", "named", "single", "empty"])
def test_selects_as_nvidias_config_manager_without_the_label(
        tmp_path: Path, configs: dict[str, str], extra: dict[str, str], chosen: str) -> None:
    e = env(tmp_path, config_map(tmp_path, configs), **extra)
    result = run(e)
    assert result.returncode == 0, result.stderr
    assert Path(e["CONFIG_FILE_DST"]).read_text() == chosen
    # The label is not read, and it says so rather than pretending.
    assert "nvidia.com/device-plugin.config of node node-1 is not read" in result.stderr
    assert [p.name for p in (tmp_path / "config").iterdir()] == ["config.yaml"], "no temporary file left"


@pytest.mark.parametrize(("configs", "extra", "message"), [
    ({"a": TIME_SLICING, "b": MIG_MIXED}, {}, "no config selected"),
    ({"a": TIME_SLICING}, {"DEFAULT_CONFIG": "b"}, "DEFAULT_CONFIG=b: no such config"),
    ({"a": TIME_SLICING}, {"FALLBACK_STRATEGIES": "first"}, "unknown strategy 'first'"),
    ({"a": "version: v1\nflags:\n  migStrategy: dual\n"}, {}, "config a: mig_strategy"),
    ({"a": TIME_SLICING}, {"ONESHOT": "maybe"}, "ONESHOT='maybe'"),
    ({"a": TIME_SLICING}, {"CONFIG_FILE_DST": ""}, "CONFIG_FILE_DST is not set"),
], ids=["nothing-selectable", "unknown-default", "bad-strategy", "bad-config", "bad-oneshot", "no-destination"])
def test_fails_with_the_cause_last_and_writes_nothing(
        tmp_path: Path, configs: dict[str, str], extra: dict[str, str], message: str) -> None:
    e = env(tmp_path, config_map(tmp_path, configs), **extra)
    result = run(e)
    assert result.returncode == 1
    assert message in result.stderr.rstrip("\n").rsplit("\n", 1)[-1], result.stderr
    assert list((tmp_path / "config").iterdir()) == []


def test_arguments_are_refused(tmp_path: Path) -> None:
    result = run(env(tmp_path, config_map(tmp_path, {"a": TIME_SLICING})), "--oneshot")
    assert result.returncode == 2 and "the interface is the environment" in result.stderr


def test_the_operators_sidecar_follows_the_configmap_and_signals(tmp_path: Path) -> None:
    """ONESHOT=false, SEND_SIGNAL=true (the GPU Operator's sidecar): it follows the ConfigMap (and the
    label, tested with the kube-agent) and signals the named process after each change."""
    src = config_map(tmp_path, {"a": TIME_SLICING})
    name = f"gp-hup-{os.getpid() % 100000}"  # a name no other process on this machine has
    target = tmp_path / name
    target.symlink_to(sys.executable)
    hups = tmp_path / "hups"
    code = (f"import signal, time\nsignal.signal(signal.SIGHUP, lambda *a: open({str(hups)!r}, 'a').write('hup\\n'))\n"
            "open(__import__('sys').argv[1], 'w').close()\nwhile True: time.sleep(1)\n")
    ready = tmp_path / "ready"
    sleeper = subprocess.Popen([str(target), "-c", code, str(ready)])
    e = env(tmp_path, src, ONESHOT="false", SEND_SIGNAL="true", SIGNAL="1", PROCESS_TO_SIGNAL=name)
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        p = subprocess.Popen([str(BIN / "config-manager")], env=e, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(ready.exists, 30, "the process to signal")
        wait_until(lambda: "following the node label" in log.read_text(), 60, "the sidecar following")
        assert Path(e["CONFIG_FILE_DST"]).read_text() == TIME_SLICING
        data = src / "..2026_12_01_00_00_00.2"
        data.mkdir()
        (data / "a").write_text(MIG_MIXED)
        (src / "..data_tmp").symlink_to(data.name)
        os.replace(src / "..data_tmp", src / "..data")
        wait_until(lambda: Path(e["CONFIG_FILE_DST"]).read_text() == MIG_MIXED, 30, "the new config written")
        wait_until(lambda: hups.exists() and hups.read_text() == "hup\n", 30, "SIGHUP sent to the process")
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    finally:
        for proc in (p, sleeper):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_sidecar_without_an_api_server_keeps_the_config_in_place_and_runs(tmp_path: Path) -> None:
    """NVIDIA's chart's sidecar after its init container wrote the config, with no API server to read
    the label from: the config stays and the sidecar keeps following (it exited 1, "no config
    selected", and was restarted for as long as the API was away)."""
    src = config_map(tmp_path, {"default": TIME_SLICING, "other": MIG_MIXED})
    e = env(tmp_path, src, ONESHOT="false")
    dst = Path(e["CONFIG_FILE_DST"])
    dst.write_text(MIG_MIXED)  # what the init container selected by the label, before the API went away
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        p = subprocess.Popen([str(BIN / "config-manager")], env=e, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "following the node label" in log.read_text(), 60, f"the sidecar following\n{log}")
        assert "the config in place" in log.read_text() and dst.read_text() == MIG_MIXED
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
