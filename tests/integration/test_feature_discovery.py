"""gpu-feature-discovery as NVIDIA's chart runs it: a real process on the simulated driver, writing
the NFD features.d file (--use-node-feature-api=false; the NodeFeature object, NVIDIA's default since
v0.19, is test_feature_discovery_nfd_api.py's).

Every expected label value is written from NVIDIA/k8s-device-plugin's label code (internal/lm,
v0.20), named next to it; the simulated fleets' facts are in devtools/fleets (DGX H100: eight
"NVIDIA H100 80GB HBM3", 85520809984 bytes each, compute capability 9.0, driver 580.159.04,
CUDA 13.0, PCI class 0x030200).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.nvml_sim import fleet_path
from tests.conftest import BIN, Procs, wait_until
from tests.unit.test_feature_discovery_labels import VERSION_LABELS

GFD = "services.feature_discovery"

# nvml.go newVersionLabeler (the unit tests' table: driver 580.159.04, CUDA 13000).
VERSIONS = VERSION_LABELS
# resource.go NewGPUResourceLabeler for 8 H100s without sharing, plus the node-wide labelers.
DGX_H100 = {
    "nvidia.com/gpu.machine": "DGX-H100",  # machine-type.go: the DMI product name, blanks made dashes
    **VERSIONS,
    "nvidia.com/mig.capable": "true",  # go-nvlib IsMigCapable: nvmlDeviceGetMigMode answers
    "nvidia.com/mps.capable": "false",  # newSharingLabeler: no sharing.mps
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",  # sanitise(name): blanks -> "-"
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.replicas": "1",  # getReplicas: a config, the resource not replicated
    "nvidia.com/gpu.sharing-strategy": "none",
    "nvidia.com/gpu.memory": "81559",  # GetTotalMemoryMB: 85520809984 / (1024 * 1024)
    "nvidia.com/gpu.family": "hopper",  # getArchFamily(9, 0)
    "nvidia.com/gpu.compute.major": "9",
    "nvidia.com/gpu.compute.minor": "0",
    "nvidia.com/gpu.mode": "compute",  # getModeForClasses: every GPU 0x030200 (PCI3dControllerClass)
    "nvidia.com/vgpu.present": "false",  # vgpu.go: no function with the "VF" capability (bare-metal H100s)
}
TIME_SLICING = "version: v1\nsharing:\n  timeSlicing:\n{rename}    resources:\n    - name: nvidia.com/gpu\n" \
               "      replicas: 4\n"
MPS = "version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 4\n"


class Gfd:
    """A gpu-feature-discovery process's surroundings: its features.d dir, machine type, config."""

    OUTPUT_ENV = {"GFD_USE_NODE_FEATURE_API": "false"}  # the file, not NVIDIA's default NodeFeature object

    def __init__(self, procs: Procs, root: Path) -> None:
        self.procs = procs
        self.root = root
        self.features = root / "features.d"
        self.features.mkdir()
        self.output = self.features / "gfd"
        self.machine = root / "product_name"
        self.machine.write_text("DGX H100\n")  # as /sys/class/dmi/id/product_name holds it
        self.runs = 0

    def start(self, *args: str, fleet: str = "dgx-h100-8", config: str | None = None,
              **env: str) -> subprocess.Popen[bytes]:
        self.runs += 1
        base = {"NVML_BACKEND": "simulated", "SIMULATED_DEVICES": fleet,
                "GPU_PLUGIN_RUN_DIR": str(self.root / f"run{self.runs}"),
                "GFD_OUTPUT_FILE": str(self.output), "GFD_MACHINE_TYPE_FILE": str(self.machine), **self.OUTPUT_ENV}
        if config is not None:
            path = self.root / f"config{self.runs}.yaml"
            path.write_text(config)
            base["CONFIG_FILE"] = str(path)
        return self.procs.start(f"gfd{self.runs}", *args, env={**base, **env}, command=GFD)

    def oneshot(self, *args: str, **kw: str) -> dict[str, str]:
        p = self.start("--oneshot", *args, **kw)
        assert wait_until(lambda: p.poll() is not None, 20, "gpu-feature-discovery --oneshot to exit") and \
            p.returncode == 0, self.log()
        return self.labels()

    def labels(self) -> dict[str, str]:
        lines = self.output.read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)

    def log(self) -> str:
        return self.procs.log(f"gfd{self.runs}")

    def last_line(self) -> str:
        return self.log().rstrip("\n").rsplit("\n", 1)[-1]

    def exited(self, p: subprocess.Popen[bytes], timeout: float = 20) -> int:
        wait_until(lambda: p.poll() is not None, timeout, "gpu-feature-discovery to exit")
        return int(p.returncode)


