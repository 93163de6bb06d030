"""Kafka has no negative acknowledgement: what a source does with a record refused for now.

A consumer's committed offset says "everything before this is handled". When the handler refuses
a record *for now* (its destination is full, say), the partition's commit must stop at that
record — and the records after it, which the handler took, must not be handed over again each
time the refused one is retried (that was a retry storm: every later record of the partition
re-published on each round). So, per partition, :class:`Rewinds` keeps:

- the offsets above the commit point that were handled already: when the consumer reads them
  again (after seeking back to a refused record), they are skipped, not handed over;
- how many times in a row the partition was rewound: the refused record is taken again only
  after a backoff (:class:`~payler.backoff.Backoff`), the partition paused meanwhile.

The driver pauses the partition and seeks back to the first refused record; the other partitions
flow on. The commit never passes a record not yet handled; what is skipped is bounded by one
batch (the records after the refused one that came with it). What is forgotten — at a
rebalance, a restart — is only handed over again: at least once, never lost.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from payler.backoff import Backoff


@dataclass(frozen=True, slots=True)
class Settled:
    """What to do with a partition after a batch: commit ``commit`` (the first record not yet
    handled, or the end of the batch); when ``rewind``, seek back to it and pause until
    ``resume_at_ms``."""

    commit: int
    rewind: bool = False
    resume_at_ms: int | None = None


@dataclass(slots=True)
class _Partition:
    #: Offsets at or above the commit point that were handled (taken, or refused for good).
    handled: set[int] = field(default_factory=set)
    #: Rewinds in a row: the exponent of the next backoff.
    failures: int = 0
    resume_at_ms: int | None = None


class Rewinds:
    """Per partition: handled offsets above the commit point, and backoffs (module docstring)."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self._partitions: dict[Hashable, _Partition] = {}

    def handled(self, partition: Hashable, offset: int) -> bool:
        """Whether the record at ``offset`` was handled already: skip it."""
        state = self._partitions.get(partition)
        return state is not None and offset in state.handled

    def settle(
        self, partition: Hashable, offsets: Sequence[int], refused: set[int], now_ms: int
    ) -> Settled:
        """Record a batch of ``partition`` (``offsets`` in order, skipped ones included), of
        which the handler refused ``refused`` for now; say what to commit and whether to rewind.
        """
        state = self._partitions.setdefault(partition, _Partition())
        first_refused = next((o for o in offsets if o in refused), None)
        commit = offsets[-1] + 1 if first_refused is None else first_refused
        state.handled = {o for o in state.handled.union(offsets) - refused if o >= commit}
        if first_refused is None:
            state.failures = 0
            state.resume_at_ms = None
            if not state.handled:
                del self._partitions[partition]
            return Settled(commit)
        delay_ms = round(self.backoff.delay_s(state.failures) * 1000)
        state.failures += 1
        state.resume_at_ms = now_ms + delay_ms
        return Settled(commit, rewind=True, resume_at_ms=state.resume_at_ms)

    def due(self, now_ms: int) -> list[Hashable]:
        """The paused partitions whose backoff is over (each returned once): resume them."""
        ready = [
            p
            for p, state in self._partitions.items()
            if state.resume_at_ms is not None and state.resume_at_ms <= now_ms
        ]
        for partition in ready:
            self._partitions[partition].resume_at_ms = None
        return ready

    def next_due_ms(self) -> int | None:
        """When the next paused partition is due, if any is paused."""
        times = [s.resume_at_ms for s in self._partitions.values() if s.resume_at_ms is not None]
        return min(times, default=None)

    def forget(self, partitions: Iterable[Hashable]) -> None:
        """Drop what is known of ``partitions`` (revoked, or their topic was recreated)."""
        for partition in partitions:
            self._partitions.pop(partition, None)

    def __len__(self) -> int:
        """How many partitions have state (paused, or with handled offsets kept)."""
        return len(self._partitions)
