"""`nvidia-device-plugin`: the command NVIDIA's chart and the GPU Operator start the container with.

It takes NVIDIA's flags and environment (the same table as `gpu-plugin <service>`), validates them
once, and then execs the image's entry point (supervisord with the three services), handing the
flags on as their environment variables: flags win over the environment, as in NVIDIA's plugin.
Nothing of this process stays: after exec the entry point is the container's process, with its
signal handling and exit status. A bad setting ends it here, status 1, with the cause as the last
line, before anything starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from common.mps import DAEMON_ENV as MPS_DAEMON_ENV
from common.mps import EXTERNAL as MPS_DAEMON_EXTERNAL
from common.settings import SPECS, SettingsError, add_arguments, resolve
from common.version import VersionAction

ENTRYPOINT = "/usr/local/bin/gpu-plugin-entrypoint"
SUPERVISORD_CONF = "/etc/gpu-plugin/supervisord.conf"
# Where the image's files are elsewhere (a source checkout, the tests).
ENTRYPOINT_ENV = "GPU_PLUGIN_ENTRYPOINT"
SUPERVISORD_CONF_ENV = "GPU_PLUGIN_SUPERVISORD_CONF"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvidia-device-plugin",
                                description="NVIDIA's command line for this plugin: validates the settings, "
                                            "then runs the stack (health-monitor, plugin-server, registrar)")
    # -v as NVIDIA's: urfave/cli gives an app with a Version the flag --version, alias -v.
    p.add_argument("--version", "-v", action=VersionAction)
    add_arguments(p)
    return p


def exec_environment(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """The services' environment: `environ` with every given flag as its setting's variable."""
    env = dict(environ)
    for spec in SPECS:
        value = getattr(args, spec.name, None)
        if value is not None and spec.env:
            env[spec.env] = str(value)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The services log what settings warn about; said here too it would appear twice.
    logging.basicConfig(level=logging.ERROR, format="nvidia-device-plugin: %(message)s")
    try:
        resolve(args)
    except SettingsError as e:
        print(f"nvidia-device-plugin: cannot start: {e}", file=sys.stderr)
        return 1
    env = exec_environment(args, dict(os.environ))
    # Only NVIDIA's chart and the GPU Operator start the image with this command (ours starts the
    # entry point), and both run mps-control-daemon beside it: our stack watches those MPS daemons
    # instead of running its own on the same pipe directories.
    env.setdefault(MPS_DAEMON_ENV, MPS_DAEMON_EXTERNAL)
    entrypoint = env.get(ENTRYPOINT_ENV) or ENTRYPOINT
    conf = env.get(SUPERVISORD_CONF_ENV) or SUPERVISORD_CONF
    try:
        os.execve(entrypoint, [entrypoint, "-c", conf], env)
    except OSError as e:
        print(f"nvidia-device-plugin: cannot start: cannot run the entry point {entrypoint}: {e.strerror}",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
