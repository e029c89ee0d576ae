"""`gpu-feature-discovery`: NVIDIA's command, which its chart (gfd.enabled) and the GPU Operator run
from the device plugin's image to label the node with its GPUs' features.

Wiring only: settings (options.py) -> NVML (facts.py) -> labels (labels.py) -> NFD's NodeFeature
object (nodefeature.py, NVIDIA's default since v0.19) or the features.d file (output.py, with
--use-node-feature-api=false), once with --oneshot, else again every --sleep-interval. The config
file is read again before each pass, and at once on SIGHUP (NVIDIA's config-manager sidecar sends
it after switching the node's config), so a new config is labelled without a restart.

Exits as NVIDIA's: 0 after --oneshot and on SIGTERM/SIGINT/SIGQUIT (the file is then removed,
unless --oneshot: the labels leave with the daemon; the NodeFeature object is left in place, as
NVIDIA's leaves it); 1 on a bad setting, on NVML that cannot be initialised with failOnInitError
(else the labels it can make: the timestamp and the machine type), or on a pass that fails (the
object could not be written included); the cause is the last line on stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from common.files import read_text_bounded
from common.lifecycle import PermanentError, ensure_private_dir
from common.logs import configure_logging
from common.nvml.backend import NvmlBackend
from common.nvml.factory import make_backend
from common.settings import Settings, SettingsError
from services.feature_discovery import output
from services.feature_discovery.facts import FactsError, InitError, collect
from services.feature_discovery.labels import LabelError, NodeFacts, node_labels
from services.feature_discovery.options import PROG, Options, parse

if TYPE_CHECKING:
    from services.feature_discovery.nodefeature import Target

log = logging.getLogger(PROG)

MACHINE_TYPE_UNKNOWN = "unknown"
MACHINE_TYPE_MAX_BYTES = 4096  # a sysfs attribute is one page
PUBLISH_S = 60.0  # one pass's reads and writes of the NodeFeature object, all attempts together
# What a backend is made from: a change of any of these needs a new one.
_BACKEND_SETTINGS = ("nvml_backend", "simulated_devices", "driver_root", "container_driver_root", "run_dir")


class Failed(Exception):
    """A pass or a reload failed: the message is the cause, said last."""


def machine_type(path: str) -> str:
    """machine-type.go: the file's content, stripped; "unknown" when there is no file or it cannot be read."""
    if not path:
        return MACHINE_TYPE_UNKNOWN
    try:
        return read_text_bounded(path, MACHINE_TYPE_MAX_BYTES).strip()
    except (OSError, UnicodeDecodeError) as e:
        log.warning("Error getting machine type from %s: %s", path, e)
        return MACHINE_TYPE_UNKNOWN


