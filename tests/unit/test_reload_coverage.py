"""Every setting the config file can carry is applied live by a service, or warned about as needing a
restart: a reload never drops one silently (a new setting must be placed in one of the lists)."""

from __future__ import annotations

from common.settings import SPECS
from services.health_monitor import __main__ as health_monitor
from services.kube_agent import __main__ as kube_agent
from services.plugin_server import __main__ as plugin_server


def test_every_file_setting_is_live_or_restart_only_somewhere() -> None:
    file_keyed = {s.name for s in SPECS if s.file_key is not None} | {"sharing"}
    handled = (health_monitor.LIVE | health_monitor.RESTART | plugin_server.LIVE | plugin_server.RESTART
               | kube_agent.LIVE | kube_agent.RESTART)
    assert file_keyed - handled == set()


def test_no_setting_is_both_live_and_restart_only() -> None:
    assert not health_monitor.LIVE & health_monitor.RESTART
    assert not plugin_server.LIVE & plugin_server.RESTART
    assert not kube_agent.LIVE & kube_agent.RESTART