@pytest.fixture
def gfd(procs: Procs, short_tmp: Path) -> Gfd:
    return Gfd(procs, short_tmp)


def without_timestamp(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k != "nvidia.com/gfd.timestamp"}


def test_oneshot_labels_eight_gpus_atomically_and_exits_0(gfd: Gfd) -> None:
    before = int(time.time())
    labels = gfd.oneshot()
    after = int(time.time())
    assert without_timestamp(labels) == DGX_H100
    assert before <= int(labels["nvidia.com/gfd.timestamp"]) <= after  # timestamp.go: time.Now().Unix()
    assert list(labels) == sorted(labels)
    # output.go: renameio.WriteFile(path, data, 0644), so no partial file and nothing left beside it.
    assert gfd.output.stat().st_mode & 0o777 == 0o644
    # --oneshot leaves the labels in place after it exited (main.go: no removal), and nothing beside them.
    assert [p.name for p in gfd.features.iterdir()] == ["gfd"]


def test_no_timestamp(gfd: Gfd) -> None:
    assert gfd.oneshot("--no-timestamp") == DGX_H100  # timestamp.go: an empty labeler


def test_the_installed_command(gfd: Gfd) -> None:
    env = {**os.environ, "NVML_BACKEND": "simulated", "SIMULATED_DEVICES": "h200",
           "GPU_PLUGIN_RUN_DIR": str(gfd.root / "run-cmd")}
    done = subprocess.run([str(BIN / "gpu-feature-discovery"), "--oneshot", "--no-timestamp", "-o", str(gfd.output),
                           "--machine-type-file", "", "--use-node-feature-api=false"], env=env, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    labels = gfd.labels()
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert labels["nvidia.com/gpu.memory"] == str(150754820096 // (1 << 20))  # the recorded H200's memory
    assert labels["nvidia.com/gpu.count"] == "1"
    assert labels["nvidia.com/gpu.machine"] == "unknown"  # machine-type.go: an empty path


@pytest.mark.parametrize(("rename", "product"), [
    ("", "NVIDIA-H100-80GB-HBM3-SHARED"),  # resource.go getProductName: shared and not renamed
    ("    renameByDefault: true\n", "NVIDIA-H100-80GB-HBM3"),  # renamed to nvidia.com/gpu.shared: no suffix
], ids=["no-rename", "rename-by-default"])
def test_time_slicing(gfd: Gfd, rename: str, product: str) -> None:
    labels = gfd.oneshot("--no-timestamp", config=TIME_SLICING.format(rename=rename))
    assert labels == {**DGX_H100,
                      "nvidia.com/gpu.product": product,
                      "nvidia.com/gpu.replicas": "4",  # getReplicas: the resource's replicas
                      "nvidia.com/gpu.sharing-strategy": "time-slicing"}  # SharingStrategyTimeSlicing


def test_mps(gfd: Gfd) -> None:
    labels = gfd.oneshot("--no-timestamp", config=MPS)
    assert labels == {**DGX_H100,
                      "nvidia.com/mps.capable": "true",  # isMPSCapable: MPS configured, no MIG-enabled GPU
                      "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-SHARED",
                      "nvidia.com/gpu.replicas": "4",
                      "nvidia.com/gpu.sharing-strategy": "mps"}  # SharingStrategyMPS


def mig_labels(profile: str, count: int, memory: int, sms: int, slices: int, engines: int) -> dict[str, str]:
    """NewMIGResourceLabeler for nvidia.com/mig-<profile>: product "<GPU>-MIG-<profile>", and
    nvml-mig-device.go GetAttributes (the fleet's GH100 attributes: copy, decoder and JPEG engines
    one per slice, no encoder, no OFA)."""
    r = f"nvidia.com/mig-{profile}"
    return {f"{r}.product": f"NVIDIA-H100-80GB-HBM3-MIG-{profile}", f"{r}.count": str(count),
            f"{r}.replicas": "1", f"{r}.sharing-strategy": "none", f"{r}.memory": str(memory),
            f"{r}.multiprocessors": str(sms), f"{r}.slices.gi": str(slices), f"{r}.slices.ci": str(slices),
            f"{r}.engines.copy": str(engines), f"{r}.engines.decoder": str(engines), f"{r}.engines.encoder": "0",
            f"{r}.engines.jpeg": str(engines), f"{r}.engines.ofa": "0"}


def test_mig_mixed(gfd: Gfd) -> None:
    labels = gfd.oneshot("--no-timestamp", "--mig-strategy", "mixed", fleet="dgx-h100-8-mig")
    # mig-strategy.go: the full-GPU labels (the count of the name holds all 8 GPUs), the strategy,
    # and one resource per profile: 7 x 1g.10gb on GPU 7, 2 x 3g.40gb on GPU 6.
    assert labels == {**DGX_H100, "nvidia.com/mig.strategy": "mixed",
                      **mig_labels("1g.10gb", 7, 9984, 16, 1, 1),  # 10468982784 bytes // MiB
                      **mig_labels("3g.40gb", 2, 40448, 60, 3, 3)}  # 42412802048 bytes // MiB


def test_mig_single_with_mig_and_full_gpus_is_invalid(gfd: Gfd) -> None:
    labels = gfd.oneshot("--no-timestamp", "--mig-strategy=single", fleet="dgx-h100-8-mig")
    # newMigStrategySingleLabeler: "devices with MIG enabled and disable detected" gives the
    # mig-strategy-invalid labels over the full-GPU ones.
    assert labels == {**DGX_H100, "nvidia.com/mig.strategy": "single",
                      "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-MIG-INVALID",
                      "nvidia.com/gpu.count": "0", "nvidia.com/gpu.replicas": "0", "nvidia.com/gpu.memory": "0"}


def test_mig_single(gfd: Gfd) -> None:
    # GPU 7 of the MIG fleet alone: every GPU MIG-enabled, one profile (1g.10gb x 7).
    desc = json.loads(fleet_path("dgx-h100-8-mig").read_text())
    desc["devices"] = [desc["devices"][7]]
    path = gfd.root / "one-mig-gpu.json"
    path.write_text(json.dumps(desc))
    labels = gfd.oneshot("--no-timestamp", GFD_MIG_STRATEGY="single", fleet=str(path))
    mig = mig_labels("1g.10gb", 7, 9984, 16, 1, 1)
    # NewMIGResourceLabeler("nvidia.com/gpu"): the MIG device's labels under nvidia.com/gpu, over the
    # GPU's (whose labeler, MIG-enabled, had no sharing: replicas 0, replaced by the MIG one's 1).
    assert labels == {**DGX_H100, "nvidia.com/mig.strategy": "single",
                      **{k.replace("nvidia.com/mig-1g.10gb.", "nvidia.com/gpu."): v for k, v in mig.items()}}


def without_driver(gfd: Gfd) -> str:
    desc = json.loads(fleet_path("h200").read_text())
    desc["init_error"] = 9  # NVML_ERROR_DRIVER_NOT_LOADED
    path = gfd.root / "no-driver.json"
    path.write_text(json.dumps(desc))
    return str(path)


def test_no_driver_with_fail_on_init_error_exits_1_with_the_cause_last(gfd: Gfd) -> None:
    p = gfd.start(fleet=without_driver(gfd))
    assert gfd.exited(p) == 1
    assert "Driver Not Loaded" in gfd.last_line() and "failOnInitError" in gfd.last_line(), gfd.log()
    assert not gfd.output.exists()


def test_no_driver_without_fail_on_init_error_labels_what_it_can_and_keeps_going(gfd: Gfd) -> None:
    p = gfd.start("--sleep-interval", "300ms", fleet=without_driver(gfd), FAIL_ON_INIT_ERROR="false")
    wait_until(gfd.output.exists, 20, "the labels file")
    # resource/factory.go: the null manager has no devices, so nvml.go labels nothing of them; the
    # timestamp and machine type labelers stand alone.
    labels = gfd.labels()
    assert set(labels) == {"nvidia.com/gfd.timestamp", "nvidia.com/gpu.machine"}
    assert labels["nvidia.com/gpu.machine"] == "DGX-H100"
    first = gfd.output.stat().st_ino
    wait_until(lambda: gfd.output.stat().st_ino != first, 10, "the next pass to replace the file")
    assert p.poll() is None
    assert gfd.procs.stop(p) == 0
    assert not gfd.output.exists()  # main.go: the file goes with the daemon


def test_without_oneshot_it_rewrites_after_the_interval_and_sigterm_ends_it(gfd: Gfd) -> None:
    p = gfd.start("--sleep-interval", "300ms", "--no-timestamp")
    wait_until(gfd.output.exists, 20, "the labels file")
    assert gfd.labels() == DGX_H100
    first = gfd.output.stat().st_ino
    # Each pass writes a new file and renames it over the old one: a new inode, the same labels.
    wait_until(lambda: gfd.output.stat().st_ino != first, 10, "the next pass to replace the file")
    assert gfd.labels() == DGX_H100
    assert gfd.procs.stop(p) == 0
    assert not gfd.output.exists()
    assert "Received signal SIGTERM" in gfd.log()


def test_sighup_labels_again_with_the_new_config(gfd: Gfd) -> None:
    config = gfd.root / "switched.yaml"
    config.write_text("version: v1\n")
    p = gfd.start("--sleep-interval", "1h", "--no-timestamp", CONFIG_FILE=str(config))
    wait_until(gfd.output.exists, 20, "the labels file")
    assert gfd.labels()["nvidia.com/gpu.replicas"] == "1"
    config.write_text(TIME_SLICING.format(rename=""))  # what NVIDIA's config-manager sidecar does, then SIGHUP
    p.send_signal(signal.SIGHUP)
    wait_until(lambda: gfd.labels().get("nvidia.com/gpu.replicas") == "4", 10, "labels of the new config")
    assert gfd.procs.stop(p) == 0


def test_a_gpu_that_cannot_be_read_fails_the_pass(gfd: Gfd) -> None:
    desc = json.loads(fleet_path("dgx-h100-8").read_text())
    desc["devices"][3]["name"] = {"error": 15}  # GPU_IS_LOST
    path = gfd.root / "lost.json"
    path.write_text(json.dumps(desc))
    p = gfd.start(fleet=str(path))
    assert gfd.exited(p) == 1
    assert "GPU-6854711e-8b65-7cae-6d7d-cbbcb4c31190: GPU lost" in gfd.last_line(), gfd.log()
    assert not gfd.output.exists()


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--mig-strategy=bogus"], {}, "mig_strategy (flag --mig-strategy): 'bogus' is not one of none, single, mixed"),
    (["--sleep-interval", "soon"], {}, "sleep-interval (flag --sleep-interval): 'soon' is not a duration"),
    ([], {"GFD_ONESHOT": "maybe"}, "oneshot (environment GFD_ONESHOT): 'maybe' is not a boolean"),
    ([], {"GFD_USE_NODE_FEATURE_API": "yes please"},
     "use-node-feature-api (environment GFD_USE_NODE_FEATURE_API): 'yes please' is not a boolean"),
])
def test_a_bad_setting_exits_1_naming_it(gfd: Gfd, args: list[str], env: dict[str, str], named: str) -> None:
    p = gfd.start(*args, **env)
    assert gfd.exited(p) == 1
    assert named in gfd.last_line(), gfd.log()
    assert not gfd.output.exists()


