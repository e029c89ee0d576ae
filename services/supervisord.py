"""`gpu-plugin-supervisord`: supervisord itself, acting on what happens when it happens.

Stock supervisord polls with a 1 s timeout and acts in a fixed order within each turn: poll,
start due programs (transition), reap exited children, handle a signal. So it starts the
programs only after its first 1 s poll, restarts a program that died only after the poll that
follows the reap (up to 1 s with nothing to read), and sees SIGTERM only when the poll times
out (Python retries a poll that a signal interrupted). On every node that was ~1 s of each
cold start, ~1 s of every restart after a crash, and up to 3 s of every pod termination.

Two changes, nothing else: the poll also watches a signal wakeup pipe (a SIGCHLD or SIGTERM
ends it at once), and after a turn that reaped a child or handled a signal, or on the first
turn, the next poll does not wait. Everything else, configuration and supervisorctl included,
is supervisord's own (pinned in requirements-image.txt).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from supervisor import supervisord


class PromptSupervisor(supervisord.Supervisor):  # type: ignore[misc]
    due = True  # the next poll returns at once: the first turn starts the programs

    def reap(self, once: bool = False, recursionguard: int = 0) -> None:
        known = len(self.options.pidhistory)
        super().reap(once, recursionguard)
        if len(self.options.pidhistory) != known:
            self.due = True  # a child exited: restart it (or go on stopping) in the next turn

    def runforever(self) -> None:
        poller = self.options.poller
        plain_poll, plain_get_signal = poller.poll, self.options.get_signal
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

        def prompt_poll(timeout: float) -> tuple[list[int], list[int]]:
            poller.register_readable(wake_r)
            if self.due:
                self.due, timeout = False, 0
            readable, writable = plain_poll(timeout)
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                readable = [fd for fd in readable if fd != wake_r]
            return readable, writable

        def get_signal() -> int | None:
            sig: int | None = plain_get_signal()
            if sig is not None:
                self.due = True  # e.g. SIGTERM: the stop begins in the next turn, not a second later
            return sig

        poller.poll, self.options.get_signal = prompt_poll, get_signal
        try:
            super().runforever()
        finally:
            poller.poll, self.options.get_signal = plain_poll, plain_get_signal
            with contextlib.suppress(KeyError, OSError):
                poller.unregister_readable(wake_r)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)


def main(args: Any = None) -> None:
    supervisord.Supervisor = PromptSupervisor  # supervisord.go() makes its Supervisor by this name
    supervisord.main(args)
