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
pipe every GPU_PLUGIN_MPS_PROBE_INTERVAL (10 s by default; a process spawn each). On SIGTERM each
daemon gets `quit`, its GPUs go back to DEFAULT compute mode and its pipe directory is removed, as
NVIDIA's does on stop.

The pid file is the daemon's own, in its pipe directory on the host: it outlives the container,
and after an unclean end its pid may be anyone's (pid reuse; another PID namespace; with hostPID
a host process). A pid counts as this resource's daemon only when `not_our_daemon` finds nothing
against it; nothing else is adopted, watched as the daemon, sent `quit` or killed.

Two layouts, one implementation (common.mps): `Daemon` runs a resource's daemon, in our plugin's
pod (our chart) or in `mps-control-daemon`'s (NVIDIA's chart and the GPU Operator; see
nvidia_daemon). Where they run it writes, as NVIDIA's does, `<root>/<resource>/.started` once the
daemon is configured (ours holds what it serves: GPUs, replicas, limits) and `<root>/.ready` once
every daemon is; unlike NVIDIA's, both are removed again while a daemon is down. In NVIDIA's
layout the plugin's mps-control runs no daemon: `Watched` reads the `.started` file (is it there,
does it serve our GPUs with our replicas) every CHECK_S and asks the daemon over its pipe, as
NVIDIA's plugin does before it serves, at once when that file changes and every probe interval after, and
publishes the same `mps.state`: the replicas are Unhealthy while the other pod's daemon is down.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Protocol

from common.bus.messages import DeviceState, HealthState, MpsDaemon, MpsState
from common.bus.sockets import BusPublisher, BusSubscriber
from common.files import read_bounded, replace_file
from common.lifecycle import PermanentError, run_until_stopped
from common.mps import (
    CONTROL_BIN,
    active_thread_percentage,
    gpus_of,
    log_dir,
    pinned_mem_limit,
    pipe_dir,
    ready_file,
    started_file,
)
from common.settings import Replicated, Settings, SettingsError, SharedResource
from common.settings.dra import DraDevices

log = logging.getLogger(__name__)

CHECK_S = 1.0  # pid check: no process spawned; also the shortest probe interval (the checks' period)
_UNKNOWN = object()  # a file's content not looked at yet
COMMAND_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
BACKOFF_MAX_S = 30.0
PID_FILE = "nvidia-cuda-mps-control.pid"
PID_FILE_MAX_BYTES = 32  # a pid and a newline: anything longer was not written by the daemon
STARTED_MAX_BYTES = 64 * 1024  # 16 GPUs' UUIDs and limits take 1 KiB


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


def started_record(resource: str, gpus: list[DeviceState], replicas: int, pct: int, limits: list[str]) -> bytes:
    """The `.started` file's content: what the daemon serves, for whoever watches it from another pod."""
    return json.dumps({"resource": resource, "devices": [g.id for g in gpus], "replicas": replicas,
                       "active_thread_percentage": pct, "pinned_mem_limits": limits}, sort_keys=True).encode() + b"\n"


