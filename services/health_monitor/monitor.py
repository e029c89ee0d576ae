"""The health monitor: the only NVML user. Discovers devices, watches driver events,
applies the health policy and publishes the node's full device state on the health bus.

Threads: NVML's event wait blocks in C (ctypes releases the GIL), so it runs in one
worker thread and hands each event to the asyncio loop, which owns all state and the
bus socket. Nothing else touches NVML after discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable

from common.bus.messages import UNHEALTHY, DeviceState, HealthEvent, HealthState
from common.bus.sockets import BusPublisher
from common.lifecycle import FatalError
from common.nvml.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    WHOLE_GPU_INSTANCE,
    EventData,
    Handle,
    NvmlBackend,
    NvmlError,
)
from services.health_monitor.discovery import Inventory, discover
from services.health_monitor.xid_policy import XidPolicy

log = logging.getLogger(__name__)

EVENT_MASK = EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC
WAIT_SLICE_MS = 1000  # bounds how long the event thread takes to notice shutdown
INIT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class NvmlInitError(FatalError):
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nvml = backend
        self._pub = publisher
        self._policy = policy
        self._fail_on_init_error = fail_on_init_error
        self._clock = clock
        self._incarnation = uuidlib.uuid4().hex[:12]
        self._seq = 0
        self._devices: dict[str, DeviceState] = {}
        self._inventory = Inventory()
        self._nvml_ok = False
        self._error = "starting"
        self._driver = ""
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sbe_counts: dict[str, int] = {}

    # -- state ------------------------------------------------------------------------
    def devices(self) -> list[DeviceState]:
        return list(self._devices.values())

    async def _publish_state(self) -> None:
        self._seq += 1
        await self._pub.publish(
            HealthState(
                incarnation=self._incarnation,
                seq=self._seq,
                sent_at=self._clock(),
                nvml_ok=self._nvml_ok,
                error=self._error,
                driver_version=self._driver,
                devices=list(self._devices.values()),
            )
        )

    async def _set_health(self, targets: list[str], health: str, reason: str) -> None:
        changed = False
        now = self._clock()
        for dev_id in targets:
            old = self._devices.get(dev_id)
            if old is None or old.health == health:
                continue
            self._devices[dev_id] = dataclasses.replace(old, health=health, reason=reason, since=now)
            changed = True
            log.warning("device %s: %s -> %s (%s)", dev_id, old.health, health, reason)
            await self._pub.publish(
                HealthEvent(time=now, device=dev_id, event="transition", old=old.health, new=health, reason=reason)
            )
        if changed:
            await self._publish_state()

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
            await self._pub.publish(HealthEvent(time=self._clock(), device="", event="nvml", reason=self._error))
            await self._publish_state()
            if self._fail_on_init_error:
                raise NvmlInitError(self._error)
            delay = INIT_BACKOFF_S[min(attempt, len(INIT_BACKOFF_S) - 1)]
            attempt += 1
            log.info("failOnInitError=false: advertising no devices, retrying NVML in %.0f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        return False

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        beat = asyncio.create_task(self._pub.run(), name="bus-heartbeat")
        try:
            if not await self._init_nvml(stop):
                return
            self._driver = self._nvml.system_get_driver_version()
            self._inventory = discover(self._nvml, self._clock())
            self._devices = {d.id: d for d in self._inventory.devices}
            self._nvml_ok, self._error = True, ""
            log.info(
                "discovered %d devices (driver %s): %s",
                len(self._devices),
                self._driver,
                ", ".join(f"{d.index}={d.id}" for d in self._devices.values()),
            )
            event_set = self._register_events()
            await self._publish_state()
            waiter = threading.Thread(target=self._wait_events, args=(event_set,), name="nvml-events", daemon=True)
            waiter.start()
            await stop.wait()
        finally:
            self._stopping.set()
            beat.cancel()

    def _register_events(self) -> Handle:
        event_set = self._nvml.event_set_create()
        for gpu_uuid, handle in self._inventory.handles.items():
            try:
                supported = self._nvml.device_get_supported_event_types(handle)
                self._nvml.device_register_events(handle, EVENT_MASK & supported, event_set)
            except NvmlError as e:
                if e.code != NVML_ERROR_NOT_SUPPORTED:
                    raise
                # As NVIDIA's plugin: not a fault of the GPU; it stays healthy.
                log.warning("GPU %s: event registration not supported; device stays healthy", gpu_uuid)
        return event_set

    # -- events -----------------------------------------------------------------------
    def _wait_events(self, event_set: Handle) -> None:
        loop = self._loop
        assert loop is not None
        while not self._stopping.is_set():
            try:
                event = self._nvml.event_set_wait(event_set, WAIT_SLICE_MS)
            except NvmlError as e:
                if e.code == NVML_ERROR_TIMEOUT:
                    continue
                log.error("NVML event wait failed: %s", e)
                self._stopping.wait(1.0)
                continue
            asyncio.run_coroutine_threadsafe(self._on_event(event), loop)

    def _targets(self, event: EventData) -> list[str]:
        """The devices an event on a physical GPU (or one of its instances) reaches."""
        if event.uuid is None:
            return list(self._devices)  # NVIDIA's rule: an event naming no device hits all
        gpu_uuid = event.uuid
        dev = self._devices.get(gpu_uuid)
        if dev is not None and dev.kind == "mig":
            gpu_uuid = dev.parent
        children = self._inventory.children.get(gpu_uuid, [])
        if event.gpu_instance_id == WHOLE_GPU_INSTANCE:
            return [gpu_uuid, *children]
        hit = [
            c
            for c in children
            if self._devices[c].gpu_instance_id == event.gpu_instance_id
            and event.compute_instance_id in (WHOLE_GPU_INSTANCE, self._devices[c].compute_instance_id)
        ]
        return hit or [gpu_uuid, *children]

    async def _on_event(self, event: EventData) -> None:
        now = self._clock()
        targets = self._targets(event)
        if event.event_type & EVENT_XID_CRITICAL:
            xid = event.event_data
            fatal = self._policy.is_fatal(xid)
            log.warning(
                "XID %d on %s (gi %d, ci %d): %s",
                xid, event.uuid, event.gpu_instance_id, event.compute_instance_id,
                "marking unhealthy" if fatal else "ignored by policy",
            )
            await self._pub.publish(
                HealthEvent(time=now, device=event.uuid or "", event="xid", xid=xid,
                            reason="fatal" if fatal else "ignored")
            )
            if fatal:
                await self._set_health(targets, UNHEALTHY, f"XID {xid}")
        elif event.event_type & EVENT_DOUBLE_BIT_ECC:
            await self._pub.publish(HealthEvent(time=now, device=event.uuid or "", event="ecc", reason="ECC DBE"))
            if self._policy.checks_enabled:
                await self._set_health(targets, UNHEALTHY, "ECC DBE")
        elif event.event_type & EVENT_SINGLE_BIT_ECC:
            key = event.uuid or ""
            self.sbe_counts[key] = self.sbe_counts.get(key, 0) + 1
            await self._pub.publish(HealthEvent(time=now, device=key, event="ecc", reason="ECC SBE"))
