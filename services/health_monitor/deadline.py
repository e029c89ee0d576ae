"""Per-GPU NVML work under a deadline: a call on a wedged GPU can block for good, and nothing can
interrupt a call blocked in the driver, so each GPU's work runs in a daemon thread of its own
and the caller goes on after the deadline, leaving a stuck thread behind (what it was doing is
for the work to record)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


def each_within(calls: Sequence[tuple[str, Callable[[], None]]], deadline: float | None) -> None:
    """Runs every (thread name, call); in turn without a deadline, else in parallel threads,
    returning once all are done or `deadline` seconds have passed."""
    if deadline is None:
        for _, call in calls:
            call()
        return
    threads = [threading.Thread(target=call, name=name, daemon=True) for name, call in calls]
    for t in threads:
        t.start()
    until = time.monotonic() + deadline
    for t in threads:
        t.join(max(0.0, until - time.monotonic()))
