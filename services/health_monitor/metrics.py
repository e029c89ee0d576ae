"""Prometheus metrics of device health, served only when a port is configured.

Why: health must be visible beyond logs (NVIDIA plugin issue #519; HAMi's 0/1 gauge per
GPU), and monitor-only XIDs exist to be counted without taking a device away. Off by
default, so the container opens no TCP listener unless the operator asks for one.
prometheus_client is imported only then, to keep the idle process small.
"""

from __future__ import annotations

import logging
from typing import Any

from common.bus.messages import HEALTHY, DeviceState

log = logging.getLogger(__name__)


class HealthMetrics:
    def __init__(self, port: int, address: str = "0.0.0.0") -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        labels = ("device", "index", "kind")
        self._healthy = prom.Gauge("gpu_plugin_device_healthy", "1 when the device is schedulable", labels,
                                   registry=self.registry)
        self._cordoned = prom.Gauge("gpu_plugin_device_cordoned", "1 when an operator cordoned the device", labels,
                                    registry=self.registry)
        self._xids = prom.Counter("gpu_plugin_xid_errors", "XID errors seen, by policy verdict",
                                  ("device", "xid", "verdict"), registry=self.registry)
        self._ecc = prom.Counter("gpu_plugin_ecc_errors", "ECC error events", ("device", "type"),
                                 registry=self.registry)
        self._transitions = prom.Counter("gpu_plugin_health_transitions", "health changes", ("device", "to"),
                                         registry=self.registry)
        self.server: Any = prom.start_http_server(port, addr=address, registry=self.registry)

    def devices(self, devices: list[DeviceState]) -> None:
        for d in devices:
            self._healthy.labels(d.id, d.index, d.kind).set(1 if d.health == HEALTHY else 0)
            self._cordoned.labels(d.id, d.index, d.kind).set(1 if d.cordoned else 0)

    def xid(self, device: str, xid: int, verdict: str) -> None:
        self._xids.labels(device, str(xid), verdict).inc()

    def ecc(self, device: str, kind: str) -> None:
        self._ecc.labels(device, kind).inc()

    def transition(self, device: str, to: str) -> None:
        self._transitions.labels(device, to).inc()


def start_metrics(port: int, degraded: list[str]) -> HealthMetrics | None:
    """Metrics are optional: a port that cannot be bound turns them off, said once in the
    log and on the bus, instead of ending the pod (supervisord would give up on a monitor
    that fails at every start)."""
    if not port:
        return None
    try:
        return HealthMetrics(port)
    except OSError as e:
        reason = f"metrics off: cannot listen on port {port}: {e.strerror or e}"
        log.error("%s", reason)
        degraded.append(reason)
        return None