def test_labels_to_standard_output(gfd: Gfd) -> None:
    env = {**os.environ, "NVML_BACKEND": "simulated", "SIMULATED_DEVICES": "dgx-h100-8",
           "GPU_PLUGIN_RUN_DIR": str(gfd.root / "run-stdout"), "GFD_MACHINE_TYPE_FILE": str(gfd.machine)}
    done = subprocess.run([sys.executable, "-m", GFD, "--oneshot", "--no-timestamp", "--output-file=",
                           "--use-node-feature-api=false"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    # output.go ToFile(""): the labels on standard output, in the file's format; the log on stderr.
    assert dict(line.split("=", 1) for line in done.stdout.decode().splitlines()) == DGX_H100


def test_infinite_sleep_interval_labels_once_and_stays_up(gfd: Gfd) -> None:
    # v0.19 (#1603): --sleep-interval=infinite, for running GFD as a pod that labels once.
    p = gfd.start("--sleep-interval=infinite", "--no-timestamp")
    wait_until(gfd.output.exists, 20, "the labels file")
    assert gfd.labels() == DGX_H100
    wait_until(lambda: "Sleeping for ever" in gfd.log(), 10, "the pass to end")
    assert p.poll() is None
    assert gfd.procs.stop(p) == 0
    assert not gfd.output.exists()
