"""Which XIDs make a GPU unhealthy: pure, table-tested.

Matches NVIDIA's plugin: XIDs 13, 31, 43, 45, 68 and 109 are application errors and
leave the GPU healthy. DP_DISABLE_HEALTHCHECKS is "all" (no health checks at all),
"xids" (no XID checks) or a comma list of further XIDs to ignore;
DP_ENABLE_HEALTHCHECKS is a comma list of XIDs that count even if ignored, or "all"
(every XID counts). An explicit enable wins over any disable. Malformed entries are
ignored with a warning, as NVIDIA's plugin does.

The config file's `health.xids` adds to that: `fatal` XIDs count like DP_ENABLE_HEALTHCHECKS,
`ignored` ones like DP_DISABLE_HEALTHCHECKS, and `monitorOnly` XIDs are reported on the bus
but leave the device schedulable (GKE's idea). Precedence, strongest first: the environment's
enable, monitor-only, the file's fatal list, a disable of all XIDs, the ignore lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.settings import HealthConfig, Settings

log = logging.getLogger(__name__)

ENV_DISABLE = "DP_DISABLE_HEALTHCHECKS"
ENV_ENABLE = "DP_ENABLE_HEALTHCHECKS"

FATAL = "fatal"
IGNORED = "ignored"
MONITOR_ONLY = "monitor-only"

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
    monitor_only: frozenset[int] = frozenset()
    config_fatal: frozenset[int] = frozenset()

    def classify(self, xid: int) -> str:
        if not self.checks_enabled:
            return IGNORED
        if self.all_xids_enabled or xid in self.enabled:
            return FATAL
        if xid in self.monitor_only:
            return MONITOR_ONLY
        if xid in self.config_fatal:
            return FATAL
        if self.all_xids_disabled or xid in self.ignored:
            return IGNORED
        return FATAL


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


def xid_policy(disable: str = "", enable: str = "", config: HealthConfig | None = None) -> XidPolicy:
    """The policy from DP_DISABLE_HEALTHCHECKS, DP_ENABLE_HEALTHCHECKS and the health settings."""
    config = config or HealthConfig()
    dis_words, dis_xids = _parse(disable, ENV_DISABLE)
    en_words, en_xids = _parse(enable, ENV_ENABLE)
    return XidPolicy(
        checks_enabled="all" not in dis_words,
        all_xids_disabled="xids" in dis_words,
        all_xids_enabled=bool(en_words),
        ignored=DEFAULT_IGNORED_XIDS | dis_xids | config.ignored_xids,
        enabled=frozenset(en_xids),
        monitor_only=config.monitor_only_xids,
        config_fatal=config.fatal_xids,
    )


def policy_for(settings: Settings) -> XidPolicy:
    return xid_policy(settings.disable_healthchecks, settings.enable_healthchecks, settings.health)
