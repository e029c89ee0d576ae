"""feature-labels: wiring only. Off unless GPU_PLUGIN_FEATURE_LABELS is true (the chart's gfd.enabled):
supervisord's sh says so and exits 0 before Python starts; this check is for a direct start."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from common.logs import configure_logging
from common.settings import Settings, SettingsError
from common.settings.values import boolean
from services.feature_labels import GATE

if TYPE_CHECKING:
    import asyncio

SERVICE = "feature-labels"
# What a config reload changes in a running feature-labels (the labels follow them at once).
LIVE = frozenset({"sharing", "mig_strategy"})
RESTART = frozenset({"run_dir"})


async def main(settings: Settings, stop: asyncio.Event) -> None:
    from common.bus.messages import HEALTH_SOCKET
    from common.lifecycle import PermanentError
    from common.reload import Reloader
    from services.feature_discovery.cli import machine_type
    from services.feature_labels.labeler import FeatureLabels, Options

    try:
        options = Options.from_env(os.environ)
    except SettingsError as e:
        raise PermanentError(f"{SERVICE}: {e}") from e
    # The DMI product name does not change while the node runs: read once.
    labels = FeatureLabels(settings, options, machine_type(options.machine_type_file), settings.bus_path(HEALTH_SOCKET))
    reloader = Reloader.current()
    if reloader is not None:
        reloader.serve(LIVE, RESTART, labels.apply_settings)
    await labels.run(stop)


def run(settings: Settings) -> int:
    try:
        on = boolean(os.environ.get(GATE) or "false", f"environment {GATE}")  # empty: unset, as sh's ${X:-false}
    except SettingsError as e:
        from common.lifecycle import bad_setting

        return bad_setting(SERVICE, e)
    if not on:
        configure_logging(SERVICE, settings.log_level)
        print(f"gpu-plugin {SERVICE}: feature labels are off ({GATE} is not true): nothing to do", file=sys.stderr,
              flush=True)
        return 0
    from common.lifecycle import run_service
    from common.restarts import paced
    from common.watchdog import watched

    return run_service(SERVICE, watched(SERVICE, paced(SERVICE, main)), settings)


if __name__ == "__main__":
    from common.lifecycle import service_entry

    sys.exit(service_entry(SERVICE, run, sys.argv[1:]))
