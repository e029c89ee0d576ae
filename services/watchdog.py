"""supervisord event listener: a component that reaches FATAL ends the container.

supervisord gives up on a program after `startretries` failed starts and leaves it FATAL
while the container keeps running: a node that silently offers no GPUs. Ending
supervisord instead makes Kubernetes restart the pod, and the failure shows in its status.
"""

from __future__ import annotations

import os
import signal
import sys

from supervisor import childutils


def run() -> int:
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        if headers.get("eventname") == "PROCESS_STATE_FATAL":
            fields, _ = childutils.eventdata(payload + "\n")
            print(f"supervisor-watchdog: {fields.get('processname')} is FATAL; stopping supervisord",
                  file=sys.stderr, flush=True)
            childutils.listener.ok(sys.stdout)
            os.kill(os.getppid(), signal.SIGTERM)
            continue
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(run())
