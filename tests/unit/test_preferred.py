"""GetPreferredAllocation choices: exact best-scoring GPU sets, replica spreading and packing."""

from __future__ import annotations

import random
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bus.messages import HEALTHY, DeviceState, PairLink
from services.plugin_server.device_table import PluginDevice
from services.plugin_server.preferred import (
    MAX_EXACT,
    Topology,
    pair_score,
    preferred_gpus,
    preferred_shared,
)

LEVELS = [-1, 0, 10, 20, 30, 40, 50]
BIG = 10**9  # enum_limit that forces enumeration


def gpu(i: int, numa: int | None, prefix: str = "G") -> DeviceState:
    return DeviceState(
        id=f"{prefix}{i}", kind="gpu", index=str(i), name="NVIDIA H100", health=HEALTHY, reason="", since=0.0,
        minor=i, numa_node=numa,
    )


def ref_pair(nvlinks: int, level: int, na: int | None, nb: int | None) -> int:
    """The spec's pair score, written out independently of the module."""
    table = {0: 60, 10: 50, 20: 40, 30: 30, 40: 20, 50: 10}
    if level in table:
        pcie = table[level]
    elif na is None or nb is None:
        pcie = 0
    else:
        pcie = 20 if na == nb else 10
    return 100 * max(nvlinks, 0) + pcie