class _Resource(abc.ABC):
    """The MPS control daemon of one resource, as far as both layouts see it: where its files are,
    what it should serve, its state on the bus, and the control command that talks to it."""

    def __init__(self, resource: str, res: SharedResource, gpus: list[DeviceState], settings: Settings,
                 control: str) -> None:
        self.resource = resource
        self.replicas = res.replicas
        self.gpus = gpus
        self.pipe_dir = pipe_dir(settings.mps_container_root, resource)
        self.log_dir = log_dir(settings.mps_container_root, resource)
        self.started_file = started_file(settings.mps_container_root, resource)
        self._control = control
        self.probe_s = settings.mps_probe_interval  # a command over the pipe: one short process
        # NVIDIA passes only these two to the daemon; the rest of ours (PATH, locale) is harmless.
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}
        self.state = MpsDaemon(resource=resource, devices=[g.id for g in gpus], pipe_dir=self.pipe_dir, up=False,
                               ready=False, since=time.time())

    def serves(self, res: SharedResource, gpus: list[DeviceState]) -> bool:
        """Whether this daemon is the one for `res` on `gpus` (else it is replaced)."""
        return res.replicas == self.replicas and [g.id for g in gpus] == [g.id for g in self.gpus]

    def _set(self, **changes: object) -> None:
        new = dataclasses.replace(self.state, **changes)  # type: ignore[arg-type]
        if (new.up, new.ready) != (self.state.up, self.state.ready):
            new = dataclasses.replace(new, since=time.time())
        self.state = new

    async def command(self, text: str) -> str:
        rc, out = await _run([self._control], self.env, text + "\n")
        if rc != 0:
            raise MpsError(f"{text.split()[0]}: {out or f'exit status {rc}'}")
        return out

    @abc.abstractmethod
    async def check(self) -> None:
        """Brings `state` up to date (and, where the daemon is run here, starts or restarts it)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Done with this daemon: the config no longer wants it, or the program stops."""


