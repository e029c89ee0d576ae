"""Which config a node runs, as NVIDIA's config-manager decides it; writing it where the services read it.

The ConfigMap mounted at CONFIG_FILE_SRCDIR holds named configs (one file per key). The node label
(`nvidia.com/device-plugin.config` by default) names one; without the label, DEFAULT_CONFIG does;
without either, the FALLBACK_STRATEGIES in order: `named` (a config called "default"), `single`
(the only config), `empty` (an empty v1 config: the defaults). A label naming no config is
reported, not fatal: a running node keeps its config; a node with none yet (the init container)
takes what the label-less rules select, so that it comes up.

Pure functions of their inputs (names, label, environment) and a file write: the kube-agent, the
config-manager's init container and its sidecar are this code.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.files import read_text_bounded, replace_file
from common.settings import SettingsError, resolve
from common.settings.values import MAX_CONFIG_BYTES

log = logging.getLogger(__name__)

# NVIDIA's environment interface (config-manager); the kube-agent reads the same variables.
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

DEFAULT_LABEL = "nvidia.com/device-plugin.config"  # NVIDIA's
STRATEGIES = ("named", "single", "empty")
DEFAULT_STRATEGIES = "named,single"  # NVIDIA's default
EMPTY_CONFIG = "version: v1\n"


class SelectionError(Exception):
    """Nothing can be selected, or the selected config is invalid; the message says why."""


@dataclass(frozen=True)
class Rules:
    """The selection settings, from NVIDIA's environment variables."""

    srcdir: Path
    default: str = ""
    strategies: tuple[str, ...] = ("named", "single")
    label: str = DEFAULT_LABEL

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Rules:
        if not environ.get(SRCDIR):
            raise SelectionError(f"{SRCDIR} is not set (the directory of the available configs)")
        strategies = tuple(s.strip() for s in (environ.get(FALLBACK_STRATEGIES) or DEFAULT_STRATEGIES).split(",")
                           if s.strip())
        for s in strategies:
            if s not in STRATEGIES:
                raise SelectionError(f"{FALLBACK_STRATEGIES}: unknown strategy {s!r}; allowed: {', '.join(STRATEGIES)}")
        return cls(Path(environ[SRCDIR]), environ.get(DEFAULT_CONFIG, ""), strategies,
                   environ.get(NODE_LABEL) or DEFAULT_LABEL)


@dataclass(frozen=True)
class Selection:
    name: str | None  # None: the empty config
    why: str
    unknown: str = ""  # a label value naming no config (reported; the selection ignores it)


# The entries left out at the last look, per directory: each is logged when it first goes bad, not
# at every selection (a ConfigMap's keys are few; the set is what the directory holds now).
_left_out: dict[Path, set[str]] = {}


def available(srcdir: Path) -> list[str]:
    """Config names in a mounted ConfigMap: its keys, without the `..data` bookkeeping entries.

    An entry that cannot be looked at (a symlink loop, one it may not read) is left out and
    logged, naming it: it used to fail the whole listing, so that no config, however valid, could
    be selected while it was there.
    """
    names: list[str] = []
    bad: dict[str, str] = {}
    try:
        with os.scandir(srcdir) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    if e.is_file():  # follows the key's symlink into ..data, as the kubelet lays it out
                        names.append(e.name)
                except OSError as err:
                    bad[e.name] = err.strerror or type(err).__name__
    except OSError as e:
        raise SelectionError(f"{SRCDIR} {srcdir}: {e.strerror}") from e
    before = _left_out.get(srcdir, set())
    for name in sorted(bad.keys() - before):
        log.warning("config %r in %s left out: %s", name, srcdir, bad[name])
    _left_out[srcdir] = set(bad)
    return sorted(names)


def select(rules: Rules, names: list[str], label_value: str | None) -> Selection:
    """The config for a node whose label has `label_value` (None: no label), as NVIDIA's config-manager."""
    unknown = ""
    if label_value:
        if label_value in names:
            return Selection(label_value, f"node label {rules.label}={label_value}")
        unknown = label_value
    if rules.default:
        if rules.default not in names:
            raise SelectionError(f"{DEFAULT_CONFIG}={rules.default}: no such config in {rules.srcdir} "
                                 f"(available: {', '.join(names) or 'none'})")
        return Selection(rules.default, DEFAULT_CONFIG, unknown)
    for s in rules.strategies:
        if s == "named" and "default" in names:
            return Selection("default", "fallback strategy named", unknown)
        if s == "single" and len(names) == 1:
            return Selection(names[0], "fallback strategy single", unknown)
        if s == "empty":
            return Selection(None, "fallback strategy empty", unknown)
    raise SelectionError(f"no config selected: {DEFAULT_CONFIG} is empty and the fallback strategies "
                         f"{','.join(rules.strategies)} match none of {', '.join(names) or 'no configs'} "
                         f"in {rules.srcdir}")


def content(rules: Rules, name: str | None) -> str:
    """The selected config's text, validated as the services will read it (a bad one fails here)."""
    if name is None:
        return EMPTY_CONFIG
    src = rules.srcdir / name
    try:
        resolve(environ={"CONFIG_FILE": str(src)})
    except SettingsError as e:
        raise SelectionError(f"config {name}: {e}") from e
    try:
        # A ConfigMap key is a symlink into ..data: followed, and the file it names read with bounds.
        return read_text_bounded(src, MAX_CONFIG_BYTES)
    except (OSError, UnicodeDecodeError) as e:
        raise SelectionError(f"config {name}: {e}") from e


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_atomically(dst: Path, text: str) -> bool:
    """Replaces `dst` by rename (a reader never sees half a file); False when it already holds `text`,
    so that an unchanged selection costs the services nothing."""
    try:
        # Read with bounds, as any file others can replace: a FIFO or a huge file there is replaced, not read.
        if read_text_bounded(dst, MAX_CONFIG_BYTES) == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    replace_file(dst, text.encode(), 0o644)
    return True