def nvswitch_box() -> tuple[list[DeviceState], list[PairLink]]:
    """8 GPUs all-to-all on NVSwitch (12 links), pairs (0,1) (2,3) .. under one PCIe switch,
    GPUs 0-3 on NUMA 0 and 4-7 on NUMA 1."""
    gpus = [gpu(i, i // 4) for i in range(8)]
    links = []
    for i, j in combinations(range(8), 2):
        level = 10 if i // 2 == j // 2 else 40 if i // 4 == j // 4 else 50
        links.append(PairLink(f"G{i}", f"G{j}", 12, level))
    return gpus, links


def pcie_box() -> tuple[list[DeviceState], list[PairLink]]:
    """8 PCIe GPUs, no NVLink: P0-P3 on NUMA 0, P4-P7 on NUMA 1; (0,1) (2,3) (4,5) under one
    switch, other pairs of a NUMA node under several; P7's levels unknown (NUMA fallback)."""
    gpus = [gpu(i, i // 4, "P") for i in range(8)]
    links = []
    for i, j in combinations(range(8), 2):
        if j == 7:
            level = -1
        elif i // 2 == j // 2:
            level = 10
        elif i // 4 == j // 4:
            level = 20
        else:
            level = 50
        links.append(PairLink(f"P{i}", f"P{j}", 0, level))
    return gpus, links


NV = Topology(*nvswitch_box())
PCIE = Topology(*pcie_box())
G = [f"G{i}" for i in range(8)]
P = [f"P{i}" for i in range(8)]


# --- pair scores -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("nvlinks", "level", "na", "nb", "want"),
    [
        (0, 0, 0, 0, 60), (0, 10, 0, 1, 50), (0, 20, None, None, 40), (0, 30, 0, 0, 30),
        (0, 40, 0, 0, 20), (0, 50, 0, 1, 10), (12, 10, 0, 0, 1250), (18, 50, 0, 1, 1810),
        (0, -1, 0, 0, 20), (0, -1, 0, 1, 10), (0, -1, None, 0, 0), (2, -1, None, None, 200),
        (0, 7, 1, 1, 20), (-3, 0, 0, 0, 60),
    ],
)
def test_pair_score(nvlinks: int, level: int, na: int | None, nb: int | None, want: int) -> None:
    assert pair_score(nvlinks, level, na, nb) == want


def test_topology_matrix() -> None:
    assert NV.pair("G0", "G1") == 1250
    assert NV.pair("G0", "G2") == 1220
    assert NV.pair("G0", "G4") == 1210
    assert NV.pair("G0", "G0") == 0
    assert NV.pair("G0", "nope") == 0
    assert PCIE.pair("P4", "P7") == 20 and PCIE.pair("P0", "P7") == 10
    assert NV.score(["G0", "G1", "G1", "nope"]) == 1250


def test_topology_missing_duplicate_and_foreign_links() -> None:
    gpus = [gpu(0, 0), gpu(1, 0), gpu(2, 1), gpu(3, None)]
    mig = DeviceState(id="MIG-x", kind="mig", index="0:1", name="m", health=HEALTHY, reason="", since=0.0,
                      parent="G0")
    links = [PairLink("G0", "G1", 1, 50), PairLink("G1", "G0", 4, 50), PairLink("G0", "G1", 2, 50),
             PairLink("G0", "GX", 9, 0), PairLink("G2", "G2", 9, 0)]
    topo = Topology([*gpus, mig, gpus[0]], links)
    assert topo.ids == ("G0", "G1", "G2", "G3")
    assert topo.pair("G0", "G1") == 410  # the best of the duplicates
    assert topo.pair("G0", "G2") == 10  # no link: NUMA fallback
    assert topo.pair("G0", "G3") == 0  # NUMA unknown


def test_topology_sizes() -> None:
    assert NV.exact and len(NV) == 8
    assert NV.nbytes < 4 * 1024
    big = Topology([gpu(i, i // 8) for i in range(16)], [])
    assert big.exact and big.nbytes < 700 * 1024
    assert not Topology([gpu(i, 0) for i in range(MAX_EXACT + 1)], []).exact


# --- table tests -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("available", "must", "size", "want"),
    [
        (G, [], 1, ["G0"]),
        (G, [], 2, ["G0", "G1"]),
        (G, [], 3, ["G0", "G1", "G2"]),
        (G, [], 4, ["G0", "G1", "G2", "G3"]),
        (G, [], 8, G),
        (G, ["G5"], 2, ["G5", "G4"]),
        (G, ["G5"], 4, ["G5", "G4", "G6", "G7"]),
        (G, ["G3", "G0"], 4, ["G3", "G0", "G1", "G2"]),
        (["G1", "G2", "G3", "G4", "G6", "G7"], [], 2, ["G2", "G3"]),
        (["G1", "G2", "G3", "G4", "G6", "G7"], [], 4, ["G2", "G3", "G6", "G7"]),
        (["G1", "G2", "G3", "G4", "G6", "G7"], [], 3, ["G1", "G2", "G3"]),
        (list(reversed(G)), [], 2, ["G7", "G6"]),
        (list(reversed(G)), [], 4, ["G7", "G6", "G5", "G4"]),
        (["G6", "G0", "G3", "G1", "G7", "G2", "G4", "G5"], [], 2, ["G6", "G7"]),
        (["G6", "G0", "G3", "G1", "G7", "G2", "G4", "G5"], [], 4, ["G6", "G7", "G4", "G5"]),
    ],
)
def test_nvswitch_box(available: list[str], must: list[str], size: int, want: list[str]) -> None:
    for limit in (0, BIG):
        assert preferred_gpus(NV, available, must, size, enum_limit=limit) == want
    assert preferred_gpus(NV, available, must, size) == want


@pytest.mark.parametrize(
    ("available", "must", "size", "want"),
    [
        (P, [], 2, ["P0", "P1"]),
        (P, [], 4, ["P0", "P1", "P2", "P3"]),
        (["P1", "P2", "P4", "P5", "P6"], [], 3, ["P4", "P5", "P6"]),
        (["P2", "P3", "P4", "P5", "P6", "P7"], ["P0"], 2, ["P0", "P2"]),
        (["P2", "P3", "P4", "P5", "P6", "P7"], ["P0"], 3, ["P0", "P2", "P3"]),
        (P[:7], ["P7"], 2, ["P7", "P4"]),  # P7 scores by NUMA: 20 with P4-P6, 10 elsewhere
        (["P7", "P0", "P4"], [], 2, ["P7", "P4"]),
        (["P3", "P7", "P0", "P5"], [], 2, ["P3", "P0"]),  # 40 beats P7's 20 and the 10s
    ],
)
def test_pcie_box(available: list[str], must: list[str], size: int, want: list[str]) -> None:
    for limit in (0, BIG):
        assert preferred_gpus(PCIE, available, must, size, enum_limit=limit) == want


# --- edge cases ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("available", "must", "size", "want"),
    [
        (G, [], 0, []),
        (G, ["G2"], 0, ["G2"]),
        (G, ["G2"], -5, ["G2"]),
        (G, ["G2", "G3", "G2"], 1, ["G2", "G3"]),  # size below must_include: must_include
        (G[:3], [], 9, ["G0", "G1", "G2"]),
        (G[:3], ["G7"], 9, ["G7", "G0", "G1", "G2"]),
        ([], [], 2, []),
        ([], ["G1"], 2, ["G1"]),
        (["G0", "G1", "G0"], [], 5, ["G0", "G1"]),
        (["G2", "G3", "G5"], ["G4"], 2, ["G4", "G5"]),  # must outside available, still scored
        (["X1", "G6", "X2", "G7"], [], 2, ["G6", "G7"]),
        (["X1", "X2", "G6"], [], 2, ["X1", "X2"]),  # all score 0: available order
        (["X1", "X2"], ["X9"], 2, ["X9", "X1"]),
        (["X1", "G0", "X2", "G1"], ["X9"], 3, ["X9", "G0", "G1"]),
    ],
)
def test_edge_cases(available: list[str], must: list[str], size: int, want: list[str]) -> None:
    for limit in (0, BIG):
        assert preferred_gpus(NV, available, must, size, enum_limit=limit) == want


def test_empty_topology() -> None:
    topo = Topology([], [])
    assert preferred_gpus(topo, ["A", "B", "C"], ["C"], 2) == ["C", "A"]


def test_greedy_beyond_16() -> None:
    n = 20  # two NVLink islands of 10
    gpus = [gpu(i, i // 10) for i in range(n)]
    links = [PairLink(f"G{i}", f"G{j}", 6 if i // 10 == j // 10 else 0, 20 if i // 10 == j // 10 else 50)
             for i, j in combinations(range(n), 2)]
    topo = Topology(gpus, links)
    assert not topo.exact and topo.nbytes < 8 * 1024
    ids = [f"G{i}" for i in range(n)]
    assert preferred_gpus(topo, ids, [], 4) == ["G0", "G1", "G2", "G3"]
    assert preferred_gpus(topo, ids, ["G15"], 3) == ["G15", "G10", "G11"]
    assert preferred_gpus(topo, ids[5:], ["G0", "X"], 4) == ["G0", "X", "G5", "G6"]
    assert preferred_gpus(topo, ["X", *ids], [], 2) == ["X", "G0"]
    assert preferred_gpus(topo, ids, [], 0) == []
    assert preferred_gpus(topo, ids[:3], [], 30) == ids[:3]


# --- properties ------------------------------------------------------------------------

@st.composite
def requests(draw: st.DrawFn, max_n: int = 9) -> tuple[list[DeviceState], list[PairLink], list[str], list[str], int]:
    n = draw(st.integers(1, max_n))
    numas = draw(st.lists(st.sampled_from([None, 0, 1]), min_size=n, max_size=n))
    gpus = [gpu(i, numas[i]) for i in range(n)]
    links = []
    for i, j in combinations(range(n), 2):
        if draw(st.integers(0, 9)) == 0:
            continue  # no link: NUMA fallback
        links.append(PairLink(f"G{i}", f"G{j}", draw(st.integers(0, 18)), draw(st.sampled_from(LEVELS))))
    pool = [g.id for g in gpus] + ["X0", "X1"]
    available = draw(st.lists(st.sampled_from(pool), max_size=n + 3))
    must = draw(st.lists(st.sampled_from(pool), max_size=3))
    size = draw(st.integers(-1, n + 3))
    return gpus, links, available, must, size


def brute_force(gpus: list[DeviceState], links: list[PairLink], available: list[str], must: list[str],
                size: int) -> tuple[int, list[str]]:
    """(best score, expected answer): the first best set in combinations() order."""
    numa = {g.id: g.numa_node for g in gpus}
    w: dict[frozenset[str], int] = {}
    for link in links:
        w[frozenset((link.a, link.b))] = ref_pair(link.nvlinks, link.level, numa[link.a], numa[link.b])

    def pair(a: str, b: str) -> int:
        if a not in numa or b not in numa:
            return 0
        return w.get(frozenset((a, b)), ref_pair(0, -1, numa[a], numa[b]))

    def score(ids: list[str]) -> int:
        return sum(pair(a, b) for a, b in combinations(ids, 2))

    must = list(dict.fromkeys(must))
    free = [d for d in dict.fromkeys(available) if d not in must]
    room = min(max(size - len(must), 0), len(free))
    best: tuple[int, list[str]] | None = None
    for combo in combinations(free, room):
        s = score(must + list(combo))
        if best is None or s > best[0]:
            best = (s, must + list(combo))
    assert best is not None
    return best


@settings(max_examples=400, deadline=None)
@given(requests(), st.sampled_from([0, 3, 128, BIG]))
def test_exact_optimum(req: tuple[list[DeviceState], list[PairLink], list[str], list[str], int], limit: int) -> None:
    gpus, links, available, must, size = req
    topo = Topology(gpus, links)
    got = preferred_gpus(topo, available, must, size, enum_limit=limit)
    want_score, want = brute_force(gpus, links, available, must, size)
    universe = set(available) | set(must)
    must_d = list(dict.fromkeys(must))
    assert got[: len(must_d)] == must_d
    assert len(got) == len(set(got))
    assert set(got) <= universe
    if size > 0:
        assert len(got) == max(min(size, len(universe)), len(must_d))
    assert topo.score(got) == want_score
    assert got == want  # exact, ties by available order, others in available order
    assert preferred_gpus(topo, list(available), list(must), size, enum_limit=limit) == got


@settings(max_examples=60, deadline=None)
@given(
    st.integers(10, 16),
    st.randoms(use_true_random=False),
    st.integers(1, 16),
    st.integers(0, 2),
)
def test_scan_matches_enumeration_up_to_16(n: int, rnd: random.Random, size: int, n_must: int) -> None:
    gpus = [gpu(i, rnd.choice([None, 0, 1])) for i in range(n)]
    links = [PairLink(f"G{i}", f"G{j}", rnd.choice([0, 0, 2, 12]), rnd.choice(LEVELS))
             for i, j in combinations(range(n), 2)]
    topo = Topology(gpus, links)
    ids = [g.id for g in gpus]
    available = rnd.sample(ids, rnd.randint(0, n))
    must = rnd.sample(ids, n_must)
    scanned = preferred_gpus(topo, available, must, size, enum_limit=0)
    enumerated = preferred_gpus(topo, available, must, size, enum_limit=BIG)
    assert scanned == enumerated


@settings(max_examples=100, deadline=None)
@given(requests(max_n=MAX_EXACT + 4))
def test_greedy_is_well_formed(req: tuple[list[DeviceState], list[PairLink], list[str], list[str], int]) -> None:
    gpus, links, available, must, size = req
    topo = Topology(gpus, links)
    got = preferred_gpus(topo, available, must, size)
    must_d = list(dict.fromkeys(must))
    universe = set(available) | set(must)
    assert got[: len(must_d)] == must_d and len(got) == len(set(got)) and set(got) <= universe
    if size > 0:
        assert len(got) == max(min(size, len(universe)), len(must_d))
    assert preferred_gpus(topo, available, must, size) == got


# --- shared devices --------------------------------------------------------------------

def replicas(gpus: int = 3, per: int = 4) -> dict[str, PluginDevice]:
    out = {}
    for g in range(gpus):
        state = gpu(g, 0)
        for r in range(per):
            out[f"G{g}::{r}"] = PluginDevice(f"G{g}::{r}", HEALTHY, 0, state, replica=r)
    return out


def migs() -> dict[str, PluginDevice]:
    out = {}
    for g in range(2):
        parent = gpu(g, 0)
        for m in range(3):
            state = DeviceState(id=f"MIG-{g}{m}", kind="mig", index=f"{g}:{m}", name="1g.10gb", health=HEALTHY,
                                reason="", since=0.0, parent=parent.id)
            out[state.id] = PluginDevice(state.id, HEALTHY, 0, state, parent=parent)
    return out


REP = replicas()
ALL = list(REP)


@pytest.mark.parametrize(
    ("available", "must", "size", "distributed", "packed"),
    [
        (ALL, [], 3, ["G0::0", "G1::0", "G2::0"], ["G0::0", "G0::1", "G0::2"]),
        (ALL, [], 5, ["G0::0", "G1::0", "G2::0", "G0::1", "G1::1"], ["G0::0", "G0::1", "G0::2", "G0::3", "G1::0"]),
        # G0 has two in use, G1 one: distributed starts on G2, packed on G0.
        ([d for d in ALL if d not in ("G0::0", "G0::1", "G1::0")], [], 3,
         ["G2::0", "G1::1", "G2::1"], ["G0::2", "G0::3", "G1::1"]),
        # must_include counts as in use on its GPU.
        (ALL, ["G1::2"], 3, ["G1::2", "G0::0", "G2::0"], ["G1::2", "G1::0", "G1::1"]),
        # must_include outside available and unknown to devices: "<GPU>::" still counts.
        (ALL[4:], ["G0::9"], 3, ["G0::9", "G1::0", "G2::0"], ["G0::9", "G1::0", "G1::1"]),
        # ties by available order.
        (["G2::3", "G1::3", "G0::3"], [], 2, ["G2::3", "G1::3"], ["G2::3", "G1::3"]),
        (ALL, [], 0, [], []),
        (ALL, ["G0::1"], -1, ["G0::1"], ["G0::1"]),
        (ALL[:2], [], 7, ALL[:2], ALL[:2]),
        ([], ["G0::0"], 3, ["G0::0"], ["G0::0"]),
        (["Z", "G0::0", "Y"], [], 2, ["Z", "Y"], ["G0::0", "Z"]),  # G0 has 3 in use, Z and Y none
    ],
)
def test_shared(available: list[str], must: list[str], size: int, distributed: list[str], packed: list[str]) -> None:
    assert preferred_shared(REP, available, must, size, "distributed") == distributed
    assert preferred_shared(REP, available, must, size, "packed") == packed
    assert preferred_shared(REP, available, must, size, "bogus") == distributed


def test_shared_mig() -> None:
    devs = migs()
    avail = ["MIG-01", "MIG-02", "MIG-10", "MIG-11", "MIG-12"]  # MIG-00 in use
    assert preferred_shared(devs, avail, [], 2, "distributed") == ["MIG-10", "MIG-01"]
    assert preferred_shared(devs, avail, [], 2, "packed") == ["MIG-01", "MIG-02"]
    assert preferred_shared(devs, avail, [], 4, "packed") == ["MIG-01", "MIG-02", "MIG-10", "MIG-11"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([*ALL, "Q::0", "Q::1", "R"]), max_size=16),
    st.lists(st.sampled_from([*ALL, "Q::2"]), max_size=3),
    st.integers(-1, 16),
    st.sampled_from(["distributed", "packed"]),
)
def test_shared_well_formed(available: list[str], must: list[str], size: int, policy: str) -> None:
    got = preferred_shared(REP, available, must, size, policy)
    must_d = list(dict.fromkeys(must))
    universe = set(available) | set(must)
    assert got[: len(must_d)] == must_d and len(got) == len(set(got)) and set(got) <= universe
    if size > 0:
        assert len(got) == max(min(size, len(universe)), len(must_d))
    assert preferred_shared(REP, available, must, size, policy) == got


def test_uniform_topology_ties_to_available_order() -> None:
    rnd = random.Random(7)
    blind = Topology([gpu(i, None) for i in range(16)], [])  # nothing known: every pair 0
    one_numa = Topology([gpu(i, 0) for i in range(16)], [])  # every pair 20
    ids = list(blind.ids)
    for _ in range(20):
        available = rnd.sample(ids, rnd.randint(1, 16))
        size = rnd.randint(1, 16)
        for topo in (blind, one_numa):
            assert preferred_gpus(topo, available, [], size) == available[:size]
            assert preferred_gpus(topo, available, [], size, enum_limit=0) == available[:size]
    assert preferred_gpus(blind, ["X", "G0", "G1"], [], 2) == ["X", "G0"]
    assert preferred_gpus(one_numa, ["X", "G0", "G1"], [], 2) == ["G0", "G1"]
    assert preferred_gpus(one_numa, ["X", "G0", "G1"], ["G5"], 2) == ["G5", "G0"]
