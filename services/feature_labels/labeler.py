"""NVIDIA's gpu-feature-discovery labels from the health bus, written when they change.

NVIDIA's GFD is a pod of its own with its own NVML user, asking the driver every pass. Here the
health-monitor already asked, once at discovery, everything the labels need (common.bus.messages:
the feature facts), so the labels are `services.feature_discovery.labels.node_labels` over the bus
state: no second NVML user, and the labels follow the devices, their health and the config
(sharing, MIG strategy) as soon as they change, where NVIDIA's waits for its next pass (60 s).

The file is written only when a label changes (a heartbeat, re-sent every few seconds, changes nothing):
the NFD worker rereads it on its own schedule, and a rewrite per second would only churn the disk.
`nvidia.com/gfd.timestamp` is then the time of the last change. On top of NVIDIA's labels:
`nvidia.com/gpu.unhealthy.count`, the full GPUs the health-monitor reports Unhealthy (MIG devices
are not counted: an XID that fells a GPU marks the GPU itself), so that a scheduler or an operator
can select or alert on nodes with a broken GPU.

When the labels cannot be made (NVIDIA's labeler would fail: an unparsable driver version, MPS on
a MIG-enabled GPU, a fact the driver refused or an older monitor did not publish) the file is
removed, as NVIDIA's does after a failed pass: labels describe every GPU or none. The program
keeps running and labels again with the next state or config that can be labelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.bus.messages import UNHEALTHY, HealthState
from common.bus.sockets import BusSubscriber
from common.lifecycle import run_until_stopped
from common.settings import Settings, SettingsError
from common.settings.values import boolean, string
from services.feature_discovery import output
from services.feature_discovery.labels import LabelError, NodeFacts, facts_of, node_labels
from services.feature_discovery.options import DEFAULT_MACHINE_TYPE_FILE, DEFAULT_OUTPUT_FILE

log = logging.getLogger(__name__)

UNHEALTHY_COUNT = "nvidia.com/gpu.unhealthy.count"
TIMESTAMP = "nvidia.com/gfd.timestamp"
WAIT_S = 1.0  # the loop's turn while the bus is silent: the watchdog sees it answer


@dataclass(frozen=True)
class Options:
    """NVIDIA's GFD environment variables that mean the same here (its flags are its command's)."""

    output_file: str
    machine_type_file: str
    no_timestamp: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Options:
        """Raises SettingsError naming the variable."""
        out = string(environ.get("GFD_OUTPUT_FILE", DEFAULT_OUTPUT_FILE), "output-file (environment GFD_OUTPUT_FILE)")
        if not out:
            # NVIDIA's "" is standard output: here that is the pod's log, not a place for labels.
            raise SettingsError("output-file (environment GFD_OUTPUT_FILE): must name the features.d file "
                                "(standard output is the log here)")
        machine = string(environ.get("GFD_MACHINE_TYPE_FILE", DEFAULT_MACHINE_TYPE_FILE),
                         "machine-type-file (environment GFD_MACHINE_TYPE_FILE)")
        no_ts = boolean(environ.get("GFD_NO_TIMESTAMP", "false"), "no-timestamp (environment GFD_NO_TIMESTAMP)")
        return cls(output_file=out, machine_type_file=machine, no_timestamp=no_ts)


def node_facts(state: HealthState) -> NodeFacts | None:
    """The labels' input from a health state; None where NVML could not be used (NVIDIA's null
    resource manager: no device labels). Raises LabelError where the state cannot describe the node."""
    if not state.nvml_ok:
        return None
    return facts_of(state.driver_version, state.cuda_driver_version, state.devices)


def labels_of(state: HealthState, settings: Settings, machine: str) -> dict[str, str]:
    """Every label but the timestamp. Raises LabelError."""
    labels = node_labels(node_facts(state), settings.mig_strategy, settings.sharing, machine, None)
    if state.nvml_ok:
        unhealthy = sum(1 for d in state.devices if d.kind == "gpu" and d.health == UNHEALTHY)
        labels[UNHEALTHY_COUNT] = str(unhealthy)
    return dict(sorted(labels.items()))


class FeatureLabels:
    def __init__(self, settings: Settings, options: Options, machine: str, health_bus: Path) -> None:
        self.settings = settings
        self.options = options
        self._machine = machine
        self._sub = BusSubscriber([health_bus], topics=[HealthState.TOPIC])
        self._state: HealthState | None = None
        self._written: dict[str, str] | None = None  # the labels in the file (timestamp aside); None: no file
        self._failed = ""  # the last failure said, so that a state per second does not say it again

    async def apply_settings(self, settings: Settings) -> None:
        """A config reload (sharing, MIG strategy): labelled at once."""
        self.settings = settings
        self._update()

    def _update(self) -> None:
        if self._state is None:
            return  # nothing known of the node yet: no file rather than a guess
        try:
            labels = labels_of(self._state, self.settings, self._machine)
        except LabelError as e:
            self._fail(f"error generating labels: {e}")
            return
        if labels == self._written:
            return
        stamped = dict(labels)
        if not self.options.no_timestamp:
            stamped[TIMESTAMP] = str(int(time.time()))
        try:
            output.write(self.options.output_file, dict(sorted(stamped.items())))
        except OSError as e:
            self._fail(f"cannot write the labels to {self.options.output_file}: {e}")
            return
        self._written, self._failed = labels, ""
        log.info("wrote %d labels to %s (%s=%s)", len(stamped), self.options.output_file, UNHEALTHY_COUNT,
                 labels.get(UNHEALTHY_COUNT, "-"))

    def _fail(self, why: str) -> None:
        if why != self._failed:
            log.error("%s: the labels file is removed until they can be made", why)
        self._failed = why
        self._remove()

    def _remove(self) -> None:
        self._written = None
        try:
            output.remove(self.options.output_file)
        except OSError as e:
            log.warning("cannot remove %s: %s", self.options.output_file, e)

    async def _follow(self) -> None:
        while True:
            msg = await self._sub.recv_timeout(WAIT_S)
            # A heartbeat is the same state (incarnation and seq) sent again: nothing to label.
            if isinstance(msg, HealthState) and msg.is_new(self._state):
                self._state = msg
                self._update()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await run_until_stopped(stop, asyncio.create_task(self._follow(), name="health-bus"))
        finally:
            self._sub.close()
        # Stopped (SIGTERM): the labels leave with the program, as NVIDIA's GFD removes its file.
        log.info("stopping: removing %s", self.options.output_file)
        self._remove()

