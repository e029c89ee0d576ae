"""End to end: the shipped supervisord.conf runs the three services on a simulated 8-GPU
box beside the kubelet simulator (a separate process), as in the container."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.devstack import PROGRAMS, RESOURCE, DevStack
from tests.conftest import wait_until
from tests.e2e.conftest import held

pytestmark = pytest.mark.e2e


def ok_registrations(state: dict) -> int:  # type: ignore[type-arg]
    return sum(1 for r in state["registrations"] if r["ok"])


def forked_in_place(stack: DevStack, program: str) -> None:
    """`program` runs in a child of the supervisor that never executed a new interpreter: its
    parent is the supervisor, and it is named as the service (an exec'd `gpu-plugin` would show
    the interpreter's path and the script's in its command line)."""
    pid = stack.pid(program)
    status = Path(f"/proc/{pid}/status").read_text()
    parent = int(status.split("PPid:")[1].split()[0])
    assert Path(f"/proc/{parent}/comm").read_text().strip().startswith("gpu-plugin-supe"), "forked by the supervisor"
    assert Path(f"/proc/{pid}/comm").read_text().strip() == program[:15]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0") == [b"gpu-plugin", program.encode()]


def test_registration_device_list_allocate_and_xid(stack: DevStack) -> None:
    state = held(stack)
    assert ok_registrations(state) == 1
    assert state["registrations"][0]["endpoint"] == "nvidia-gpu.sock"
    ids = list(state["resources"][RESOURCE]["devices"])
    reply = stack.kubelet.allocate(RESOURCE, ids[2:4])
    assert reply["ok"] and reply["response"]["envs"] == {"NVIDIA_VISIBLE_DEVICES": ",".join(ids[2:4])}
    stack.inject("xid", ids[5], "79")
    reply = stack.kubelet.wait(RESOURCE, device=ids[5], health="Unhealthy", timeout=10)
    assert reply["ok"], reply
    devices = reply["state"]["resources"][RESOURCE]["devices"]
    assert [i for i, h in devices.items() if h != "Healthy"] == [ids[5]]


@pytest.mark.parametrize("program", PROGRAMS)
def test_restart_of_each_component_alone(stack: DevStack, program: str) -> None:
    before = held(stack)
    old_pid = stack.pid(program)
    forked_in_place(stack, program)
    stack.ctl("restart", program)
    wait_until(lambda: stack.pid(program) not in (0, old_pid), 20, f"{program} restarted")
    stack.wait_running()
    after = held(stack)
    registrations = ok_registrations(after) - ok_registrations(before)
    if program == "plugin-server":
        # Its socket was re-created: exactly one new registration, never two.
        wait_until(lambda: ok_registrations(stack.kubelet.state()) == ok_registrations(before) + 1, 10,
                   "re-registration of the new endpoint")
        after = held(stack)
        assert ok_registrations(after) == ok_registrations(before) + 1
    else:
        assert registrations == 0, "restarting the health-monitor or registrar must not re-register"
        assert after["disconnects"] == before["disconnects"]
    assert after["resources"][RESOURCE]["endpoint"] == "nvidia-gpu.sock"
    forked_in_place(stack, program)  # restarted from the supervisor's imports too, not executed
    assert sorted(p.name for p in stack.dp_dir.iterdir()) == ["kubelet.sock", "nvidia-gpu.sock"]
    ids = list(after["resources"][RESOURCE]["devices"])
    assert stack.kubelet.allocate(RESOURCE, ids[:1])["ok"]


def test_kubelet_restart_reregisters_and_allocate_works(stack: DevStack) -> None:
    before = held(stack)
    stack.kubelet.restart()
    wait_until(lambda: ok_registrations(stack.kubelet.state()) == ok_registrations(before) + 1, 10,
               "re-registration after the kubelet restart")
    after = held(stack)
    assert after["restarts"] == 1
    ids = list(after["resources"][RESOURCE]["devices"])
    reply = stack.kubelet.allocate(RESOURCE, ids[:2])
    assert reply["ok"] and reply["response"]["envs"]["NVIDIA_VISIBLE_DEVICES"] == ",".join(ids[:2])


def test_sigterm_stops_everything_cleanly(stack: DevStack) -> None:
    held(stack)
    code = stack.stop(timeout=30)
    assert code == 0
    assert not (stack.dp_dir / "nvidia-gpu.sock").exists()
    assert not list(stack.run_dir.glob("*.sock")), "every bus and supervisor socket is removed"


def test_a_fatal_component_ends_supervisord(tmp_path: Path) -> None:
    # A crash the service does not know to be permanent (an unreadable device description; no
    # driver with failOnInitError is permanent now, see test_exits.py): restarted until FATAL.
    missing = tmp_path / "missing-fleet.json"
    s = DevStack(fleet=str(missing))
    try:
        s.start()
        assert s.supervisord is not None
        code = s.supervisord.wait(120)
        assert code is not None and code != 0, "a FATAL component ends the container non-zero"
        log = (s.root / "supervisord.log").read_text()
        assert "processname:health-monitor" in log and ": FATAL; stopping supervisord" in log
        assert f"cannot read device description {missing}" in log
        assert "FATAL" in log.rstrip("\n").rsplit("\n", 1)[-1], "the cause is the last line"
    finally:
        s.stop()
        s.cleanup()
