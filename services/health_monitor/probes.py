"""Probes: every GPU asked, each in a thread of its own, under a deadline.

A probe is five NVML queries: does the GPU still answer, is a row remap or page retirement
pending, what does the driver advise, how many double-bit errors so far. An NVML call on a
wedged GPU can block for good instead of failing, and nothing can interrupt a call blocked in
the driver: so each GPU's probe runs in its own daemon thread (never the loop's shared
executor, whose workers stuck calls would use up), a GPU whose probe is still running past the
deadline gets a "hung" finding naming the call, no second probe of that GPU starts while the
first is stuck, and when the call returns at last the GPU is probed again at once.

Each GPU's thread is kept from one probe to the next (`ProbeThread`), waiting for the next one:
a thread started per probe cost every round a clone per GPU, and the loop a wake-up per GPU
(Thread.start waits until the new thread runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.nvml.backend import MEMORY_ERROR_UNCORRECTED, NVML_ERROR_GPU_IS_LOST, Handle, NvmlBackend, NvmlError
from services.health_monitor.model import Probe

log = logging.getLogger(__name__)


@dataclass
class RunningProbe:
    """A probe thread not yet done: `probe.call` says where it is."""

    probe: Probe
    started: float  # monotonic
    future: asyncio.Future[Probe]


class ProbeThread:
    """One GPU's probe thread: runs the probes handed to it, one at a time, and waits in between."""

    def __init__(self, name: str) -> None:
        self._ready = threading.Condition()  # held only to hand over, never while a probe runs
        self._job: Callable[[], None] | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Hands `job` over (the previous one is done: Prober starts no probe of a GPU whose probe runs)."""
        with self._ready:
            self._job = job
            self._ready.notify()

    def close(self) -> None:
        """The thread ends once idle (a probe in progress is finished first)."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while self._job is None and not self._closed:
                    self._ready.wait()
                if self._job is None:
                    return
                job, self._job = self._job, None
            job()


class Prober:
    def __init__(self, nvml: NvmlBackend, deadline: float, again: Callable[[], None]) -> None:
        self._nvml = nvml
        self._probe_deadline = self.deadline = deadline
        self._again = again  # asks for another round at once (a stuck probe answered at last)
        self._probing: dict[str, RunningProbe] = {}  # GPU -> its probe thread, until it answers
        self._threads: dict[str, ProbeThread] = {}  # GPU -> its thread, between probes too

    async def probe_all(self, handles: dict[str, Handle]) -> list[Probe]:
        """Probes every GPU, each in its own thread, waiting at most the deadline for any of them.

        A GPU whose probe is still running past the deadline gets a "hung" finding naming the
        call; its thread is left to finish (nothing can interrupt a call blocked in the driver)
        and no other probe of that GPU starts meanwhile."""
        for gpu, handle in handles.items():
            if gpu not in self._probing:
                self._probing[gpu] = self._start_probe(gpu, handle)
        for gpu in [g for g in self._threads if g not in handles and g not in self._probing]:
            self._threads.pop(gpu).close()  # a GPU no longer listed: its idle thread ends
        now = time.monotonic()
        fresh = [r for r in self._probing.values() if now - r.started < self._probe_deadline]
        if fresh:
            wait = max(r.started for r in fresh) + self._probe_deadline - now
            await asyncio.wait([r.future for r in fresh], timeout=wait)
        now = time.monotonic()
        results = []
        for gpu, running in list(self._probing.items()):
            if running.future.done():
                del self._probing[gpu]
                results.append(running.future.result())
            else:
                call = running.probe.call or "call"
                hung = f"NVML {call} hung for {now - running.started:.0f} s"
                results.append(Probe(gpu, faults={"hung": hung}))
        return results

    def _start_probe(self, gpu: str, handle: Handle) -> RunningProbe:
        loop = asyncio.get_running_loop()
        running = RunningProbe(Probe(gpu), time.monotonic(), loop.create_future())

        def deliver(result: Probe) -> None:
            if not running.future.done():
                running.future.set_result(result)
            # A probe that outlived the deadline answered at last: look at that GPU again now.
            if time.monotonic() - running.started >= self._probe_deadline:
                self._again()

        def work() -> None:
            try:
                result = probe_gpu(self._nvml, gpu, handle, running.probe)
            except Exception as e:  # a bug must not leave the GPU looking hung forever
                log.exception("probe of %s", gpu)
                result = Probe(gpu, faults={"probe": f"probe failed: {e!r}"})
            with contextlib.suppress(RuntimeError):  # the loop is gone: the monitor is stopping
                loop.call_soon_threadsafe(deliver, result)

        # A thread per GPU rather than the loop's default executor: a call that never returns
        # would hold an executor worker for good, and enough of them would starve every to_thread.
        thread = self._threads.get(gpu)
        if thread is None:
            thread = self._threads[gpu] = ProbeThread(f"nvml-probe-{gpu[:12]}")
        thread.submit(work)
        return running

    def close(self) -> None:
        """Every GPU's thread ends once idle (one stuck in a call ends if the call returns)."""
        for thread in self._threads.values():
            thread.close()
        self._threads.clear()

    def hung_probes(self) -> list[str]:
        """What the probe threads past their deadline are stuck in (for the watchdog's report).
        Read from another thread: a snapshot, tolerant of the loop changing the dict meanwhile."""
        now = time.monotonic()
        try:
            running = list(self._probing.items())
        except RuntimeError:
            return []
        return [f"NVML {r.probe.call or 'call'} on {gpu} for {now - r.started:.0f} s"
                for gpu, r in running if now - r.started >= self._probe_deadline]



