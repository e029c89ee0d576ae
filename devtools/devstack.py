"""The whole stack on one machine with no GPU and no kubelet: the shipped supervisord.conf
runs the three services on a simulated fleet, beside a kubelet simulator process, all in
a fresh temporary directory. Used by `make demo`, the end-to-end tests and `bench/`.

It runs from a source checkout (it needs the repository's supervisord.conf).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path
from types import TracebackType
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from devtools.kubelet_simulator.control import KubeletSimClient

REPO = Path(__file__).resolve().parents[1]
SUPERVISORD_CONF = REPO / "supervisord.conf"
ENTRYPOINT = REPO / "scripts" / "entrypoint.sh"  # the container's PID 1, as in the image
GROUP = "gpu-plugin"  # supervisord.conf's [group:] of the three programs
BIN = Path(sys.executable).parent
PROGRAMS = ("health-monitor", "plugin-server", "registrar")
RESOURCE = "nvidia.com/gpu"
# supervisord not answering (not up yet, stopping, gone): what `rpc` raises then.
RPC_ERRORS = (OSError, HTTPException, xmlrpc.client.Error)


def stack_env(root: Path, fleet: str = "dgx-h100-8", **overrides: str) -> dict[str, str]:
    """The settings a stack in `root` runs with: run dir, kubelet socket, state dir and the
    simulated fleet, all under `root` (never the node's real paths), on top of `os.environ`."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "GPU_PLUGIN_RUN_DIR": str(root / "run"),
        "KUBELET_SOCKET": str(root / "dp" / "kubelet.sock"),
        # Cordons of this stack only: the default is the node's (/var/lib/kubelet/...).
        "GPU_PLUGIN_STATE_DIR": str(root / "state"),
        "NVML_BACKEND": "simulated",
        "SIMULATED_DEVICES": fleet,
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


def spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    """A child process whose stdout and stderr go to `log` (appended)."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def terminate(p: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, as Kubernetes and supervisord stop things; SIGKILL after `timeout`. The exit status."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


class DevStack:
    def __init__(self, fleet: str = "dgx-h100-8", env: dict[str, str] | None = None, keep: bool = False) -> None:
        # Short paths: AF_UNIX socket paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="gp-"))
        self.run_dir = self.root / "run"
        self.dp_dir = self.root / "dp"
        self.control = self.root / "kubelet.ctl"
        self.keep = keep
        self.env = stack_env(self.root, fleet, **(env or {}))
        # The entry point, which runs supervisord: what the container runtime signals and waits for.
        self.supervisord: subprocess.Popen[bytes] | None = None
        self.kubelet_proc: subprocess.Popen[bytes] | None = None
        self._kubelet: KubeletSimClient | None = None

    # -- processes --------------------------------------------------------------------
    def start_kubelet(self) -> None:
        self.dp_dir.mkdir(parents=True, exist_ok=True)
        self.kubelet_proc = spawn(
            [sys.executable, "-m", "devtools.cli", "kubelet-sim", "--dir", str(self.dp_dir), "--control",
             str(self.control)], self.env, self.root / "kubelet.log")

    def start_supervisor(self) -> None:
        # The entry point creates the run dir (and refuses one it cannot trust), as in the image.
        self.supervisord = spawn(["/bin/sh", str(ENTRYPOINT), "-c", str(SUPERVISORD_CONF)], self.env,
                                 self.root / "supervisord.log", cwd=self.root)

    def start(self) -> DevStack:
        self.start_kubelet()
        self.start_supervisor()
        return self

    @property
    def kubelet(self) -> KubeletSimClient:
        if self._kubelet is None:
            self._kubelet = KubeletSimClient(self.control)
        return self._kubelet

    def ctl(self, *args: str, check: bool = True) -> str:
        """supervisorctl; a bare program name stands for its name in the group."""
        args = tuple(f"{GROUP}:{a}" if a in PROGRAMS else a for a in args)
        out = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(SUPERVISORD_CONF), *args],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        if check and out.returncode not in (0, 3):  # 3: some process not RUNNING (status)
            raise RuntimeError(f"supervisorctl {' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out.stdout

    def rpc(self, method: str, *args: Any) -> Any:
        """supervisord's XML-RPC `supervisor.<method>`, over its socket, as supervisorctl asks it, but
        from this process: tests poll pid() and wait_running(), and a supervisorctl (a Python start)
        per poll kept a core busy. Raises one of RPC_ERRORS while supervisord does not answer."""
        transport = SupervisorTransport(None, None, f"unix://{Path(self.env['GPU_PLUGIN_RUN_DIR'], 'supervisor.sock')}")
        try:
            return getattr(xmlrpc.client.ServerProxy("http://localhost", transport).supervisor, method)(*args)
        finally:
            transport.close()

    def pid(self, program: str) -> int:
        """The program's pid (a bare name stands for its name in the group); 0 while it is down, as
        `supervisorctl pid` says, or while supervisord does not answer."""
        try:
            return int(self.rpc("getProcessInfo", f"{GROUP}:{program}" if program in PROGRAMS else program)["pid"])
        except RPC_ERRORS:
            return 0

    def wait_running(self, timeout: float = 30.0) -> None:
        """Until the three programs, and one more (the watchdog), are RUNNING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.supervisord is not None and self.supervisord.poll() is not None:
                raise RuntimeError(f"supervisord exited ({self.supervisord.returncode}); see {self.root}")
            with contextlib.suppress(*RPC_ERRORS):
                running = {i["name"] for i in self.rpc("getAllProcessInfo") if i["statename"] == "RUNNING"}
                if set(PROGRAMS) <= running and len(running) > len(PROGRAMS):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"stack not RUNNING within {timeout} s: {self.ctl('status', check=False)}")

    def supervisord_pid(self) -> int:
        """supervisord itself (a child of the entry point), from its pidfile; 0 when not running."""
        try:
            return int((self.run_dir / "supervisord.pid").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def inject(self, *args: str) -> None:
        subprocess.run([str(BIN / "gpu-plugin-dev"), "inject", *args], env=self.env, check=True, timeout=30,
                       capture_output=True)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the entry point (as Kubernetes does); returns its exit code."""
        if self._kubelet is not None:
            self._kubelet.close()
        code = terminate(self.supervisord, timeout) if self.supervisord is not None else None
        if self.kubelet_proc is not None:
            terminate(self.kubelet_proc, timeout)
        return code

    def logs(self) -> str:
        parts = []
        for name in ("supervisord.log", "kubelet.log"):
            p = self.root / name
            if p.exists():
                parts.append(f"--- {name}\n{p.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def finish(self, failed: bool) -> None:
        """Stops the stack and removes its directory, or keeps the directory after a failure."""
        self.stop()
        if failed:
            self.keep = True
            print(f"stack directory kept for inspection: {self.root}", file=sys.stderr)
        self.cleanup()

    @contextlib.contextmanager
    def finished_after(self) -> Iterator[DevStack]:
        """The stack for a block that starts it as it needs; finished (see `finish`) after it."""
        failed = True
        try:
            yield self
            failed = False
        finally:
            self.finish(failed)

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.finish(e is not None)
