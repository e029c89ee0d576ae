"""`config-manager`: NVIDIA's config-manager interface, reduced to what is served without API access.

NVIDIA's chart and the GPU Operator run it as an init container (ONESHOT=true) that copies one of
the configs in CONFIG_FILE_SRCDIR (a mounted ConfigMap) to CONFIG_FILE_DST, where the plugin reads
it (CONFIG_FILE), and as a sidecar (ONESHOT=false) that follows the node label NODE_LABEL and sends
SIGNAL to PROCESS_TO_SIGNAL after each change.

Served: the one-shot selection, in NVIDIA's order after the label: DEFAULT_CONFIG, then
FALLBACK_STRATEGIES (named: a config called "default"; single: the only config; empty: an empty v1
config). The selected file is validated as the plugin would (a bad config fails here, naming it).
Not served yet (said on the log, never silently): reading the node label (no API access:
per-node configuration is to come), and so the sidecar's following and signalling; with
ONESHOT=false it selects once and then idles in sh (~1 MB) so that the pod stays up.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.settings import SettingsError, resolve

# NVIDIA's environment interface; a test checks the charts set no variable outside it.
ONESHOT = "ONESHOT"
NODE_NAME = "NODE_NAME"
NODE_LABEL = "NODE_LABEL"
SRCDIR = "CONFIG_FILE_SRCDIR"
DST = "CONFIG_FILE_DST"
DEFAULT_CONFIG = "DEFAULT_CONFIG"
FALLBACK_STRATEGIES = "FALLBACK_STRATEGIES"
SEND_SIGNAL = "SEND_SIGNAL"
SIGNAL = "SIGNAL"
PROCESS_TO_SIGNAL = "PROCESS_TO_SIGNAL"
KUBECONFIG = "KUBECONFIG"
ENV = (ONESHOT, NODE_NAME, NODE_LABEL, SRCDIR, DST, DEFAULT_CONFIG, FALLBACK_STRATEGIES, SEND_SIGNAL, SIGNAL,
       PROCESS_TO_SIGNAL, KUBECONFIG)

STRATEGIES = ("named", "single", "empty")
DEFAULT_STRATEGIES = "named,single"  # NVIDIA's default
EMPTY_CONFIG = "version: v1\n"
# Sleeps in the background so that TERM is handled at once, not after the sleep.
IDLE = 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'

log = logging.getLogger("config-manager")


class ConfigManagerError(Exception):
    pass


def _bool(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "false", "0", "no"):
        return False
    if raw in ("true", "1", "yes"):
        return True
    raise ConfigManagerError(f"{name}={environ[name]!r}: expected true or false")


def available(srcdir: Path) -> list[str]:
    """Config names in a mounted ConfigMap: its keys, without the `..data` bookkeeping entries."""
    try:
        return sorted(e.name for e in os.scandir(srcdir) if not e.name.startswith(".") and e.is_file())
    except OSError as e:
        raise ConfigManagerError(f"{SRCDIR} {srcdir}: {e.strerror}") from e


def select(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(config name or None for an empty config, why it was chosen)."""
    srcdir = Path(environ.get(SRCDIR) or "")
    if not environ.get(SRCDIR):
        raise ConfigManagerError(f"{SRCDIR} is not set (the directory of the available configs)")
    names = available(srcdir)
    default = environ.get(DEFAULT_CONFIG, "")
    if default:
        if default not in names:
            raise ConfigManagerError(f"{DEFAULT_CONFIG}={default}: no such config in {srcdir} "
                                     f"(available: {', '.join(names) or 'none'})")
        return default, f"{DEFAULT_CONFIG}"
    strategies = [s.strip() for s in (environ.get(FALLBACK_STRATEGIES) or DEFAULT_STRATEGIES).split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigManagerError(f"{FALLBACK_STRATEGIES}: unknown strategy {s!r}; allowed: {', '.join(STRATEGIES)}")
    for s in strategies:
        if s == "named" and "default" in names:
            return "default", "fallback strategy named"
        if s == "single" and len(names) == 1:
            return names[0], "fallback strategy single"
        if s == "empty":
            return None, "fallback strategy empty"
    raise ConfigManagerError(f"no config selected: {DEFAULT_CONFIG} is empty and the fallback strategies "
                             f"{','.join(strategies)} match none of {', '.join(names) or 'no configs'} in {srcdir}")


def write(environ: Mapping[str, str], name: str | None) -> Path:
    if not environ.get(DST):
        raise ConfigManagerError(f"{DST} is not set (where the plugin reads its config)")
    dst = Path(environ[DST])
    if name is None:
        text = EMPTY_CONFIG
    else:
        src = Path(environ[SRCDIR]) / name
        # Validated as the plugin will read it, so that a bad config fails here, naming itself.
        try:
            resolve(environ={"CONFIG_FILE": str(src)})
        except SettingsError as e:
            raise ConfigManagerError(f"config {name}: {e}") from e
        text = src.read_text()
    # Atomic: a plugin starting beside a sidecar must never read half a file.
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def run(environ: Mapping[str, str]) -> int:
    oneshot = _bool(environ, ONESHOT)
    send_signal = _bool(environ, SEND_SIGNAL)
    label = environ.get(NODE_LABEL, "")
    if label:
        log.warning("node label %s of node %s is not read: per-node configuration is not served yet "
                    "(no API access); choosing from %s and %s", label, environ.get(NODE_NAME, "?"),
                    DEFAULT_CONFIG, FALLBACK_STRATEGIES)
    if environ.get(KUBECONFIG):
        log.warning("%s is set but not used: the API server is not read", KUBECONFIG)
    name, why = select(environ)
    dst = write(environ, name)
    log.info("wrote %s to %s (%s)", name or "an empty v1 config", dst, why)
    if oneshot:
        return 0
    if send_signal:
        log.warning("%s=true: %s is not sent to %s: without label changes there is nothing to reload",
                    SEND_SIGNAL, environ.get(SIGNAL, "?"), environ.get(PROCESS_TO_SIGNAL, "?"))
    log.info("ONESHOT=false: idling (following the node label is not served yet)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv("/bin/sh", ["/bin/sh", "-c", IDLE])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(f"config-manager: error: arguments {args} are not accepted; the interface is the environment "
              f"({', '.join(ENV)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="config-manager: %(message)s", stream=sys.stderr)
    try:
        return run(os.environ)
    except (ConfigManagerError, OSError) as e:
        print(f"config-manager: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
