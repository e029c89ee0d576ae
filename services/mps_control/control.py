"""mps-control: one NVIDIA MPS control daemon per MPS-shared resource, started, configured,
watched and stopped as NVIDIA's mps-control-daemon does, with its state on the bus.

For each resource of sharing.mps it starts `nvidia-cuda-mps-control -d` with the pipe and log
directories under the MPS root, after putting its GPUs in EXCLUSIVE_PROCESS compute mode, then
sets the default pinned-memory limit of each GPU (memory / replicas) and the default active
thread percentage (100 / replicas). Only then is the daemon `ready` in `mps.state`, and only
a daemon that has been ready has its replicas offered by the plugin-server. NVIDIA's plugin
keeps advertising the replicas of a daemon that died; here a daemon that stops answering is
published down (its replicas turn Unhealthy at the kubelet) and restarted, with backoff.

Watching is cheap: the daemon's pid (its pid file) every CHECK_S, and a real command over its
pipe every PROBE_S (a process spawn each). On SIGTERM each daemon gets `quit`, its GPUs go
back to DEFAULT compute mode and its pipe directory is removed, as NVIDIA's does on stop.

The pid file is the daemon's own, in its pipe directory on the host: it outlives the container,
and after an unclean end its pid may be anyone's (pid reuse; another PID namespace; with hostPID
a host process). A pid counts as this resource's daemon only when `not_our_daemon` finds nothing
against it; nothing else is adopted, watched as the daemon, sent `quit` or killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from common.bus.messages import DeviceState, HealthState, MpsDaemon, MpsState
from common.bus.sockets import BusPublisher, BusSubscriber
from common.files import read_bounded
from common.lifecycle import PermanentError, run_until_stopped
from common.mps import CONTROL_BIN, active_thread_percentage, gpus_of, log_dir, pinned_mem_limit, pipe_dir
from common.settings import Replicated, Settings, SharedResource

log = logging.getLogger(__name__)

CHECK_S = 1.0  # pid check: no process spawned
PROBE_S = 10.0  # a command over the pipe: one short process
COMMAND_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 30.0
PID_FILE = "nvidia-cuda-mps-control.pid"
PID_FILE_MAX_BYTES = 32  # a pid and a newline: anything longer was not written by the daemon


def not_our_daemon(pid: int, pipe_dir: str) -> str:
    """Why process `pid` is not the MPS control daemon serving `pipe_dir`; "" when it is.

    Its name proves little: any process may call itself nvidia-cuda-mps-control. What binds a
    daemon to its pipe directory is the environment it was started with: it serves
    $CUDA_MPS_PIPE_DIRECTORY, which mps-control sets to `pipe_dir` (as NVIDIA's does). A daemon
    of another pipe directory (another resource's, the host's own MPS), or a process that only
    took the name, does not match. It also runs as our user: mps-control started it (this one,
    or an earlier one of the same pod spec, for an adopted daemon).

    Not checked: the executable (/proc/<pid>/exe is the interpreter for the fake, a script, and
    changes with a driver upgrade), nor `-d` in the command line (not verified on a real daemon).
    So a control client started with this pipe directory would pass; mps-control never reads the
    pid file while a client of its own runs, so only someone else's client that got a dead
    daemon's pid could, and only while it runs.
    """
    proc = f"/proc/{pid}"
    try:
        status = Path(proc, "status").read_text()
        argv = Path(proc, "cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid} is not running"
    uid = next((line.split()[1] for line in status.splitlines() if line.startswith("Uid:")), "?")
    if uid != str(os.getuid()):
        return f"pid {pid} runs as uid {uid}, not as mps-control's ({os.getuid()})"
    name = CONTROL_BIN.encode()
    # argv[1] for a script (the fake): its interpreter comes first.
    if name not in (os.path.basename(argv[0]), os.path.basename(argv[1]) if len(argv) > 1 else b""):
        return f"pid {pid} is not {CONTROL_BIN} ({b' '.join(argv).decode(errors='replace').strip()!r})"
    try:
        env = Path(proc, "environ").read_bytes().split(b"\0")
    except OSError as e:
        return f"pid {pid} is called {CONTROL_BIN} but its environment is not readable ({e.strerror})"
    served = next((v.split(b"=", 1)[1].decode(errors="replace") for v in env
                   if v.startswith(b"CUDA_MPS_PIPE_DIRECTORY=")), None)
    if served is None:
        return f"pid {pid} is called {CONTROL_BIN} but was not started with a CUDA_MPS_PIPE_DIRECTORY"
    if served != pipe_dir:
        return f"pid {pid} is the {CONTROL_BIN} of another pipe directory ({served})"
    return ""


class MpsError(RuntimeError):
    """A daemon could not be started, configured or reached; the message says which step."""


def find_binary(name: str, settings: Settings) -> str | None:
    """On PATH, else in the driver root mounted in this container (where the host's driver is)."""
    extra = os.path.join(settings.container_driver_root, "usr", "bin")
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}{os.pathsep}{extra}")


async def _run(argv: list[str], env: dict[str, str], stdin: str = "") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            out, _ = await proc.communicate(stdin.encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"no answer within {COMMAND_TIMEOUT_S:.0f} s"
    return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace").strip()


class Daemon:
    """The MPS control daemon of one resource."""

    def __init__(self, resource: str, res: SharedResource, gpus: list[DeviceState], settings: Settings,
                 control: str, smi: str | None) -> None:
        self.resource = resource
        self.replicas = res.replicas
        self.gpus = gpus
        self.pipe_dir = pipe_dir(settings.mps_container_root, resource)
        self.log_dir = log_dir(settings.mps_container_root, resource)
        self._control = control
        self._smi = smi
        # NVIDIA passes only these two to the daemon; the rest of ours (PATH, locale) is harmless.
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}
        self.state = MpsDaemon(resource=resource, devices=[g.id for g in gpus], pipe_dir=self.pipe_dir, up=False,
                               ready=False, since=time.time())
        self.next_start = 0.0  # monotonic time of the next start attempt
        self.backoff = 1.0
        self.next_probe = 0.0

    def _set(self, **changes: object) -> None:
        new = dataclasses.replace(self.state, **changes)  # type: ignore[arg-type]
        if (new.up, new.ready) != (self.state.up, self.state.ready):
            new = dataclasses.replace(new, since=time.time())
        self.state = new

    def who(self) -> tuple[int, str]:
        """(the pid in the pid file or 0, why it is not our daemon: "" when it is)."""
        path = Path(self.pipe_dir, PID_FILE)
        try:
            # Not followed if a link: the pipe directory is on the host, where others may plant one.
            data = read_bounded(path, PID_FILE_MAX_BYTES, follow=False).strip()
        except FileNotFoundError:
            return 0, f"no {path}"
        except OSError as e:
            return 0, f"{path}: {e.strerror or e}"
        if not data.isdigit() or int(data) == 0:  # bytes.isdigit: ASCII digits only
            return 0, f"{path} holds no pid ({data!r})"
        pid = int(data)
        return pid, not_our_daemon(pid, self.pipe_dir)

    def pid(self) -> int:
        """The daemon's pid when it runs, else 0 (see `not_our_daemon` for what counts)."""
        pid, why = self.who()
        return 0 if why else pid

    def _kill(self, pid: int) -> None:
        """SIGKILL to `pid` if it is still our daemon: the pidfd, opened before the check, pins the
        process, so a pid that changed hands after the check is never hit."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone
        try:
            if not not_our_daemon(pid, self.pipe_dir):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass  # it ended meanwhile
        finally:
            os.close(fd)

    async def command(self, text: str) -> str:
        rc, out = await _run([self._control], self.env, text + "\n")
        if rc != 0:
            raise MpsError(f"{text.split()[0]}: {out or f'exit status {rc}'}")
        return out

    async def _compute_mode(self, mode: str) -> None:
        if self._smi is None:
            raise MpsError(f"nvidia-smi not found: cannot set compute mode {mode}")
        for g in self.gpus:
            rc, out = await _run([self._smi, "-i", g.id, "-c", mode], self.env)
            if rc != 0:
                raise MpsError(f"setting compute mode {mode} on {g.id}: {out or f'exit status {rc}'}")

    async def start(self) -> None:
        self._set(up=False, ready=False, pid=0, active_thread_percentage=0, pinned_mem_limits=[])
        await self._compute_mode("EXCLUSIVE_PROCESS")
        os.makedirs(self.pipe_dir, 0o755, exist_ok=True)
        os.makedirs(self.log_dir, 0o755, exist_ok=True)
        pid, why = self.who()
        if not why:
            # Left by an mps-control that died without stopping it: its clients keep running, so it is
            # adopted (and configured again) rather than killed.
            log.info("adopting the running MPS control daemon for %s (pid %d)", self.resource, pid)
        else:
            if pid:
                log.warning("MPS %s: the pid file names pid %d, not our daemon (%s): left alone", self.resource,
                            pid, why)
            # A pid file naming no daemon of ours was left by a container that ended uncleanly: remove it,
            # so that neither the new daemon nor a later stop takes its pid for ours.
            Path(self.pipe_dir, PID_FILE).unlink(missing_ok=True)
            log.info("starting the MPS control daemon for %s (%d GPUs, %d replicas each), pipe %s", self.resource,
                     len(self.gpus), self.replicas, self.pipe_dir)
            rc, out = await _run([self._control, "-d"], self.env)
            if rc != 0:
                raise MpsError(f"{CONTROL_BIN} -d: {out or f'exit status {rc}'}")
        pid, why = self.who()
        if why:
            raise MpsError(f"{CONTROL_BIN} -d returned but no daemon of ours runs on {self.pipe_dir}: {why}")
        self._set(up=True, pid=pid)
        limits: list[str] = []
        for g in self.gpus:
            limit = pinned_mem_limit(g.memory_mb, self.replicas)
            if limit:
                await self.command(f"set_default_device_pinned_mem_limit {g.index} {limit}")
                limits.append(f"{g.index}={limit}")
        pct = active_thread_percentage(self.replicas)
        await self.command(f"set_default_active_thread_percentage {pct}")
        self._set(ready=True, active_thread_percentage=pct, pinned_mem_limits=limits, last_error="")
        self.backoff = 1.0
        self.next_probe = time.monotonic() + PROBE_S
        log.info("MPS daemon for %s ready (pid %d): active thread percentage %d, pinned memory %s", self.resource,
                 pid, pct, ", ".join(limits) or "not limited (size unknown)")

    async def check(self) -> None:
        """Notices a daemon that died or stopped answering, and (re)starts it when due."""
        now = time.monotonic()
        if self.state.up:
            _, why = self.who()
            error = f"the MPS control daemon (pid {self.state.pid}) is gone: {why}" if why else ""
            if not why and now >= self.next_probe:
                self.next_probe = now + PROBE_S
                try:
                    await self.command("get_default_active_thread_percentage")
                except MpsError as e:
                    error = f"the MPS control daemon does not answer: {e}"
            if not error:
                return
            log.error("%s: %s; restarting it", self.resource, error)
            self._set(up=False, ready=False, last_error=error, restarts=self.state.restarts + 1)
            await self._quit()
            # Down is published before the restart (the caller publishes after each check), and a
            # daemon that keeps dying is restarted less and less often.
            self.next_start = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
            return
        if now < self.next_start:
            return
        try:
            await self.start()
        except (MpsError, OSError) as e:
            # A daemon without its limits would give each client the whole GPU: it goes.
            await self._quit()
            self._set(up=False, ready=False, pid=0, last_error=str(e))
            log.error("MPS daemon for %s not ready: %s; retrying in %.0f s", self.resource, e, self.backoff)
            self.next_start = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)

    async def _quit(self) -> None:
        """Stops a daemon that still runs (quit, then SIGKILL), and removes what it left in its pipe dir."""
        pid = self.pid()
        if pid:
            with contextlib.suppress(MpsError):
                await self.command("quit")
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self.pid() == pid and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # polling a pid we cannot wait on (the daemon is not our child)
            if self.pid() == pid:
                log.warning("MPS daemon for %s (pid %d) did not quit: killing it", self.resource, pid)
                self._kill(pid)
        shutil.rmtree(self.pipe_dir, ignore_errors=True)

    async def stop(self) -> None:
        await self._quit()
        with contextlib.suppress(MpsError):
            await self._compute_mode("DEFAULT")
        self._set(up=False, ready=False, pid=0)
        log.info("MPS daemon for %s stopped; %s removed", self.resource, self.pipe_dir)


def plan(mps: Replicated, state: HealthState) -> list[tuple[str, SharedResource, list[DeviceState]]]:
    """(served name, resource, its GPUs) for each MPS resource with at least one GPU on this node."""
    out = []
    for res in mps.resources:
        gpus = gpus_of(res, state.devices)
        if gpus:
            out.append((mps.served_name(res), res, gpus))
    return out


class MpsControl:
    def __init__(self, settings: Settings, publisher: BusPublisher, health_bus: Path) -> None:
        assert settings.sharing.mps is not None
        self.settings = settings
        self.mps = settings.sharing.mps
        self._pub = publisher
        self._health_bus = health_bus
        self.daemons: dict[str, Daemon] = {}
        self._published: list[MpsDaemon] | None = None
        control = find_binary(CONTROL_BIN, settings)
        if control is None:
            raise PermanentError(f"sharing.mps is configured but {CONTROL_BIN} is not on PATH nor in "
                                 f"{settings.container_driver_root}/usr/bin: the NVIDIA driver's MPS binaries are "
                                 "needed (or remove sharing.mps)")
        self._control = control
        self._smi = find_binary("nvidia-smi", settings)
        host, here = settings.mps_host_root, settings.mps_container_root
        if os.path.realpath(host) != os.path.realpath(here) and not os.path.ismount(here):
            # Else the daemons' pipes stay inside this container while Allocate mounts the empty host
            # directory into workloads: in EXCLUSIVE_PROCESS mode all but one client per GPU fail.
            raise PermanentError(
                f"sharing.mps: {here} (GPU_PLUGIN_MPS_CONTAINER_ROOT) is not a mount of the host's MPS root {host} "
                "(MPS_ROOT): mount it there (the chart's mps.root does), or give both the same path on a host")

    def _publish(self) -> None:
        daemons = [d.state for d in self.daemons.values()]
        if daemons != self._published:
            self._published = daemons
            self._pub.publish_state(MpsState(root=self.settings.mps_container_root, daemons=daemons))

    async def _reconcile(self, state: HealthState) -> None:
        wanted = {name: (res, gpus) for name, res, gpus in plan(self.mps, state)}
        for name in list(self.daemons):
            d = self.daemons[name]
            if name not in wanted or [g.id for g in wanted[name][1]] != [g.id for g in d.gpus]:
                await d.stop()
                del self.daemons[name]
        for name, (res, gpus) in wanted.items():
            if name not in self.daemons:
                self.daemons[name] = Daemon(name, res, gpus, self.settings, self._control, self._smi)

    async def _loop(self) -> None:
        sub = BusSubscriber([self._health_bus], topics=[HealthState.TOPIC])
        try:
            self._publish()
            while True:
                msg = await sub.recv_timeout(CHECK_S)
                if isinstance(msg, HealthState) and msg.nvml_ok:
                    await self._reconcile(msg)
                for d in self.daemons.values():
                    await d.check()
                self._publish()
        finally:
            sub.close()

    async def run(self, stop: asyncio.Event) -> None:
        for res in self.mps.resources:
            log.info("MPS %s: %d replicas of %s as %s", res.name, res.replicas,
                     "all GPUs" if res.devices is None else f"devices {res.devices}", self.mps.served_name(res))
        try:
            await run_until_stopped(
                stop,
                asyncio.create_task(self._pub.run(), name="bus-heartbeat"),
                asyncio.create_task(self._loop(), name="mps-daemons"),
            )
        finally:
            for d in self.daemons.values():
                await d.stop()
            with contextlib.suppress(Exception):
                self._publish()