class Discovery:
    def __init__(self, options: Options, argv: Sequence[str], environ: Mapping[str, str]) -> None:
        self.options = options
        self._argv = list(argv)
        self._environ = environ
        self._backend: NvmlBackend | None = None
        self._backend_key: tuple[object, ...] = ()
        self._wake = threading.Event()
        self._stop = False

    # -- signals ------------------------------------------------------------------------------
    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("Received signal %s, shutting down.", signal.Signals(signum).name)
        self._stop = True
        self._wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        log.info("Received SIGHUP: reading the config again and labeling now.")
        self._wake.set()

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    # -- one pass -----------------------------------------------------------------------------
    def _backend_for(self, settings: Settings) -> NvmlBackend:
        key = tuple(getattr(settings, name) for name in _BACKEND_SETTINGS)
        if self._backend is None or key != self._backend_key:
            if settings.nvml_backend != "real":
                ensure_private_dir(settings.run_dir)  # where the simulated driver takes injected faults
            self._backend, self._backend_key = make_backend(settings), key
        return self._backend

    def label_once(self) -> dict[str, str]:
        settings = self.options.settings
        facts: NodeFacts | None
        try:
            facts = collect(self._backend_for(settings))
        except InitError as e:
            if settings.fail_on_init_error:
                raise Failed(f"{e} (failOnInitError is true)") from e
            # NVIDIA's null resource manager: no device labels, and the next pass tries again.
            log.error("%s: labeling without devices (failOnInitError is false)", e)
            facts = None
        except (FactsError, PermanentError) as e:
            raise Failed(str(e)) from e
        timestamp = None if self.options.no_timestamp else int(time.time())
        try:
            labels = node_labels(facts, settings.mig_strategy, settings.sharing,
                                 machine_type(self.options.machine_type_file), timestamp)
        except LabelError as e:
            raise Failed(f"error generating labels: {e}") from e
        if len(labels) <= 1:
            log.warning("No labels generated from any source")
        if self.options.use_node_feature_api:
            self._publish(labels)
            return labels
        where = self.options.output_file or "standard output"
        try:
            output.write(self.options.output_file, labels)
        except OSError as e:
            raise Failed(f"cannot write the labels to {where}: {e}") from e
        log.info("Wrote %d labels to %s", len(labels), where)
        return labels

    def _target(self) -> Target:
        # Imported here: the file's users (and feature-labels, which shares this module) never load
        # the API client.
        from services.feature_discovery.nodefeature import Target

        o = self.options
        if not o.node_name:
            # NVIDIA's says "required flag node-name not set" before its first pass.
            raise Failed("the NodeFeature API needs the node's name: set NODE_NAME (NVIDIA's manifests set it "
                         "from spec.nodeName) or --node-name, or --use-node-feature-api=false to write the "
                         "features.d file instead")
        if not o.namespace:
            raise Failed("the NodeFeature API needs a namespace for the object: set NAMESPACE or --namespace")
        return Target(o.node_name, o.namespace)

    def _publish(self, labels: dict[str, str]) -> None:
        from common.kubeapi import READ_ERRORS, BadAnswer, default_client, reason
        from services.feature_discovery.nodefeature import hint, publish

        target = self._target()
        # The client logs every request at info: two lines a pass on every node, which say nothing
        # that the pass's own line does not.
        logging.getLogger("httpx2").setLevel(logging.WARNING)

        async def bounded() -> str:
            try:
                async with asyncio.timeout(PUBLISH_S):
                    async with default_client(self.options.kubeconfig) as http:
                        return await publish(http, target, labels)
            except TimeoutError:
                raise BadAnswer(f"no complete answer within {PUBLISH_S:.0f} s") from None

        try:
            done = asyncio.run(bounded())
        except READ_ERRORS as e:
            raise Failed(f"cannot publish the labels as {target}: {reason(e)}{hint(e, target)}") from e
        log.info("%s %s: %d labels", target, done, len(labels))

    def _reread(self) -> None:
        before = self.options
        try:
            self.options = parse(self._argv, self._environ)
        except SettingsError as e:
            raise Failed(f"unable to load config: {e}") from e
        if not before.use_node_feature_api and self.options.use_node_feature_api:
            # A new config (flags.useNodeFeatureAPI) moves the labels to the object: the file goes, as
            # NVIDIA's restart on SIGHUP removes the old config's file.
            self._remove(before)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            while True:
                self.label_once()
                if self.options.oneshot:
                    return 0
                interval = self.options.sleep_interval
                log.info("Sleeping for %s", "ever (infinite)" if interval is None else f"{interval:g}s")
                self._wake.wait(interval)
                self._wake.clear()
                if self._stop:
                    self._remove(self.options)
                    return 0
                self._reread()  # also without SIGHUP: the config-manager may have switched the file
        except Failed as e:
            if not self.options.oneshot:
                self._remove(self.options)
            return fail(str(e))

    @staticmethod
    def _remove(options: Options) -> None:
        """The file's labels leave with the daemon; the NodeFeature object stays (NVIDIA's run():
        nothing is removed with the NodeFeature API)."""
        if options.use_node_feature_api:
            return
        try:
            output.remove(options.output_file)
        except OSError as e:
            log.warning("Error removing output file: %s", e)


def fail(cause: str) -> int:
    logging.shutdown()  # every log line out first: the cause is the last line
    print(f"{PROG}: error: {cause}", file=sys.stderr, flush=True)
    return 1


def describe(options: Options) -> str:
    s = options.settings
    sharing = s.sharing.kind or "none"
    interval = "infinite" if options.sleep_interval is None else f"{options.sleep_interval:g}s"
    if options.use_node_feature_api:
        to = f"useNodeFeatureAPI=true nodeName={options.node_name or '(none)'} namespace={options.namespace}"
    else:
        to = f"useNodeFeatureAPI=false outputFile={options.output_file or '(standard output)'}"
    return (f"migStrategy={s.mig_strategy} failOnInitError={str(s.fail_on_init_error).lower()} "
            f"sharing={sharing} oneshot={str(options.oneshot).lower()} "
            f"noTimestamp={str(options.no_timestamp).lower()} sleepInterval={interval} "
            f"{to} machineTypeFile={options.machine_type_file} "
            f"config={s.config_file or '(none)'} nvml={s.nvml_backend}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse(argv, os.environ)
    except SettingsError as e:
        return fail(str(e))
    configure_logging(PROG, options.settings.log_level)
    log.info("Running with config: %s", describe(options))
    discovery = Discovery(options, argv, os.environ)
    discovery.install_signals()
    return discovery.run()


if __name__ == "__main__":
    sys.exit(main())