def probe_gpu(nvml: NvmlBackend, gpu: str, handle: Handle, result: Probe | None = None) -> Probe:
    """One probe of one GPU: does it answer, and does it need a reset? Blocking NVML calls.

    `result.call` names each call while it runs, so that a caller can say which one hangs."""
    result = result or Probe(gpu)

    def call(name: str, fn: Callable[[], object]) -> object:
        result.call = name
        return fn()

    def optional(name: str, fn: Callable[[], object]) -> object | None:
        """A query the GPU or driver may not answer (NOT_SUPPORTED, an older driver's INVALID_ARGUMENT
        for a newer field, NO_PERMISSION in a vGPU guest): unknown then. Only GPU_IS_LOST counts."""
        try:
            return call(name, fn)
        except NvmlError as e:
            if e.code == NVML_ERROR_GPU_IS_LOST:
                raise
            return None

    try:
        call("nvmlDeviceGetPciInfo", lambda: nvml.device_get_pci_info(handle))  # does the GPU still answer?
        rows = optional("nvmlDeviceGetRemappedRows", lambda: nvml.device_get_remapped_rows(handle))
        if isinstance(rows, tuple):
            _corr, _unc, pending, failed = rows
            if failed:
                result.faults["remap"] = "row-remap failure"
            elif pending:
                result.faults["remap"] = "row remap pending (GPU reset needed)"
        if optional("nvmlDeviceGetRetiredPagesPendingStatus",
                    lambda: nvml.device_get_retired_pages_pending_status(handle)):
            result.faults["retired"] = "retired pages pending (GPU reset needed)"
        action = optional("nvmlDeviceGetFieldValues", lambda: nvml.device_get_recovery_action(handle))
        result.recovery_action = action if isinstance(action, int) else None
        dbe = optional("nvmlDeviceGetTotalEccErrors",
                       lambda: nvml.device_get_total_ecc_errors(handle, MEMORY_ERROR_UNCORRECTED))
        result.dbe_total = dbe if isinstance(dbe, int) else None
    except NvmlError as e:
        if e.code == NVML_ERROR_GPU_IS_LOST:
            result.faults["lost"] = "GPU lost"
        else:
            result.faults["probe"] = f"probe failed: {e}"
    result.call = ""
    return result
