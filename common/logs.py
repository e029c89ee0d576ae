"""Logging of every service: one line per record on stderr, which supervisord forwards to the
container log; and records held back while a thread is on a hot path. Kept apart from
lifecycle (asyncio, reload) so that a process that only says why it has nothing to do
imports no more than this."""

from __future__ import annotations

import logging
import re
import sys
import threading

# Line breaks and other control characters (C0, DEL, C1, Unicode's line and paragraph separators),
# the tab excepted. A message quotes what others wrote (a node label, a config key, an API
# error): a `\n` in a label forged a whole log line of ours, and NUL bytes reached the log.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def one_line(text: str) -> str:
    """`text` with every control character escaped: one line, whatever it quotes."""
    return _CONTROL.sub(_escaped, text)


class OneLineFormatter(logging.Formatter):
    """A record is one line: its message is escaped (a traceback after it keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


def configure_logging(service: str, level: str, fmt: str | None = None) -> None:
    """One line per record on stderr; supervisord forwards it to the container log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(fmt or f"%(asctime)s {service}[%(process)d] %(levelname)s %(name)s: "
                                                 "%(message)s"))
    handler.addFilter(_HOLD)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


class _Held(logging.Filter):
    """Keeps the records of one thread back while it is on a hot path (see `hold_logs`)."""

    MAX = 1000  # past this many, records go out at once: a storm must not grow memory

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.thread == threading.get_ident() and len(self.records) < self.MAX:
            if not self.records or self.records[-1] is not record:  # each handler asks: hold it once
                self.records.append(record)
            return False
        return True


_HOLD = _Held()


def hold_logs() -> None:
    """Holds this thread's log records until `release_logs`: a fault's state goes on the bus
    first. Writing a line costs a syscall here and wakes supervisord, which reads it on the
    cores the rest of the fault's path needs; the records keep the time they were made."""
    _HOLD.thread = threading.get_ident()


def release_logs() -> None:
    """Writes the records held since `hold_logs`, in order."""
    _HOLD.thread = None
    records, _HOLD.records = _HOLD.records, []
    for record in records:
        for handler in logging.getLogger().handlers:
            if _HOLD in handler.filters and record.levelno >= handler.level:
                handler.handle(record)
