"""The v1 config file: read with bounds (size, UTF-8, depth, no YAML aliases), checked for
shape (a known section must be a mapping), unknown keys warned about (in our own strict
sections, refused)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from common.files import read_bounded
from common.settings.values import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, SettingsError, show

log = logging.getLogger(__name__)


def lookup(tree: Mapping[str, Any], key: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = tree
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


class _ConfigInputError(Exception):
    """Raised inside the YAML loader; becomes a SettingsError naming the file."""


@functools.cache
def _strict_loader() -> type[Any]:
    """PyYAML, imported when a config file is read: ~12 ms and ~1.5 MB that a node without one
    (and every service that reads none) does not pay."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """PyYAML's safe loader without aliases and anchors, and with a depth bound.

        Aliases are what make a 1.4 KB file expand to gigabytes (and merge keys need them); no
        config of ours needs one. Depth is bounded before the composer recurses: 3000 levels
        ended in a RecursionError traceback. The pure-Python composer is what can be hooked;
        config files are small, so its speed does not matter.
        """

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._depth = 0
            self._nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]
            line = event.start_mark.line + 1 if event.start_mark is not None else 0
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _ConfigInputError(f"line {line}: YAML anchors and aliases (&, *, <<) are not accepted")
            self._depth += 1
            self._nodes += 1
            try:
                if self._depth > MAX_CONFIG_DEPTH:
                    raise _ConfigInputError(f"line {line}: nested deeper than {MAX_CONFIG_DEPTH} levels")
                if self._nodes > MAX_CONFIG_NODES:
                    raise _ConfigInputError(f"line {line}: more than {MAX_CONFIG_NODES} values in one file")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            """A key given twice is an error: YAML's last-wins silently dropped the first value."""
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.setdefault(key, line)
                except TypeError:  # an unhashable key: PyYAML's own error names it
                    break
                if first != line:
                    raise _ConfigInputError(f"line {line}: duplicate key {show(key)} (first on line {first})")
            return super().construct_mapping(node, deep)

    return StrictLoader


def check_sections(tree: Mapping[str, Any], known: Mapping[str, Any], prefix: str = "") -> None:
    """A known section that is not a mapping is an error: `flags: 1` used to be silently ignored."""
    for key, sub in known.items():
        value = tree.get(key)
        if isinstance(sub, Mapping) and value is not None:
            if not isinstance(value, Mapping):
                raise SettingsError(f"{prefix}{key}: expected a mapping, got {show(value)}")
            check_sections(value, sub, f"{prefix}{key}.")


def load_config_file(path: str) -> dict[str, Any]:
    try:
        # A FIFO here blocked every service at start, before any watchdog ran; a 1 GB file was read whole.
        raw = read_bounded(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise SettingsError(f"config file {path}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SettingsError(f"config file {path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from e
    import yaml

    try:
        loader = _strict_loader()(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _ConfigInputError as e:
        raise SettingsError(f"config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise SettingsError(f"config file {path}: not valid YAML: {str(e)[:300]}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path}: expected a mapping at the top level")
    version = data.get("version")
    if version != "v1":
        raise SettingsError(f"config file {path}: version: {show(version)} is not supported; allowed values: v1")
    return data


def refuse_resources(section: Any) -> None:
    # NVIDIA's plugin drops `resources` with a log line; an operator who set it expects renamed resources.
    if section:
        raise SettingsError("resources: custom resource naming is not supported (NVIDIA's plugin ignores it "
                            "too); remove the key, or rename with sharing.timeSlicing.resources[].rename")


class Strict(dict[str, Any]):
    """A section of ours whose unknown keys are errors (a typo there would silently change the
    health policy); in NVIDIA's sections an unknown key is warned about, as its plugin does."""


SHOWN_UNKNOWN_KEYS = 5


def warn_unknown(tree: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """One warning for all unknown keys, naming a few: 60 000 of them were 60 000 log lines."""
    unknown: list[str] = []
    _unknown(tree, known, "", unknown)
    if len(unknown) == 1:
        log.warning("config file: unknown key %s is ignored", _clip(unknown[0]))
    elif unknown:
        more = f" and {len(unknown) - SHOWN_UNKNOWN_KEYS} more" if len(unknown) > SHOWN_UNKNOWN_KEYS else ""
        log.warning("config file: %d unknown keys are ignored: %s%s", len(unknown),
                    ", ".join(_clip(k) for k in unknown[:SHOWN_UNKNOWN_KEYS]), more)


def _clip(key: str) -> str:
    return key if len(key) <= 80 else key[:77] + "..."


def _unknown(tree: Mapping[str, Any], known: Mapping[str, Any], prefix: str, found: list[str]) -> None:
    for key, value in tree.items():
        if key not in known and isinstance(known, Strict):
            raise SettingsError(f"{prefix}{_clip(str(key))}: unknown key; allowed: {', '.join(sorted(known))}")
        if key not in known:
            found.append(f"{prefix}{key}")
        elif isinstance(known[key], Mapping) and isinstance(value, Mapping):
            _unknown(value, known[key], f"{prefix}{key}.", found)
