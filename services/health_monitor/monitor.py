"""The health monitor: the only NVML user. Discovers devices, watches driver events, probes
every GPU and publishes the node's full device state. The health rules themselves live in
`model.py` as plain code; this module is the driver around them: NVML, threads, backoff
and the bus.

An event wait that fails with anything but a timeout is a fault of the event channel, not
evidence about any GPU: the event set is re-created, the failure is reported, and every GPU
is probed at once; only what the probes find marks devices unhealthy. (NVIDIA's plugin
marks every device unhealthy, for good, on such an error.)

Threads: NVML's event wait blocks in C (ctypes releases the GIL), so it runs in one worker
thread; each GPU's probe runs in a thread of its own. Both hand their findings to the asyncio
loop, which owns the model and the bus socket.

Hangs: a GPU whose probe hangs is Unhealthy with the call named while the others are served
(probes.py). The monitor does not restart itself for a hung GPU: a restart would re-discover
the same GPU and hang there, taking every GPU's state with it. It does exit (common.watchdog)
when its loop or its event thread is stuck, since then no GPU is watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from pathlib import Path

from common.bus.messages import ConfigInfo, HealthEvent, HealthState
from common.bus.sockets import BusPublisher
from common.cordons import CordonFileError, CordonStateError, CordonStore
from common.fswatch import DirWatcher
from common.lifecycle import PermanentError, run_until_stopped
from common.logs import hold_logs, release_logs
from common.nvml.backend import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNKNOWN,
    EventData,
    Handle,
    NvmlBackend,
    NvmlError,
)
from common.settings import HealthConfig, Settings
from common.version import VERSION
from services.health_monitor.discovery import Inventory, discover_remembering
from services.health_monitor.events import register_events
from services.health_monitor.model import Clock, HealthModel, Probe, RecoveryPolicy, SystemClock
from services.health_monitor.probes import Prober
from services.health_monitor.remembered import GpuMemory
from services.health_monitor.xid_policy import XidPolicy

__all__ = ["HealthMonitor", "NvmlInitError", "RecoveryPolicy"]

log = logging.getLogger(__name__)

# How long one event wait lasts before the thread looks at `_stopping` again. Shutdown does not
# wait for it (nvmlShutdown is skipped while the thread is inside a wait), and the watchdog times
# the call against its limit (30 s), so the slice is a third of that at most: a short slice only
# woke the thread at idle. 5 s, as NVIDIA's plugin waits.
WAIT_SLICE_MS = 5000
INIT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
MAX_PENDING_EVENTS = 1000  # events handed to the loop and not yet applied
EVENT_SET_BACKOFF_S = (0.1, 1.0, 5.0, 30.0)


class NvmlInitError(PermanentError):
    """NVML could not be initialised; the message says why and what to check."""


def explain_init_error(e: NvmlError) -> str:
    if e.code == NVML_ERROR_LIBRARY_NOT_FOUND:
        hint = (
            "libnvidia-ml.so.1 is not visible in the container: run the pod with the NVIDIA "
            "container runtime (runtimeClassName: nvidia) or mount the driver root and set "
            "NVIDIA_DRIVER_ROOT"
        )
    elif e.code == NVML_ERROR_DRIVER_NOT_LOADED:
        hint = "the NVIDIA kernel driver is not loaded on this node: install or load it (nvidia.ko)"
    else:
        hint = "check the driver installation (nvidia-smi on the host) and the container runtime"
    return f"nvml init failed: {e}: {hint}"


class HealthMonitor:
    def __init__(
        self,
        backend: NvmlBackend,
        publisher: BusPublisher,
        policy: XidPolicy,
        fail_on_init_error: bool = True,
        recovery: RecoveryPolicy | None = None,
        health: HealthConfig | None = None,
        cordons: CordonStore | None = None,
        clock: Clock | None = None,
        degraded: list[str] | None = None,
        probe_deadline: float = Settings.probe_deadline,
        watchdog_limit: float = Settings.watchdog_timeout,
        memory: GpuMemory | None = None,
    ) -> None:
        self._memory = memory  # the GPUs named earlier in this boot (services.health_monitor.remembered)
        self._wait_slice_ms = int(min(WAIT_SLICE_MS, watchdog_limit * 1000 / 3))
        self._degraded = list(degraded or ())  # optional features that are off, and why
        self._nvml = backend
        self._pub = publisher
        self._policy = policy
        self._fail_on_init_error = fail_on_init_error
        self._recovery = recovery or RecoveryPolicy()
        self._cordon_store = cordons
        self._clock: Clock = clock or SystemClock()
        self._model = HealthModel(policy, self._recovery, health, self._clock)
        self._cordon_error = ""  # the cordon file is unreadable: every device stays cordoned
        self.config = ConfigInfo()  # set by the config reloader
        self._published = False
        self._inventory = Inventory()
        self._nvml_ok = False
        self._error = "starting"
        self._driver = ""
        self._cuda_driver = 0  # NVML's encoding; 0 unknown
        self._stopping = threading.Event()
        self._probe_now = asyncio.Event()
        self._prober = Prober(backend, probe_deadline, self._probe_now.set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = threading.BoundedSemaphore(MAX_PENDING_EVENTS)
        self._inbox: deque[EventData] = deque()  # from the event thread to the loop (deque: thread-safe ends)
        self._event_thread: threading.Thread | None = None
        self._event_call: tuple[str, float] | None = None  # the event thread's NVML call in progress

    # -- state ------------------------------------------------------------------------
    def _publish_state(self) -> None:
        self._published = True
        devices = list(self._model.devices.values())
        self._pub.publish_state(
            HealthState(
                nvml_ok=self._nvml_ok,
                error=self._error,
                driver_version=self._driver,
                devices=devices,
                links=self._inventory.links,
                degraded=self._degraded,
                nvml_library=self._nvml.library(),
                plugin_version=VERSION,
                config=self.config,
                cuda_driver_version=self._cuda_driver,
            )
        )

    async def apply_policy(self, policy: XidPolicy, recovery: RecoveryPolicy, health: HealthConfig) -> None:
        """A config reload: new health rules, a new probe interval from the next probe on."""
        self._policy, self._recovery = policy, recovery
        self._model.set_policy(policy, recovery, health)

    async def set_config(self, config: ConfigInfo) -> None:
        self.config = config
        if self._published:  # else the first state carries it
            self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        """Applies the model; on any change publishes the state, then the transitions and
        other queued events (the state first: that is what the kubelet waits for)."""
        if self._model.refresh() or force:
            self._publish_state()
        for event in self._model.take_events():
            self._pub.publish(event)

    # -- startup ----------------------------------------------------------------------
    async def _init_nvml(self, stop: asyncio.Event) -> bool:
        attempt = 0
        while not stop.is_set():
            try:
                self._nvml.init()
                return True
            except NvmlError as e:
                self._error = explain_init_error(e)
            log.error("%s", self._error)
            self._pub.publish(HealthEvent(time=self._clock.time(), device="", event="nvml", reason=self._error))
            self._publish_state()
            if self._fail_on_init_error:
                raise NvmlInitError(self._error)
            delay = INIT_BACKOFF_S[min(attempt, len(INIT_BACKOFF_S) - 1)]
            attempt += 1
            log.info("failOnInitError=false: advertising no devices, retrying NVML in %.0f s", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancellation (3.11)
                    await stop.wait()
        return False

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(self._pub.run(), name="bus-heartbeat")]
        try:
            if not await self._init_nvml(stop):
                return
            self._driver = self._nvml.system_get_driver_version()
            try:  # for feature-labels' cuda.runtime-version labels: once, as the driver version
                self._cuda_driver = self._nvml.system_get_cuda_driver_version()
            except NvmlError as e:
                log.warning("CUDA driver version unknown: %s", e)
            log.info("NVML library: %s", self._nvml.library())
            # In threads, under the probe deadline: a GPU that hangs here is listed Unhealthy
            # with the call named, and the loop (heartbeats, the watchdog) keeps running.
            self._inventory = await asyncio.to_thread(self._discover)
            self._model.load_inventory(self._inventory)
            self._nvml_ok, self._error = True, "; ".join(self._inventory.unreadable)
            log.info(
                "discovered %d devices (driver %s): %s",
                len(self._inventory.devices),
                self._driver,
                ", ".join(f"{d.index}={d.id}" for d in self._inventory.devices),
            )
            if self._cordon_store is not None:
                self._check_state_dir()
            self._load_cordons()
            # A first probe before the first state: it finds GPUs that are already broken and
            # sets the ECC baseline that later probes compare against.
            await self._apply_probes(await self._prober.probe_all(self._inventory.handles))
            self._refresh(force=True)
            # Probes first: a GPU that hangs in event registration must not keep the others unwatched.
            tasks.append(asyncio.create_task(self._probe_loop(), name="probes"))
            event_set = await asyncio.to_thread(self._register_events)
            self._event_thread = threading.Thread(target=self._wait_events, args=(event_set,), name="nvml-events",
                                                  daemon=True)
            self._event_thread.start()
            if self._cordon_store is not None:
                tasks.append(asyncio.create_task(self._watch_cordons(), name="cordons"))
            await run_until_stopped(stop, *tasks)
        finally:
            self._stopping.set()
            self._prober.close()
            for t in tasks:
                t.cancel()
            if self._event_thread is not None:
                # NVML must not be shut down under a thread still inside event_set_wait; waiting out
                # its slice (up to a second) made every pod termination a second longer, so the
                # shutdown is skipped instead (`nvml_busy`): the process exits, the driver cleans up.
                await asyncio.to_thread(self._event_thread.join, 0.1)

    def _discover(self) -> Inventory:
        """Discovery, with the GPUs remembered from earlier in this boot (a thread: it reads NVML and a file)."""
        return discover_remembering(self._nvml, self._clock.time(), self._prober.deadline, self._memory)

    @property
    def nvml_busy(self) -> bool:
        """A thread may still be inside an NVML call: nvmlShutdown must not run under it."""
        return self._event_thread is not None and self._event_thread.is_alive()

    # -- events -----------------------------------------------------------------------
    def _register_events(self) -> Handle:
        event_set, _ = register_events(self._nvml, self._inventory.handles, self._prober.deadline)
        return event_set

    def _wait_events(self, event_set: Handle) -> None:
        loop = self._loop
        assert loop is not None
        failures = 0
        while not self._stopping.is_set():
            self._event_call = ("NVML nvmlEventSetWait on the event thread", time.monotonic())
            try:
                event = self._nvml.event_set_wait(event_set, self._wait_slice_ms)
            except NvmlError as e:
                if e.code == NVML_ERROR_TIMEOUT:
                    continue
                event_set = self._recreate_event_set(event_set, e, failures)
                failures += 1
                continue
            except Exception as e:  # a bug must not silently end event watching
                if self._stopping.is_set():
                    return
                log.exception("NVML event thread")
                event_set = self._recreate_event_set(event_set, NvmlError(NVML_ERROR_UNKNOWN, repr(e)), failures)
                failures += 1
                continue
            finally:
                self._event_call = None
            failures = 0
            # Backpressure: an XID storm waits here (NVML keeps queueing in the driver) instead
            # of piling up unbounded work on the loop.
            while not self._pending.acquire(timeout=0.5):
                if self._stopping.is_set():
                    return
            # A plain callback, not a coroutine: no task and no future between the driver's
            # event and the bus. The event waits in the inbox: a callback that finds several
            # there (a burst) applies them all and publishes one state.
            self._inbox.append(event)
            loop.call_soon_threadsafe(self._drain_events)

    def _recreate_event_set(self, old: Handle, error: NvmlError, failures: int) -> Handle:
        loop = self._loop
        assert loop is not None
        self._event_call = None  # the failed call is over; the backoff below is no hang
        reason = f"NVML event wait failed ({error}); event set re-created, all GPUs probed"
        log.error("%s", reason)
        loop.call_soon_threadsafe(self._on_wait_failure, reason)
        self._stopping.wait(EVENT_SET_BACKOFF_S[min(failures, len(EVENT_SET_BACKOFF_S) - 1)])
        with contextlib.suppress(NvmlError):
            self._nvml.event_set_free(old)
        while not self._stopping.is_set():
            self._event_call = ("NVML event registration on the event thread", time.monotonic())
            try:
                return self._register_events()
            except NvmlError as e:
                log.error("re-creating the NVML event set failed (%s); retrying", e)
            finally:
                self._event_call = None
            self._stopping.wait(EVENT_SET_BACKOFF_S[-1])
        return old

    def _on_wait_failure(self, reason: str) -> None:
        self._pub.publish(HealthEvent(time=self._clock.time(), device="", event="nvml", reason=reason))
        self._probe_now.set()

    def _drain_events(self) -> None:
        if not self._inbox:
            return  # an earlier call took this event with its burst
        hold_logs()  # the log lines of these events are written once their state is out
        try:
            while self._inbox:
                event = self._inbox.popleft()
                try:
                    self._model.apply_event(event)
                except Exception:
                    log.exception("handling an NVML event failed")
                finally:
                    self._pending.release()
            self._refresh(force=True)
        finally:
            release_logs()

    # -- probes -----------------------------------------------------------------------
    async def _probe_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._recovery.probe_interval):
                    await self._probe_now.wait()
            self._probe_now.clear()
            await self._apply_probes(await self._prober.probe_all(self._inventory.handles))

    def stuck_calls(self) -> list[tuple[str, float]]:
        """NVML calls in progress that must not block for long: the event thread's (its wait returns
        within a third of the watchdog's limit). Stuck there, no GPU's events are seen: the watchdog
        restarts the monitor."""
        call = self._event_call
        return [call] if call is not None else []

    def hung_probes(self) -> list[str]:
        """What probe threads past their deadline are stuck in (for the watchdog's report)."""
        return self._prober.hung_probes()

    async def _apply_probes(self, results: list[Probe]) -> None:
        self._model.apply_probes(results)
        self._refresh()

    # -- cordons ----------------------------------------------------------------------
    def _load_cordons(self) -> None:
        if self._cordon_store is None:
            return
        try:
            cordons = self._cordon_store.load()
        except CordonFileError as e:
            # Fail safe: we cannot know which devices the file names (and a restarted monitor
            # has no previous cordons to keep), so every device stays out of service until the
            # file is fixed or removed. Crashing instead would take the bus and status away too.
            reason = f"cordoned: cordon file unreadable ({e}); fix or remove {self._cordon_store.path}"
            if reason != self._cordon_error:
                log.error("%s; every device is kept out of service", reason)
            self._cordon_error = self._model.cordon_error = reason
            return
        if self._cordon_error:
            log.warning("cordon file %s readable again", self._cordon_store.path)
        self._cordon_error = ""
        self._model.cordon_error = ""
        unknown = self._model.set_cordons(cordons)
        if unknown:
            log.warning("cordons name devices this node does not have: %s", ", ".join(unknown))

    def _check_state_dir(self) -> None:
        """Cordons are optional: a state dir that cannot be created or written turns them off
        (cordons already there still apply), said once in the log and on the bus."""
        assert self._cordon_store is not None
        try:
            self._cordon_store.check_writable()
        except CordonStateError as e:
            reason = f"cordons unavailable: {e}; gpu-plugin cordon is refused"
            log.error("%s", reason)
            self._degraded.append(reason)

    async def _watch_cordons(self) -> None:
        assert self._cordon_store is not None
        store_dir: Path = self._cordon_store.dir
        # Not create=True: a dir we cannot create must not end the watch (it retries instead).
        watcher = DirWatcher(store_dir)
        watcher.start()
        try:
            while True:
                names = await watcher.next(timeout=30.0)
                if not names or self._cordon_store.path.name in names or "" in names:
                    self._load_cordons()
                    self._refresh()
        finally:
            watcher.close()
