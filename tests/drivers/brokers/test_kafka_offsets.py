"""What a Kafka source commits, skips and retries when records are refused for now
(``payler/drivers/brokers/kafka_offsets.py``); the driver's own test on tansu is in
``test_kafka.py``."""

from __future__ import annotations

from payler.backoff import Backoff
from payler.drivers.brokers.kafka_offsets import Rewinds, Settled

P = ("topic", 0)
Q = ("topic", 1)


def rewinds() -> Rewinds:
    return Rewinds(Backoff(base_s=1.0, max_s=8.0, jitter=0))


def test_a_batch_taken_whole_is_committed_to_its_end_and_leaves_nothing_behind() -> None:
    ledger = rewinds()
    assert ledger.settle(P, [10, 11, 12], set(), now_ms=0) == Settled(13)
    assert len(ledger) == 0 and ledger.next_due_ms() is None


def test_the_commit_stops_at_the_first_refused_record_and_what_followed_is_skipped() -> None:
    ledger = rewinds()
    settled = ledger.settle(P, [10, 11, 12, 13], {11, 13}, now_ms=1000)
    assert settled == Settled(11, rewind=True, resume_at_ms=2000)
    # Read again from 11: 12 was taken already, 11 and 13 were not.
    assert [o for o in (11, 12, 13) if not ledger.handled(P, o)] == [11, 13]
    # Another partition is not concerned.
    assert not ledger.handled(Q, 12)
    assert ledger.due(1999) == [] and ledger.due(2000) == [P] and ledger.due(5000) == []

    # The second round takes 11 but refuses 13 again: the commit moves up to 13.
    assert ledger.settle(P, [11, 12, 13, 14], {13}, now_ms=3000) == Settled(
        13,
        rewind=True,
        resume_at_ms=5000,  # the second failure in a row: twice the backoff
    )
    assert not ledger.handled(P, 13) and ledger.handled(P, 14) and not ledger.handled(P, 12)
    # Then 13 goes: everything is committed, nothing is kept.
    assert ledger.settle(P, [13, 14, 15], set(), now_ms=6000) == Settled(16)
    assert len(ledger) == 0


def test_a_shorter_batch_after_the_rewind_keeps_the_skips_beyond_it() -> None:
    ledger = rewinds()
    ledger.settle(P, [0, 1, 2, 3, 4, 5], {0}, now_ms=0)
    assert ledger.settle(P, [0, 1, 2], set(), now_ms=2000) == Settled(3)
    assert [o for o in range(6) if ledger.handled(P, o)] == [3, 4, 5]
    assert ledger.settle(P, [3, 4, 5, 6], set(), now_ms=2000) == Settled(7)
    assert len(ledger) == 0


def test_the_backoff_grows_to_its_cap_and_starts_over_after_a_success() -> None:
    ledger = rewinds()
    waits = []
    now = 0
    for _ in range(6):
        settled = ledger.settle(P, [7], {7}, now_ms=now)
        assert settled.resume_at_ms is not None
        waits.append(settled.resume_at_ms - now)
        now = settled.resume_at_ms
    assert waits == [1000, 2000, 4000, 8000, 8000, 8000]
    ledger.settle(P, [7], set(), now_ms=now)
    assert ledger.settle(P, [8], {8}, now_ms=now).resume_at_ms == now + 1000


def test_forgotten_partitions_are_handed_over_again_and_not_resumed() -> None:
    ledger = rewinds()
    ledger.settle(P, [1, 2, 3], {1}, now_ms=0)
    ledger.settle(Q, [1, 2, 3], {2}, now_ms=0)
    assert ledger.next_due_ms() == 1000
    ledger.forget([P])
    assert not ledger.handled(P, 2) and ledger.handled(Q, 3)
    assert ledger.due(10_000) == [Q]
