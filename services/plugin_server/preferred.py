"""Topology-aware GetPreferredAllocation: which GPUs (or replicas, MIG devices) to offer.

Why a module of its own, pure and precomputed:
- An error in GetPreferredAllocation fails the pod's admission (kubelet API), so nothing
  here raises: odd sizes, must-include IDs outside `available` and IDs the topology does
  not know all get a usable answer. (The servicer refuses, with INVALID_ARGUMENT, requests
  the kubelet never sends before they get here: `allocation.preferred_candidates`.)
- NVIDIA's plugin queries NVML for links on every call (~600 ms per pair on some systems,
  NVIDIA #774). Here the links come once, with the health-monitor's state, and `Topology`
  turns them into tables when that state changes; a request only reads them. No NVML,
  no I/O, no clock.
- Whole GPUs get the set that maximises the total pair score (NVLink 100 per link, plus
  the PCIe/NUMA term below), EXACTLY for up to 16 GPUs: the score of every subset is
  precomputed by a bitmask DP, and per subset size the subsets are kept sorted by score,
  so a request is a scan from the top for the first subset that fits the request (or, when
  few subsets fit, an enumeration of just those). More than 16 GPUs: greedy.
- Replicas and MIG devices (`preferred_shared`) are spread over or packed onto physical
  GPUs, as NVIDIA's `distributed` / `packed` policies do.

Ties are broken by the order of `available`: of two equally scored sets, the one whose
members' positions in `available`, sorted, are lexicographically smaller wins (that is:
the set holding the earliest-listed device of those they do not share). Answers list
`must_include` first, in its order, then the chosen devices in `available` order.

Memory: 16 GPUs keep 2^16 subset scores (int64, 512 KiB) and 2^16 subset masks sorted
by size and score (uint16, 128 KiB), plus the 16x16 pair matrix: about 640 KiB. 8 GPUs:
about 2.5 KiB. Build time is measured by bench/preferred.py.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations, pairwise
from math import comb
from typing import Protocol

from common.bus.messages import DeviceState, PairLink


class OnGpu(Protocol):
    """What shared-device placement needs of an offered ID: the physical GPU it lives on.
    (A protocol rather than device_table's PluginDevice, so that the table may use this
    module without a cycle.)"""

    @property
    def gpu_id(self) -> str: ...

NVLINK_SCORE = 100
"""Per active NVLink between two GPUs (directly or through NVSwitches)."""

LEVEL_SCORE: dict[int, int] = {0: 60, 10: 50, 20: 40, 30: 30, 40: 20, 50: 10}
"""NVML topology level of the PCIe common ancestor -> score: same board, single switch,
multiple switches, host bridge, same NUMA node, across NUMA nodes."""

SAME_NUMA_SCORE = 20
OTHER_NUMA_SCORE = 10
"""Level unknown (-1, or a value NVML does not define): fall back on the NUMA nodes; 0
when either is unknown."""

MAX_EXACT = 16
"""Up to this many GPUs every subset is scored in advance and answers are exact."""

ENUM_LIMIT = 128
"""When at most this many subsets fit a request, score them one by one instead of
scanning the sorted tables (covers every request on 8 GPUs: C(8, 4) = 70)."""

PACKED = "packed"  # any other policy distributes


def pair_score(nvlinks: int, level: int, numa_a: int | None, numa_b: int | None) -> int:
    """The score of two GPUs being allocated together; never negative."""
    score = NVLINK_SCORE * max(nvlinks, 0)
    pcie = LEVEL_SCORE.get(level)
    if pcie is not None:
        return score + pcie
    if numa_a is None or numa_b is None:
        return score
    return score + (SAME_NUMA_SCORE if numa_a == numa_b else OTHER_NUMA_SCORE)


class Topology:
    """Pair scores of the node's GPUs and, for up to MAX_EXACT GPUs, every subset's score.

    Build it when the health state (devices, links) changes, never per request. MIG devices
    in `gpus` are skipped; a pair with no PairLink scores by NUMA alone; a pair given twice
    keeps its best score; links naming unknown GPUs are ignored.
    """

    def __init__(self, gpus: Sequence[DeviceState], links: Sequence[PairLink]) -> None:
        ids: list[str] = []
        index: dict[str, int] = {}
        numa: list[int | None] = []
        for gpu in gpus:
            if gpu.kind == "mig" or gpu.id in index:
                continue
            index[gpu.id] = len(ids)
            ids.append(gpu.id)
            numa.append(gpu.numa_node)
        n = len(ids)
        w = [[0 if i == j else pair_score(0, -1, numa[i], numa[j]) for j in range(n)] for i in range(n)]
        seen: set[tuple[int, int]] = set()
        for link in links:
            i, j = index.get(link.a), index.get(link.b)
            if i is None or j is None or i == j:
                continue
            score = pair_score(link.nvlinks, link.level, numa[i], numa[j])
            key = (min(i, j), max(i, j))
            if key in seen:
                score = max(score, w[i][j])
            seen.add(key)
            w[i][j] = w[j][i] = score
        self.ids: tuple[str, ...] = tuple(ids)
        self.index: dict[str, int] = index
        self.exact: bool = n <= MAX_EXACT
        self._w: tuple[tuple[int, ...], ...] = tuple(tuple(row) for row in w)
        self._full = (1 << n) - 1
        # Every pair scores the same (e.g. no topology known): every set of a size ties.
        self._uniform = len({w[i][j] for i in range(n) for j in range(i + 1, n)}) <= 1
        self._scores = array("q")  # subset mask -> total pair score
        self._by_size: list[array[int]] = []  # popcount -> masks, best score first, ties by GPU order
        if self.exact:
            self._build_tables(n)

    def _build_tables(self, n: int) -> None:
        # score(S | 1<<i) = score(S) + sum of w(i, j) for j in S, for every S below bit i;
        # each GPU's row sums are built by the same doubling. All list comprehensions: fast.
        scores = [0]
        for i in range(n):
            wi = self._w[i]
            row = [0]
            for j in range(i):
                wij = wi[j]
                row += [r + wij for r in row]
            scores += [s + r for s, r in zip(scores, row, strict=True)]
        # Ties by GPU order: of two sets, the one holding the lowest index of those they do
        # not share first. With bits reversed, that is the larger number.
        rev = [0]
        for i in range(n):
            bit = 1 << (n - 1 - i)
            rev += [r | bit for r in rev]
        keys = [(s << n) | r for s, r in zip(scores, rev, strict=True)]
        order = sorted(range(1 << n), key=keys.__getitem__, reverse=True)
        by_size: list[array[int]] = [array("H") for _ in range(n + 1)]
        for mask in order:
            by_size[mask.bit_count()].append(mask)
        self._scores = array("q", scores)
        self._by_size = by_size

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Memory held by the precomputed tables (pair matrix counted as 8 bytes a cell)."""
        tables = self._scores.itemsize * len(self._scores)
        tables += sum(a.itemsize * len(a) for a in self._by_size)
        return tables + 8 * len(self.ids) ** 2

    def pair(self, a: str, b: str) -> int:
        """The pair score of two IDs; 0 when either is unknown or they are the same."""
        i, j = self.index.get(a), self.index.get(b)
        return 0 if i is None or j is None else self._w[i][j]

    def score(self, ids: Iterable[str]) -> int:
        """Total pair score of a set of IDs (duplicates counted once, unknown IDs score 0)."""
        known = sorted({self.index[d] for d in ids if d in self.index})
        return sum(self._w[i][j] for x, i in enumerate(known) for j in known[x + 1 :])


