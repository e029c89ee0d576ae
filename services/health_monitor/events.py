"""Driver events: the event set of every GPU's XID and ECC events, registered per GPU."""

from __future__ import annotations

import functools
import logging

from common.nvml.backend import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID_CRITICAL,
    Handle,
    NvmlBackend,
    NvmlError,
)
from services.health_monitor.deadline import each_within

log = logging.getLogger(__name__)

EVENT_MASK = EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC


def register_events(nvml: NvmlBackend, handles: dict[str, Handle],
                    deadline: float | None = None) -> tuple[Handle, dict[str, str]]:
    """A new event set with XID and ECC events of every GPU that supports them.

    Returns the set and, per GPU, "" or why registration failed. NOT_SUPPORTED (and a GPU
    already lost) is not a fault of the event channel: the GPU stays healthy, and probes
    watch it, as NVIDIA's plugin leaves such a GPU alone. With a `deadline`, each GPU registers
    in a thread of its own: one whose call hangs (a wedged GPU) is left behind after that many
    seconds, so that the other GPUs' events are watched; its probes say it is hung.
    """
    event_set = nvml.event_set_create()
    outcome: dict[str, str] = {}

    def register(gpu_uuid: str, handle: Handle) -> None:
        try:
            supported = nvml.device_get_supported_event_types(handle)
            nvml.device_register_events(handle, EVENT_MASK & supported, event_set)
            outcome[gpu_uuid] = ""
        except NvmlError as e:
            # Not a fault of the GPU (NOT_SUPPORTED), or one the probes will report (lost, ...):
            # the GPU is watched by probes instead of events.
            outcome[gpu_uuid] = str(e)
            log.warning("GPU %s: event registration failed (%s); relying on probes", gpu_uuid, e)

    each_within([(f"nvml-register-{gpu[:12]}", functools.partial(register, gpu, handle))
                 for gpu, handle in handles.items()], deadline)
    for gpu_uuid in handles:
        if gpu_uuid not in outcome:
            outcome[gpu_uuid] = f"nvmlDeviceRegisterEvents hung for {deadline:g} s"
            log.error("GPU %s: event registration hung; relying on probes (they will say it hangs)", gpu_uuid)
    return event_set, outcome
