"""Which XIDs make a GPU unhealthy: pure, table-tested.

Matches NVIDIA's plugin: XIDs 13, 31, 43, 45, 68 and 109 are application errors and
leave the GPU healthy. DP_DISABLE_HEALTHCHECKS is "all" (no health checks at all),
"xids" (no XID checks) or a comma list of further XIDs to ignore;
DP_ENABLE_HEALTHCHECKS is a comma list of XIDs that count even if ignored, or "all"
(every XID counts). An explicit enable wins over any disable. Malformed entries are
ignored with a warning, as NVIDIA's plugin does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_DISABLE = "DP_DISABLE_HEALTHCHECKS"
ENV_ENABLE = "DP_ENABLE_HEALTHCHECKS"

# Application errors (NVIDIA XID catalogue): the GPU itself is fine.
#  13 graphics engine exception, 31 GPU memory page fault, 43 GPU stopped processing,
#  45 preemptive cleanup, 68 video processor exception, 109 context switch timeout.
DEFAULT_IGNORED_XIDS = frozenset({13, 31, 43, 45, 68, 109})


@dataclass(frozen=True)
class XidPolicy:
    checks_enabled: bool = True  # False: DP_DISABLE_HEALTHCHECKS=all
    all_xids_disabled: bool = False
    all_xids_enabled: bool = False
    ignored: frozenset[int] = DEFAULT_IGNORED_XIDS
    enabled: frozenset[int] = frozenset()

    def is_fatal(self, xid: int) -> bool:
        if not self.checks_enabled:
            return False
        if self.all_xids_enabled or xid in self.enabled:
            return True
        if self.all_xids_disabled:
            return False
        return xid not in self.ignored


def _parse(value: str, env: str) -> tuple[set[str], set[int]]:
    words: set[str] = set()
    xids: set[int] = set()
    for item in value.lower().split(","):
        item = item.strip()
        if not item:
            continue
        if item in ("all", "xids"):
            words.add(item)
        elif item.isascii() and item.isdigit():
            xids.add(int(item))
        else:
            log.warning("%s: ignoring malformed XID %r", env, item)
    return words, xids


def policy_from_env(environ: Mapping[str, str], extra_ignored: Iterable[int] = ()) -> XidPolicy:
    dis_words, dis_xids = _parse(environ.get(ENV_DISABLE, ""), ENV_DISABLE)
    en_words, en_xids = _parse(environ.get(ENV_ENABLE, ""), ENV_ENABLE)
    return XidPolicy(
        checks_enabled="all" not in dis_words,
        all_xids_disabled="xids" in dis_words,
        all_xids_enabled=bool(en_words),
        ignored=DEFAULT_IGNORED_XIDS | dis_xids | frozenset(extra_ignored),
        enabled=frozenset(en_xids),
    )
