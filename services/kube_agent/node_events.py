"""Which Events to write, and when: after client-go's EventCorrelator (tools/record/events_cache.go),
as pure code, with the differences said below. No sockets, no clock of its own: `now` is monotonic
seconds, given by the caller (tests step it).

As client-go, an occurrence goes through
- aggregation: of the occurrences that differ only by message (same type and reason) within
  AGGREGATE_S of each other, AGGREGATE_MAX - 1 distinct messages get their own Events; from the
  AGGREGATE_MAX-th distinct message on, a message not among them updates one Event whose message
  says "(combined from similar events): <the latest>" (client-go's maxEvents 10 in 600 s: at most
  ten Events per reason). One difference: having combined a message, client-go forgets an arbitrary
  one of those it holds (sets.PopAny), so that which messages keep their own Events, and whether a
  new one later gets its own, varies from run to run; here the first nine always keep theirs and
  every other message is combined, until the window lapses;
- counting: an occurrence of an Event already written (same type, reason and message) is a PATCH of
  its count and lastTimestamp, not a new Event;
- a token bucket per source and object, which client-go applies to every event about the Node.

The other difference: client-go's bucket (25, then one every 5 minutes) drops what it refuses, so a storm's
count stays at what the burst wrote, and one bucket for the whole Node lets an XID storm on one GPU
silence another GPU's failure. Here the bucket is per device and reason (BURST, then one per
REFILL_S), and what it holds back is not dropped but waits, coalesced: each Event key has at most one
pending write, which carries the latest count when a token comes. 10 000 XIDs on a GPU in a minute
are one Event written about BURST + 60 / REFILL_S times, its count right at the end.

Happenings that supersede each other (a device Unhealthy, then recovered) share a slot: while one
waits (the API is away), a newer one replaces it, so a returning API gets each device's latest news,
not a replay of every transition. Every table is bounded: KEYS records (client-go's LRU size),
PENDING waiting writes (the oldest dropped, counted), buckets per key with the records.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Final

from services.kube_agent.node_health import Occurrence

KEYS: Final = 4096  # client-go's maxLruCacheEntries
AGGREGATE_MAX: Final = 10  # client-go's defaultAggregateMaxEvents ...
AGGREGATE_S: Final = 600.0  # ... within defaultAggregateIntervalInSeconds
COMBINED: Final = "(combined from similar events): "
BURST: Final = 5  # writes of one device and reason at once (one fault's Unhealthy, its XID, a few repeats)
REFILL_S: Final = 10.0  # then one write per this long: a storm's count is at most this stale
PENDING: Final = 256  # writes waiting for the API or a token; past it the oldest is dropped


@dataclass
class Record:
    """One Event as this agent wrote it, or will."""

    name: str
    type: str
    reason: str
    message: str
    device: str
    count: int
    first: float  # unix times, as the Event's firstTimestamp and lastTimestamp
    last: float
    created: bool = False  # the API holds it: the next write is a PATCH


@dataclass(frozen=True)
class Write:
    """One request to make: create the Event, or patch its count, lastTimestamp and message."""

    key: str
    name: str
    create: bool
    type: str
    reason: str
    message: str
    count: int
    first: float
    last: float
    device: str
    slot: str  # where it waited: a failed write goes back there unless a newer one took it


@dataclass
class _Bucket:
    tokens: float
    at: float


class Correlator:
    def __init__(self, node: str, burst: int = BURST, refill_s: float = REFILL_S, keys: int = KEYS,
                 pending: int = PENDING) -> None:
        self.node = node
        self._burst, self._refill_s, self._keys, self._max_pending = burst, refill_s, keys, pending
        self._records: OrderedDict[str, Record] = OrderedDict()  # LRU by key
        self._aggregates: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()  # (type, reason) -> last, messages
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # (device, reason) -> bucket
        self._pending: OrderedDict[str, str] = OrderedDict()  # slot -> key, oldest first
        self._names = itertools.count()
        self.dropped = 0  # writes given up: pushed out of a full queue, or refused by the API

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- occurrences ------------------------------------------------------------------
    def observe(self, occ: Occurrence, now: float) -> None:
        """Counts `occ` into its Event and queues the Event's write in its slot."""
        key, message = self._aggregate(occ, now)
        record = self._records.get(key)
        if record is None:
            record = Record(self._name(), occ.type, occ.reason, message, occ.device, 0, occ.time, occ.time)
            self._records[key] = record
            while len(self._records) > self._keys:
                self._records.popitem(last=False)
        self._records.move_to_end(key)
        record.count += 1
        record.last = max(record.last, occ.time)
        record.message = message
        slot = occ.slot or key
        self._pending.pop(slot, None)
        self._pending[slot] = key
        while len(self._pending) > self._max_pending:
            self._pending.popitem(last=False)
            self.dropped += 1

    def _aggregate(self, occ: Occurrence, now: float) -> tuple[str, str]:
        """The Event key and message: the occurrence's own while its message is one of the first
        AGGREGATE_MAX - 1 distinct ones of its reason within AGGREGATE_S of each other, else its
        reason's combined Event."""
        group = f"{occ.type}\x00{occ.reason}"
        last, messages = self._aggregates.get(group, (now, set()))
        if now - last > AGGREGATE_S:
            messages = set()
        if len(messages) < AGGREGATE_MAX - 1:
            messages.add(occ.message)
        self._aggregates[group] = (now, messages)
        self._aggregates.move_to_end(group)
        while len(self._aggregates) > self._keys:
            self._aggregates.popitem(last=False)
        if occ.message not in messages:
            return f"{group}\x00*", COMBINED + occ.message
        return f"{group}\x00{occ.message}", occ.message

    def _name(self) -> str:
        # As the kubelet names its Events: the object's name and a unique hex suffix (time in ns,
        # made unique within this process by a counter).
        return f"{self.node}.{time.time_ns() + next(self._names):x}"

    # -- writes -----------------------------------------------------------------------
    def take(self, now: float) -> Write | None:
        """The oldest pending write whose device and reason have a token (spent), or None."""
        for slot, key in self._pending.items():
            record = self._records.get(key)
            if record is None:  # pushed out of the records by newer keys: nothing left to write
                del self._pending[slot]
                return self.take(now)
            bucket = self._bucket(record, now)
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                del self._pending[slot]
                return Write(key, record.name, not record.created, record.type, record.reason, record.message,
                             record.count, record.first, record.last, record.device, slot)
        return None

    def next_at(self, now: float) -> float | None:
        """When a pending write will have a token (now or later); None when nothing is pending."""
        soonest = None
        for key in self._pending.values():
            record = self._records.get(key)
            if record is None:
                return now
            bucket = self._bucket(record, now)
            at = now if bucket.tokens >= 1 else now + (1 - bucket.tokens) * self._refill_s
            soonest = at if soonest is None else min(soonest, at)
        return soonest

    def _bucket(self, record: Record, now: float) -> _Bucket:
        key = f"{record.device}\x00{record.reason}"
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self._burst), now)
            while len(self._buckets) > self._keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        bucket.tokens = min(float(self._burst), bucket.tokens + (now - bucket.at) / self._refill_s)
        bucket.at = now
        return bucket

    def written(self, write: Write) -> None:
        """The API holds the Event (created, or already there)."""
        record = self._records.get(write.key)
        if record is not None and record.name == write.name:
            record.created = True

    def failed(self, write: Write, now: float) -> None:
        """The write did not happen and is to be tried again: queued where it was unless a newer
        one took its slot meanwhile, and its token given back (the API's absence is not a storm)."""
        record = self._records.get(write.key)
        if record is not None:
            self._bucket(record, now).tokens += 1
            if write.slot not in self._pending:
                self._pending[write.slot] = write.key
                self._pending.move_to_end(write.slot, last=False)

    def again(self, write: Write) -> None:
        """Written, but what the API holds may be older than the record: one more write, queued."""
        if write.key in self._records and write.slot not in self._pending:
            self._pending[write.slot] = write.key

    def gone(self, write: Write) -> Write:
        """A PATCH found no Event (expired: the API server keeps Events an hour): create it again."""
        record = self._records.get(write.key)
        if record is not None and record.name == write.name:
            record.created = False
        return replace(write, create=True)

    def refused(self, write: Write) -> None:
        """The API refused the Event itself (400, 422): the same body would be refused again."""
        self.dropped += 1
        self._records.pop(write.key, None)
