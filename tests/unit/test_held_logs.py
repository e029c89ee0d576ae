"""Records held on a hot path (the health monitor's fault path) are written after it, in order,
with the time they were made; other threads' records are never held."""

from __future__ import annotations

import logging
import threading

from common import logs
from common.logs import hold_logs, release_logs


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_held_records_go_out_on_release_in_order_and_other_threads_pass() -> None:
    root = logging.getLogger()
    out = Lines()
    out.addFilter(logs._HOLD)
    root.addHandler(out)
    log = logging.getLogger("hot")
    try:
        hold_logs()
        log.warning("first")
        other = threading.Thread(target=log.warning, args=("from another thread",))
        other.start()
        other.join()
        log.warning("second")
        assert [r.getMessage() for r in out.records] == ["from another thread"]
        release_logs()
        assert [r.getMessage() for r in out.records] == ["from another thread", "first", "second"]
        assert out.records[1].created <= out.records[0].created  # made before, written after
        log.warning("after")  # not held any more
        assert out.records[-1].getMessage() == "after"
    finally:
        release_logs()
        root.removeHandler(out)


def test_a_storm_is_not_held_without_bound() -> None:
    root = logging.getLogger()
    out = Lines()
    out.addFilter(logs._HOLD)
    root.addHandler(out)
    try:
        hold_logs()
        for i in range(logs._Held.MAX + 5):
            logging.getLogger("storm").warning("%d", i)
        assert len(out.records) == 5
        release_logs()
        assert [int(r.getMessage()) for r in out.records][5:] == list(range(logs._Held.MAX))
    finally:
        release_logs()
        root.removeHandler(out)


def test_a_record_passing_two_handlers_is_held_once_and_written_once_to_each() -> None:
    root = logging.getLogger()
    one, two = Lines(), Lines()
    for h in (one, two):
        h.addFilter(logs._HOLD)
        root.addHandler(h)
    try:
        hold_logs()
        logging.getLogger("hot").warning("once")
        assert len(logs._HOLD.records) == 1
        release_logs()
        assert [r.getMessage() for r in one.records] == ["once"] == [r.getMessage() for r in two.records]
    finally:
        release_logs()
        for h in (one, two):
            root.removeHandler(h)