def _dedup(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def preferred_gpus(
    topo: Topology,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    *,
    enum_limit: int = ENUM_LIMIT,
) -> list[str]:
    """The `size` GPUs, must_include among them, with the highest total pair score.

    Exact (ties by `available` order) when the topology has at most MAX_EXACT GPUs, greedy
    beyond. must_include first, then the others in `available` order. Never raises:
    size <= len(must_include) answers must_include; a size beyond what there is answers
    everything. `enum_limit` only tunes speed (tests use it to force either strategy).
    """
    must = _dedup(must_include)
    if size <= len(must):
        return must
    must_set = set(must)
    free = [d for d in _dedup(available) if d not in must_set]
    room = size - len(must)
    if room >= len(free):
        return must + free
    picked = _exact(topo, must, free, room, enum_limit) if topo.exact else _greedy(topo, must, free, room)
    return must + [d for d in free if d in picked]


def _exact(topo: Topology, must: list[str], free: list[str], room: int, enum_limit: int) -> set[str]:
    index = topo.index
    must_mask = 0
    for d in must:
        i = index.get(d)
        if i is not None:
            must_mask |= 1 << i
    known = [d for d in free if d in index]
    unknown = [d for d in free if d not in index]
    if not unknown:
        _, mask = _best_known(topo, must_mask, [index[d] for d in known], room, enum_limit)
        return {d for d in known if mask >> index[d] & 1}
    # Unknown IDs score 0 with everything: any j of them might as well be the first j
    # listed. Fewer unknown (more known) never scores less, so stop at the first drop.
    pos = {d: p for p, d in enumerate(free)}
    best: tuple[int, list[int], set[str]] | None = None
    for j in range(max(0, room - len(known)), min(room, len(unknown)) + 1):
        score, mask = _best_known(topo, must_mask, [index[d] for d in known], room - j, enum_limit)
        if best is not None and score < best[0]:
            break
        members = {d for d in known if mask >> index[d] & 1} | set(unknown[:j])
        key = sorted(pos[d] for d in members)
        if best is None or score > best[0] or key < best[1]:
            best = (score, key, members)
    assert best is not None  # the range is never empty: room < len(free)
    return best[2]


def _best_known(topo: Topology, must_mask: int, known: list[int], room: int, enum_limit: int) -> tuple[int, int]:
    """(score, mask) of the best `room` of `known` (GPU indices, in `available` order) added
    to `must_mask`; ties to the set whose members come first in `known`."""
    scores = topo._scores
    bits = [1 << i for i in known]
    if room <= 0 or room >= len(bits):
        mask = must_mask | sum(bits[: max(room, 0)])
        return scores[mask], mask
    if topo._uniform:
        mask = must_mask | sum(bits[:room])  # all tie: the first listed
        return scores[mask], mask
    if comb(len(bits), room) <= enum_limit:
        # combinations() yields in `available` order and max() keeps the first best.
        best = max(combinations(bits, room), key=lambda c: scores[must_mask | sum(c)])
        mask = must_mask | sum(best)
        return scores[mask], mask
    bad = topo._full ^ (must_mask | sum(bits))
    masks = iter(topo._by_size[must_mask.bit_count() + room])
    for first in masks:
        if not first & bad and (first & must_mask) == must_mask:
            break
    top = scores[first]
    if all(a < b for a, b in pairwise(known)):
        return top, first  # `available` lists these GPUs in index order: the table's tie order
    ties = [first]
    for mask in masks:
        if scores[mask] != top:
            break
        if not mask & bad and (mask & must_mask) == must_mask:
            ties.append(mask)
    if len(ties) == 1:
        return top, first
    # Weight each GPU by its place in `available` (earlier = heavier bit): the best tie
    # has the largest total. Summed per byte of the mask.
    weight = dict.fromkeys(range(MAX_EXACT), 0)
    for p, i in enumerate(known):
        weight[i] = 1 << (len(known) - 1 - p)
    lo, hi = [0], [0]
    for b in range(8):
        lo += [x + weight[b] for x in lo]
        hi += [x + weight[b + 8] for x in hi]
    return top, max(ties, key=lambda m: lo[m & 255] + hi[m >> 8])


def _greedy(topo: Topology, must: list[str], free: list[str], room: int) -> set[str]:
    """From must_include, add the GPU that gains most, `room` times; ties by `available` order."""
    w = topo._w
    idx = [topo.index.get(d) for d in free]
    gain = [0] * len(free)
    taken = [False] * len(free)

    def add(i: int | None) -> None:
        if i is None:
            return
        wi = w[i]
        for c, ic in enumerate(idx):
            if ic is not None:
                gain[c] += wi[ic]

    for d in must:
        add(topo.index.get(d))
    picked: set[str] = set()
    for _ in range(room):
        best, best_gain = -1, -1
        for c, g in enumerate(gain):
            if not taken[c] and g > best_gain:
                best, best_gain = c, g
        taken[best] = True
        picked.add(free[best])
        add(idx[best])
    return picked


def preferred_shared(
    devices: Mapping[str, OnGpu],
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    policy: str,
) -> list[str]:
    """Time-sliced replicas and MIG devices: spread over (`distributed`) or packed onto
    (`packed`) physical GPUs.

    Replicas in use on a GPU: its IDs in `devices` that are not `available`, plus those
    chosen so far. `distributed` picks from the GPU with the fewest in use, `packed` from
    the one with the most that still has one available; ties (and the ID within the GPU)
    by `available` order. An unknown policy counts as distributed. Answers must_include
    first, then the picks in the order made. Never raises: sizes as `preferred_gpus`;
    IDs not in `devices` belong to the GPU named before "::" (their whole ID otherwise).
    """
    chosen = _dedup(must_include)
    if size <= len(chosen):
        return chosen
    chosen_set = set(chosen)
    avail = _dedup(available)
    avail_set = set(avail)
    free = [d for d in avail if d not in chosen_set]
    if size - len(chosen) >= len(free):
        return chosen + free

    def gpu_of(d: str) -> str:
        dev = devices.get(d)
        return dev.gpu_id if dev is not None else d.split("::", 1)[0]

    in_use: dict[str, int] = {}
    for d, dev in devices.items():
        if d not in avail_set or d in chosen_set:
            in_use[dev.gpu_id] = in_use.get(dev.gpu_id, 0) + 1
    for d in chosen:
        if d not in devices:
            g = gpu_of(d)
            in_use[g] = in_use.get(g, 0) + 1
    queues: dict[str, deque[str]] = {}
    for d in free:
        queues.setdefault(gpu_of(d), deque()).append(d)
    pos = {d: p for p, d in enumerate(free)}
    sign = -1 if policy == PACKED else 1
    while len(chosen) < size:
        gpu = min(
            (g for g, q in queues.items() if q),
            key=lambda g: (sign * in_use.get(g, 0), pos[queues[g][0]]),
        )
        chosen.append(queues[gpu].popleft())
        in_use[gpu] = in_use.get(gpu, 0) + 1
    return chosen
