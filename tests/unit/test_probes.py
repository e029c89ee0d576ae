"""The health-monitor's probe threads: one per GPU, kept from one probe to the next, never two probes
of a GPU at once, a wedged GPU's thread left to its call while the others go on."""

from __future__ import annotations

import asyncio
import threading

from devtools.nvml_sim import SimulatedNvml, fleet_path
from services.health_monitor.discovery import discover
from services.health_monitor.probes import Prober

WAIT_S = 5.0


def probe_threads(besides: set[threading.Thread]) -> set[threading.Thread]:
    """The live probe threads but `besides` (other tests' probers may have left theirs, stuck or idle)."""
    return {t for t in threading.enumerate() if t.name.startswith("nvml-probe-") and t not in besides}


def test_each_gpu_keeps_one_probe_thread_and_a_wedged_one_holds_only_its_own() -> None:
    nvml = SimulatedNvml(fleet_path("dgx-h100-8"))
    nvml.init()
    again = threading.Event()  # the prober's "probe again now": a stuck probe answered at last
    try:
        inv = discover(nvml, 1_700_000_000.0)
        gpus = [d.id for d in inv.devices if d.kind == "gpu"]
        before = set(threading.enumerate())

        async def rounds() -> None:
            prober = Prober(nvml, 0.2, again.set)
            first = await prober.probe_all(inv.handles)
            assert sorted(p.gpu for p in first) == sorted(gpus) and not any(p.faults for p in first)
            threads = probe_threads(before)
            assert len(threads) == len(gpus)
            second = await prober.probe_all(inv.handles)
            assert not any(p.faults for p in second)
            assert probe_threads(before) == threads, \
                "the same thread per GPU, not a new one per probe"

            nvml.inject({"op": "hang", "uuid": gpus[3]})
            wedged = {p.gpu: p for p in await prober.probe_all(inv.handles)}
            assert "hung" in wedged[gpus[3]].faults and not any(wedged[g].faults for g in gpus if g != gpus[3])
            # Still stuck: reported hung again, no second probe started on it; the others probed as usual.
            still = {p.gpu: p for p in await prober.probe_all(inv.handles)}
            assert "hung" in still[gpus[3]].faults and not any(still[g].faults for g in gpus if g != gpus[3])
            nvml.inject({"op": "recover", "uuid": gpus[3]})
            # The stuck call returns on the probe thread, which then asks for a round.
            assert await asyncio.to_thread(again.wait, WAIT_S)
            back = {p.gpu: p for p in await prober.probe_all(inv.handles)}
            assert not any(p.faults for p in back.values())

            # A GPU no longer listed: its idle thread ends.
            gone = gpus[0]
            thread = next(t for t in threads if t.name == f"nvml-probe-{gone[:12]}")
            await prober.probe_all({g: h for g, h in inv.handles.items() if g != gone})
            thread.join(WAIT_S)
            assert not thread.is_alive()
            rest = [t for t in threads if t.is_alive()]
            prober.close()
            for t in rest:
                t.join(WAIT_S)
            assert rest and not any(t.is_alive() for t in rest)

        asyncio.run(rounds())
    finally:
        nvml.shutdown()
