"""The services' log: one line per record, whatever a message quotes (a node label, a config key,
an API answer): a forged line in the container log is a lie an operator acts on."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SCRIPT = r"""
import logging, sys
from common.logs import configure_logging
configure_logging("kube-agent", "info")
log = logging.getLogger("services.kube_agent.agent")
label = sys.argv[1]
log.info("node n1: label nvidia.com/device-plugin.config is now %s", label)
try:
    raise ValueError("boom")
except ValueError:
    log.exception("with a traceback")
"""


def test_a_label_with_a_newline_and_nul_bytes_stays_one_escaped_line() -> None:
    forged = "ts-4\n2026-12-05 10:00:00,000 kube-agent[1] INFO x: wrote config default\r\u2028end"
    out = subprocess.run([sys.executable, "-c", SCRIPT, forged], cwd=REPO, capture_output=True, text=True,
                         timeout=30, check=True)
    lines = out.stderr.splitlines()
    assert "label nvidia.com/device-plugin.config is now ts-4\\n2026-12-05 10:00:00,000 kube-agent[1] INFO x: " \
           "wrote config default" in lines[0], lines
    assert "\\r\\u2028end" in lines[0], lines[0]
    assert not any(line.startswith("2026-12-05 10:00:00,000") for line in lines), "a forged line"
    # A traceback is the one record of several lines, and only after its own first line.
    assert lines[1].endswith("with a traceback") and lines[2] == "Traceback (most recent call last):", lines


def test_nul_and_other_control_bytes_are_escaped() -> None:
    script = SCRIPT.replace("label = sys.argv[1]", "label = 'a\\x00b\\x1bc\\x7fd\\x9fe\\tf'")
    out = subprocess.run([sys.executable, "-c", script, "-"], cwd=REPO, capture_output=True, text=True,
                         timeout=30, check=True)
    first = out.stderr.splitlines()[0]
    assert "\x00" not in out.stderr and "\x1b" not in out.stderr
    assert first.endswith("is now a\\x00b\\x1bc\\x7fd\\x9fe\tf"), first