class Daemon(_Resource):
    """The MPS control daemon of one resource, run here."""

    def __init__(self, resource: str, res: SharedResource, gpus: list[DeviceState], settings: Settings,
                 control: str, smi: str | None) -> None:
        super().__init__(resource, res, gpus, settings, control)
        self._smi = smi
        self.next_start = 0.0  # monotonic time of the next start attempt
        self.backoff = 1.0
        self.next_probe = 0.0

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

    def _unstarted(self) -> None:
        """Takes the `.started` file away: whoever watches from another pod stops offering the replicas."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.started_file)

    async def _compute_mode(self, mode: str) -> None:
        if self._smi is None:
            raise MpsError(f"nvidia-smi not found: cannot set compute mode {mode}")
        for g in self.gpus:
            rc, out = await _run([self._smi, "-i", g.id, "-c", mode], self.env)
            if rc != 0:
                raise MpsError(f"setting compute mode {mode} on {g.id}: {out or f'exit status {rc}'}")

    async def start(self) -> None:
        self._set(up=False, ready=False, pid=0, active_thread_percentage=0, pinned_mem_limits=[])
        self._unstarted()  # one left by a run that ended uncleanly says nothing of the daemon to come
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
        # 0644: read by the plugin's pod, whatever this one's umask; by rename: never half of it.
        replace_file(self.started_file, started_record(self.resource, self.gpus, self.replicas, pct, limits))
        self._set(ready=True, active_thread_percentage=pct, pinned_mem_limits=limits, last_error="")
        self.backoff = 1.0
        self.next_probe = time.monotonic() + self.probe_s
        log.info("MPS daemon for %s ready (pid %d): active thread percentage %d, pinned memory %s", self.resource,
                 pid, pct, ", ".join(limits) or "not limited (size unknown)")

    async def check(self) -> None:
        """Notices a daemon that died or stopped answering, and (re)starts it when due."""
        now = time.monotonic()
        if self.state.up:
            _, why = self.who()
            error = f"the MPS control daemon (pid {self.state.pid}) is gone: {why}" if why else ""
            if not why and now >= self.next_probe:
                self.next_probe = now + self.probe_s
                try:
                    await self.command("get_default_active_thread_percentage")
                except MpsError as e:
                    error = f"the MPS control daemon does not answer: {e}"
            if not error:
                return
            log.error("%s: %s; restarting it", self.resource, error)
            self._unstarted()
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
            self._unstarted()
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
        self._unstarted()  # first: the replicas are withdrawn before their daemon goes
        await self._quit()
        with contextlib.suppress(MpsError):
            await self._compute_mode("DEFAULT")
        self._set(up=False, ready=False, pid=0)
        log.info("MPS daemon for %s stopped; %s removed", self.resource, self.pipe_dir)


class Watched(_Resource):
    """The MPS control daemon of one resource run by mps-control-daemon in another pod (NVIDIA's
    layout): never started, configured, quit or killed from here; only looked at."""

    def __init__(self, resource: str, res: SharedResource, gpus: list[DeviceState], settings: Settings,
                 control: str) -> None:
        super().__init__(resource, res, gpus, settings, control)
        self.next_probe = 0.0
        self._probed: tuple[int, int, int] | None = None  # the `.started` file (dev, inode, mtime) last probed
        self._said = ""

    def _record(self) -> tuple[tuple[int, int, int] | None, dict[str, object], str]:
        """(the `.started` file's identity or None, what it says, why it does not serve us: "" if it does)."""
        path = self.started_file
        try:
            st = os.lstat(path)
            # Not followed if a link, as every file of the MPS root on the host.
            data = read_bounded(path, STARTED_MAX_BYTES, follow=False)
        except FileNotFoundError:
            return None, {}, (f"no MPS control daemon is ready for {self.resource}: waiting for mps-control-daemon "
                              f"(no {path})")
        except OSError as e:
            return None, {}, f"{path}: {e.strerror or e}"
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if not data.strip():
            return key, {}, ""  # NVIDIA's own daemon writes it empty: its answer below is all there is to check
        try:
            record = json.loads(data)
        except ValueError:
            return key, {}, f"{path} is not what mps-control-daemon writes"
        if not isinstance(record, dict):
            return key, {}, f"{path} is not what mps-control-daemon writes"
        devices, replicas, ours = record.get("devices"), record.get("replicas"), [g.id for g in self.gpus]
        if devices != ours or replicas != self.replicas:
            theirs = f"{len(devices)} GPUs" if isinstance(devices, list) else repr(devices)
            if isinstance(devices, list) and devices != ours:
                theirs += " (not these)"
            return key, record, (f"the MPS control daemon for {self.resource} serves another configuration "
                                 f"({replicas!r} replicas of {theirs}; here {self.replicas} of {len(ours)} GPUs): "
                                 "waiting for mps-control-daemon to apply this one")
        return key, record, ""

    def _down(self, error: str, up: bool = False) -> None:
        if self.state.ready:
            log.error("MPS daemon for %s is no longer ready: %s: its replicas are Unhealthy", self.resource, error)
        elif error != self._said:
            log.warning("%s", error)
        self._said = error
        self._set(up=up, ready=False, last_error=error, active_thread_percentage=0, pinned_mem_limits=[])

    async def check(self) -> None:
        key, record, why = self._record()
        if key is None:
            self._probed = None  # whatever file comes next is probed at once
        if key is None or why:
            self._down(why)
            return
        now = time.monotonic()
        if key == self._probed and now < self.next_probe:
            return  # nothing new since the last answer
        self._probed, self.next_probe = key, now + self.probe_s
        try:
            answer = await self.command("get_default_active_thread_percentage")
        except MpsError as e:
            self._down(f"the MPS control daemon for {self.resource} does not answer: {e}")
            return
        want = active_thread_percentage(self.replicas)
        number = re.search(r"\d+(\.\d*)?", answer)
        pct = int(float(number.group())) if number else want
        if number is None:
            # An answer in a form we do not know is still an answer, as NVIDIA's check takes it.
            log.warning("MPS %s: the daemon's thread percentage %r is not a number: not compared", self.resource,
                        answer)
        if pct != want:
            self._down(f"the MPS control daemon for {self.resource} gives each client {answer!r} % of the SMs, not "
                       f"{want} ({self.replicas} replicas): waiting for mps-control-daemon to apply this config",
                       up=True)
            return
        limits = record.get("pinned_mem_limits")
        if not self.state.ready:
            log.info("MPS daemon for %s (run by mps-control-daemon) is ready: active thread percentage %d",
                     self.resource, pct)
        self._said = ""
        self._set(up=True, ready=True, active_thread_percentage=pct, last_error="",
                  pinned_mem_limits=[str(x) for x in limits] if isinstance(limits, list) else [])

    async def stop(self) -> None:
        # Not ours: it keeps serving its clients after this pod is gone.
        self._set(up=False, ready=False)


def plan(mps: Replicated, state: HealthState,
         dra: DraDevices | None = None) -> list[tuple[str, SharedResource, list[DeviceState]]]:
    """(served name, resource, its GPUs) for each MPS resource with at least one GPU on this node. The
    GPUs DRA serves are not the device plugin's (services/plugin_server/device_table.py leaves them out
    before it numbers the GPUs a sharing rule selects): no daemon on them, and the same positions."""
    devices = state.devices if dra is None else dra.device_plugin_gpus(state.devices)
    out = []
    for res in mps.resources:
        gpus = gpus_of(res, devices)
        if gpus:
            out.append((mps.served_name(res), res, gpus))
    return out


class Devices(Protocol):
    """Where the GPUs come from: the health bus in the plugin's pod, NVML in mps-control-daemon's."""

    async def next(self, timeout: float, needed: bool) -> HealthState | None:
        """A new device state, or None after `timeout`; `needed`: MPS is configured (NVML may be opened)."""

    def close(self) -> None: ...


class BusDevices:
    """The health-monitor's state, from the health bus."""

    def __init__(self, bus: Path) -> None:
        self._sub = BusSubscriber([bus], topics=[HealthState.TOPIC])

    async def next(self, timeout: float, needed: bool) -> HealthState | None:
        msg = await self._sub.recv_timeout(timeout)
        return msg if isinstance(msg, HealthState) else None

    def close(self) -> None:
        self._sub.close()


class MpsControl:
    """The daemons of sharing.mps on this node's GPUs: run (`external=False`) or watched."""

    def __init__(self, settings: Settings, publisher: BusPublisher, devices: Devices, external: bool = False) -> None:
        self.settings = settings
        self.mps = settings.sharing.mps
        self._dra = settings.dra_devices  # at start only, as the plugin-server reads it (RESTART)
        self.external = external
        self._pub = publisher
        self._devices = devices
        self.daemons: dict[str, _Resource] = {}
        self._published: list[MpsDaemon] | None = None
        self._state: HealthState | None = None
        self._replan = False
        # The `.ready` file's content as last written (None: removed); unknown at the start (a file may
        # be left by a run that ended uncleanly), so the first look always writes or removes it.
        self._ready: bytes | object | None = _UNKNOWN
        self._control, self._smi = "", None
        if self.mps is not None:
            try:
                self._control, self._smi = self._tools(settings)
            except SettingsError as e:
                raise PermanentError(str(e)) from None

    @staticmethod
    def _tools(settings: Settings) -> tuple[str, str | None]:
        """The control binary and nvidia-smi; SettingsError when MPS cannot be served here."""
        control = find_binary(CONTROL_BIN, settings)
        if control is None:
            raise SettingsError(f"sharing.mps is configured but {CONTROL_BIN} is not on PATH nor in "
                                f"{settings.container_driver_root}/usr/bin: the NVIDIA driver's MPS binaries are "
                                "needed (or remove sharing.mps)")
        host, here = settings.mps_host_root, settings.mps_container_root
        if os.path.realpath(host) != os.path.realpath(here) and not os.path.ismount(here):
            # Else the daemons' pipes stay inside this container while Allocate mounts the empty host
            # directory into workloads: in EXCLUSIVE_PROCESS mode all but one client per GPU fail.
            raise SettingsError(
                f"sharing.mps: {here} (GPU_PLUGIN_MPS_CONTAINER_ROOT) is not a mount of the host's MPS root {host} "
                "(MPS_ROOT): mount it there (the chart's mps.root does), or give both the same path on a host")
        return control, find_binary("nvidia-smi", settings)

    async def apply_settings(self, settings: Settings) -> None:
        """A config reload: the daemons follow the new sharing.mps from the next check (a daemon whose
        GPUs or replicas changed is replaced; the others keep running, with their clients).
        SettingsError refuses it (nothing changes) when MPS cannot be served here."""
        if settings.sharing.mps is not None and not self._control:
            self._control, self._smi = self._tools(settings)
        self.settings, self.mps, self._replan = settings, settings.sharing.mps, True
        self._log_plan()

    def _log_plan(self) -> None:
        if self.mps is None:
            log.info("sharing.mps is not configured: no MPS daemon %s", "to watch" if self.external else "runs")
            return
        for res in self.mps.resources:
            log.info("MPS %s: %d replicas of %s as %s%s", res.name, res.replicas,
                     "all GPUs" if res.devices is None else f"devices {res.devices}", self.mps.served_name(res),
                     " (its daemon is run by mps-control-daemon: watched here)" if self.external else "")

    def _publish(self) -> None:
        daemons = [d.state for d in self.daemons.values()]
        if daemons != self._published:
            self._published = daemons
            self._pub.publish_state(MpsState(root=self.settings.mps_container_root, daemons=daemons))

    def _write_ready(self) -> None:
        """`<root>/.ready` while every daemon run here is ready (what NVIDIA's plugin waits for)."""
        if self.external:
            return  # the other pod's file
        # Also with no daemon to run (no sharing.mps, or no GPU for it), once that is known: NVIDIA's
        # writes it after starting what there is, even nothing ("waiting indefinitely").
        known = self.mps is None or self._state is not None
        ready = known and all(d.state.ready for d in self.daemons.values())
        content = b"".join(started_record(d.resource, d.gpus, d.replicas, d.state.active_thread_percentage,
                                          d.state.pinned_mem_limits) for d in self.daemons.values()) if ready else None
        if content == self._ready:
            return
        path = ready_file(self.settings.mps_container_root)
        if content is None:
            # Also a file left by a run that ended uncleanly (nothing is known at the start).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)  # no daemon made it yet: none to run
            replace_file(path, content)
            log.info("all MPS daemons ready: %s written", path)
        self._ready = content

    async def _reconcile(self, state: HealthState) -> None:
        wanted = ({name: (res, gpus) for name, res, gpus in plan(self.mps, state, self._dra)}
                  if self.mps is not None else {})
        for name in list(self.daemons):
            d = self.daemons[name]
            if name not in wanted or not d.serves(*wanted[name]):
                await d.stop()
                del self.daemons[name]
        for name, (res, gpus) in wanted.items():
            if name not in self.daemons:
                self.daemons[name] = (Watched(name, res, gpus, self.settings, self._control) if self.external else
                                      Daemon(name, res, gpus, self.settings, self._control, self._smi))

    async def _loop(self) -> None:
        self._publish()
        while True:
            msg = await self._devices.next(CHECK_S, self.mps is not None)
            if msg is not None and msg.nvml_ok:
                self._state, self._replan = msg, True
            if self._replan and self._state is not None:
                self._replan = False
                await self._reconcile(self._state)
            for d in list(self.daemons.values()):
                await d.check()
            self._write_ready()
            self._publish()

    async def run(self, stop: asyncio.Event) -> None:
        self._log_plan()
        try:
            await run_until_stopped(
                stop,
                asyncio.create_task(self._pub.run(), name="bus-heartbeat"),
                asyncio.create_task(self._loop(), name="mps-daemons"),
            )
        finally:
            if not self.external:
                # First, as NVIDIA's: nothing may take the daemons for ready while they stop.
                with contextlib.suppress(OSError):
                    os.unlink(ready_file(self.settings.mps_container_root))
            for d in self.daemons.values():
                await d.stop()
            with contextlib.suppress(Exception):
                self._publish()
