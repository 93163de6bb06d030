"""The spool storage contract (``payler/drivers/storages/base.py``), run against every backend.

:class:`StorageContract` holds the tests; each ``Test*Storage`` subclass provides a connected
``storage`` fixture for one backend. Times are explicit ``now_ms`` values from a fake clock: no test
waits for anything.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from payler.clock import FakeClock
from payler.drivers.storages import storage_from_url
from payler.drivers.storages.base import Claim, SpoolStorage, Stored
from payler.drivers.storages.memory import MemoryStorage
from payler.drivers.storages.mongodb import MongoStorage
from payler.drivers.storages.postgres import PostgresStorage
from payler.drivers.storages.redis import RedisStorage
from payler.drivers.storages.sqlite import SQLiteStorage
from payler.errors import ConfigError
from payler.identity import content_digest, derived_id
from payler.payload import MessageProperties, Payload
from tests.assertions import assert_same
from tests.conftest import REDIS_URL

T0 = 1_700_000_000_000
LEASE = 10_000


def payload(payload_id: str, due_ms: int, destination: str = "out", **fields: Any) -> Payload:
    fields.setdefault("body", f"body of {payload_id}".encode())
    return Payload(id=payload_id, destination=destination, due_ms=due_ms, created_ms=T0, **fields)


def ids(items: list[Claim] | list[Payload]) -> list[str]:
    return [c.payload.id if isinstance(c, Claim) else c.id for c in items]


class StorageContract:
    """Every storage passes these; a subclass provides the ``storage`` fixture."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(T0)

    @pytest.fixture
    async def twin(self, storage: SpoolStorage, clock: FakeClock) -> AsyncIterator[SpoolStorage]:
        """A second storage instance on the same URL (another process, as far as it knows)."""
        async with storage_from_url(storage.url, clock=clock) as other:
            yield other

    # -- store -------------------------------------------------------------------------------------

    async def write_without_digest(self, storage: SpoolStorage, stored: Payload) -> None:
        """Store ``stored`` as a payler without content digests did (each backend's way)."""
        raise NotImplementedError

    async def test_store_is_idempotent_by_id(self, storage: SpoolStorage) -> None:
        assert await storage.store([payload("a", T0), payload("b", T0)]) == 2
        # Redelivered: the same message, scheduled anew (its delay counted from its receipt).
        again = payload("a", T0 + 5)
        assert await storage.store([again, payload("c", T0)]) == 1
        assert await storage.store([payload("c", T0), payload("c", T0)]) == 0
        stored = await storage.get("a")
        assert stored is not None
        assert (stored.body, stored.due_ms) == (b"body of a", T0)
        assert await storage.count() == 3

    async def test_a_reused_id_with_other_content_is_stored_under_a_derived_id(
        self, storage: SpoolStorage
    ) -> None:
        # A producer reusing a message id for another message: not a duplicate, never dropped.
        first = payload("a", T0)
        reuse = payload("a", T0 + 5, body=b"another message")
        derived = derived_id("a", content_digest(reuse))
        assert await storage.store_batch([first]) == Stored(new=["a"])
        assert await storage.store_batch([reuse]) == Stored(new=[derived], renamed={"a": derived})
        got, original = await storage.get(derived), await storage.get("a")
        assert got is not None and (got.id, got.body, got.due_ms) == (derived, reuse.body, T0 + 5)
        assert original is not None and original.body == first.body
        # Either one redelivered is recognised: neither is stored twice.
        assert await storage.store_batch([reuse, first]) == Stored(duplicates=["a", "a"])
        assert ids(await storage.claim_due(T0 + 5, 10, LEASE)) == ["a", derived]

    async def test_two_messages_with_one_id_in_one_batch_are_both_stored(
        self, storage: SpoolStorage
    ) -> None:
        one, two = payload("x", T0, body=b"one"), payload("x", T0, body=b"two")
        derived = derived_id("x", content_digest(two))
        stored = await storage.store_batch([one, two, one, two])
        assert stored == Stored(new=["x", derived], duplicates=["x", "x"], renamed={"x": derived})
        assert sorted(c.payload.body for c in await storage.claim_due(T0, 10, LEASE)) == [
            b"one",
            b"two",
        ]

    async def test_a_reused_id_is_told_apart_from_dead_and_delivered_entries(
        self, storage: SpoolStorage
    ) -> None:
        await storage.store([payload("dead", T0), payload("done", T0)])
        dead, done = await storage.claim_due(T0, 10, LEASE)
        assert await storage.dead_letter(dead, "unroutable")
        assert await storage.ack([done]) == 1
        # The same messages again (redelivered): duplicates, as always.
        assert await storage.store([payload("dead", T0), payload("done", T0)]) == 0
        # Other messages under these ids: new ones, delivered in their turn.
        others = [payload("dead", T0, body=b"new 1"), payload("done", T0, body=b"new 2")]
        stored = await storage.store_batch(others)
        assert set(stored.renamed) == {"dead", "done"} and stored.new == list(
            stored.renamed.values()
        )
        claimed = await storage.claim_due(T0, 10, LEASE)
        assert sorted(c.payload.body for c in claimed) == [b"new 1", b"new 2"]
        assert await storage.ack(claimed) == 2
        assert await storage.store(others) == 0  # and their tombstones keep their copies out

    async def test_headers_properties_and_key_are_content_a_delivery_count_is_not(
        self, storage: SpoolStorage
    ) -> None:
        first = payload("m", T0, headers={"h": 1}, properties=MessageProperties(priority=1))
        await storage.store([first])
        # RabbitMQ's quorum queues count redeliveries in a header: still the same message.
        redelivered = first.model_copy(update={"headers": {"h": 1, "x-delivery-count": 3}})
        assert await storage.store_batch([redelivered]) == Stored(duplicates=["m"])
        variants = [
            first.model_copy(update={"headers": {"h": 2}}),
            first.model_copy(update={"properties": MessageProperties(priority=2)}),
            first.model_copy(update={"key": b"k"}),
        ]
        for variant in variants:
            derived = derived_id("m", content_digest(variant))
            assert await storage.store_batch([variant]) == Stored([derived], [], {"m": derived})
        assert await storage.count() == 4

    async def test_an_entry_stored_without_a_digest_counts_as_the_same_message(
        self, storage: SpoolStorage
    ) -> None:
        # Entries of a spool written before digests were kept: a message with their id is
        # taken for a redelivery, as payler always did (no duplicate delivery after an upgrade).
        await self.write_without_digest(storage, payload("old", T0))
        await self.write_without_digest(storage, payload("older", T0))
        other = payload("old", T0, body=b"other content")
        assert await storage.store_batch([other]) == Stored(duplicates=["old"])
        claims = await storage.claim_due(T0, 10, LEASE)
        assert [c.payload.body for c in claims] == [b"body of old", b"body of older"]
        assert await storage.ack(claims[:1]) == 1
        assert await storage.dead_letter(claims[1], "bad")
        assert await storage.store([other, payload("older", T0, body=b"other")]) == 0

    async def test_a_caller_may_say_what_makes_two_payloads_the_same(
        self, storage: SpoolStorage
    ) -> None:
        # Ids that are idempotency keys: the same key is one operation, whatever it carries.
        key = ["digest of the key"]
        assert await storage.store_batch([payload("k", T0)], digests=key) == Stored(new=["k"])
        other = payload("k", T0, body=b"another body, the same key")
        assert await storage.store_batch([other], digests=key) == Stored(duplicates=["k"])
        assert await storage.count() == 1
        with pytest.raises(ValueError, match="one digest per payload"):
            await storage.store_batch([other], digests=[])

    async def test_parking_under_a_reused_id_keeps_both(self, storage: SpoolStorage) -> None:
        await storage.store([payload("p", T0)])
        other = payload("p", T0, body=b"refused everywhere")
        [parked] = await storage.park([(other, "the dead-letter queue refused it")])
        assert parked == derived_id("p", content_digest(other))
        [again] = await storage.park([(other, "refused again")])  # the same message: beside it
        assert again.startswith("p!dead-")
        assert (await storage.count(), await storage.count(state="dead")) == (1, 2)

    # -- limits --------------------------------------------------------------------------------

    async def test_every_storage_has_a_body_size_limit_and_it_can_be_set(
        self, storage: SpoolStorage
    ) -> None:
        hard = storage.hard_max_body_bytes
        assert storage.max_body_bytes is not None
        assert 0 < storage.max_body_bytes <= (hard or storage.max_body_bytes)
        assert storage_from_url(storage.url, max_body_bytes=1234).max_body_bytes == 1234
        for wrong in [0, -1] + ([] if hard is None else [hard + 1]):
            with pytest.raises(ConfigError, match="max_body_bytes"):
                storage_from_url(storage.url, max_body_bytes=wrong)

    async def test_an_empty_spool_admits_a_batch(self, storage: SpoolStorage) -> None:
        assert await storage.admission(1024) is None

    async def test_store_leaves_a_dead_entry_dead(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0)])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.dead_letter(claim, "bad")
        assert await storage.store([payload("a", T0)]) == 0
        assert (await storage.count(), await storage.count(state="dead")) == (0, 1)

    async def test_store_of_nothing(self, storage: SpoolStorage) -> None:
        assert await storage.store([]) == 0

    async def test_a_delivered_id_keeps_its_copies_out_for_the_dedupe_window(
        self, storage: SpoolStorage
    ) -> None:
        # A source message redelivered after its first copy was already delivered (a crash
        # between the spool write and the source's acknowledgement) must not spool again.
        await storage.store([payload("a", T0)])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.ack([claim]) == 1
        assert await storage.store([payload("a", T0)]) == 0
        assert await storage.get("a") is None
        assert (await storage.count(), await storage.count(state="dead")) == (0, 0)
        assert (await storage.list()).items == []
        assert not await storage.cancel("a")
        assert not await storage.reschedule("a", T0)
        assert await storage.claim_due(T0 + LEASE, 10, LEASE) == []
        assert await storage.next_visible_ms() is None
        # Once the window is over (and tombstones purged), the id is free again.
        after = storage.clock.now_ms() + storage.dedupe_window_ms + 1
        assert await storage.claim_due(after, 10, LEASE) == []  # purges expired tombstones
        assert await storage.store([payload("a", T0)]) == 1
        assert ids(await storage.claim_due(after, 10, LEASE)) == ["a"]

    # -- claim_due ---------------------------------------------------------------------------------

    async def test_claim_earliest_due_first_within_limit(self, storage: SpoolStorage) -> None:
        dues = {"e": T0 + 4, "b": T0 + 1, "d": T0 + 3, "a": T0 + 1, "c": T0 + 2}
        await storage.store([payload(i, due) for i, due in dues.items()])
        first = await storage.claim_due(T0 + 10, 3, LEASE)
        assert ids(first) == ["a", "b", "c"]  # due order, ties by id
        assert ids(await storage.claim_due(T0 + 10, 3, LEASE)) == ["d", "e"]
        assert await storage.claim_due(T0 + 10, 3, LEASE) == []

    async def test_claim_takes_only_visible_entries(self, storage: SpoolStorage) -> None:
        await storage.store([payload("now", T0), payload("later", T0 + 1), payload("past", T0 - 1)])
        assert ids(await storage.claim_due(T0, 10, LEASE)) == ["past", "now"]
        assert ids(await storage.claim_due(T0 + 1, 10, LEASE)) == ["later"]

    async def test_claim_rejects_bad_arguments(self, storage: SpoolStorage) -> None:
        with pytest.raises(ValueError, match="positive"):
            await storage.claim_due(T0, 0, LEASE)
        with pytest.raises(ValueError, match="positive"):
            await storage.claim_due(T0, 1, 0)

    async def test_claimed_entry_comes_back_when_the_lease_expires(
        self, storage: SpoolStorage
    ) -> None:
        await storage.store([payload("a", T0)])
        [first] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.claim_due(T0 + LEASE - 1, 10, LEASE) == []
        [second] = await storage.claim_due(T0 + LEASE, 10, LEASE)
        assert second.payload.id == "a"
        assert second.token != first.token

    async def test_claim_returns_the_payload_as_stored(self, storage: SpoolStorage) -> None:
        stored = payload("a", T0, source="in")
        await storage.store([stored])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert claim.payload == stored

    # -- ack ---------------------------------------------------------------------------------------

    async def test_ack_deletes_held_entries(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0), payload("b", T0), payload("c", T0 + 1)])
        claims = await storage.claim_due(T0, 10, LEASE)
        assert await storage.ack(claims) == 2
        assert await storage.get("a") is None
        assert await storage.get("b") is None
        assert await storage.get("c") is not None
        assert await storage.ack(claims) == 0
        assert await storage.ack([]) == 0

    async def test_stale_ack_deletes_nothing(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0), payload("b", T0)])
        stale = await storage.claim_due(T0, 10, LEASE)
        fresh = await storage.claim_due(T0 + LEASE, 1, LEASE)  # "a" re-claimed by another
        assert ids(fresh) == ["a"]
        assert await storage.ack(stale) == 1  # only "b", still held by the first claim
        assert await storage.get("a") is not None
        assert await storage.ack(fresh) == 1
        assert await storage.get("a") is None

    # -- retry -------------------------------------------------------------------------------------

    async def test_retry_reschedules_with_attempts_and_reason(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0)])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.retry(claim, T0 + 5_000, "broker down")
        stored = await storage.get("a")
        assert stored is not None
        assert (stored.due_ms, stored.attempts, stored.last_error) == (T0 + 5_000, 1, "broker down")
        assert await storage.next_visible_ms() == T0 + 5_000
        assert await storage.claim_due(T0 + 4_999, 10, LEASE) == []
        [again] = await storage.claim_due(T0 + 5_000, 10, LEASE)
        assert (again.payload.attempts, again.payload.last_error) == (1, "broker down")
        assert await storage.ack([claim]) == 0  # the retried claim's token is spent
        assert await storage.retry(again, T0 + 6_000, "still down")
        stored = await storage.get("a")
        assert stored is not None
        assert (stored.attempts, stored.last_error) == (2, "still down")

    async def test_an_uncounted_retry_keeps_the_attempts(self, storage: SpoolStorage) -> None:
        """A retry after an outage (``counted=False``) reschedules without using up an attempt."""
        await storage.store([payload("a", T0)])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.retry(claim, T0 + 1_000, "refused")
        [again] = await storage.claim_due(T0 + 1_000, 10, LEASE)
        assert await storage.retry(again, T0 + 2_000, "connection lost", counted=False)
        stored = await storage.get("a")
        assert stored is not None
        assert (stored.due_ms, stored.attempts, stored.last_error) == (
            T0 + 2_000,
            1,
            "connection lost",
        )
        [third] = await storage.claim_due(T0 + 2_000, 10, LEASE)
        assert third.payload.attempts == 1

    async def test_retry_and_dead_letter_with_a_stale_token_do_nothing(
        self, storage: SpoolStorage
    ) -> None:
        await storage.store([payload("a", T0)])
        [stale] = await storage.claim_due(T0, 10, LEASE)
        [fresh] = await storage.claim_due(T0 + LEASE, 10, LEASE)
        assert not await storage.retry(stale, T0, "late")
        assert not await storage.dead_letter(stale, "late")
        stored = await storage.get("a")
        assert stored is not None
        assert (stored.attempts, stored.last_error) == (0, None)
        assert await storage.count(state="dead") == 0
        assert await storage.claim_due(T0 + LEASE, 10, LEASE) == []  # still leased to `fresh`
        assert await storage.ack([fresh]) == 1
        assert not await storage.retry(fresh, T0, "gone")
        assert not await storage.dead_letter(fresh, "gone")

    # -- dead_letter -------------------------------------------------------------------------------

    async def test_dead_letter_parks_the_entry(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0), payload("b", T0)])
        claims = await storage.claim_due(T0, 10, LEASE)
        assert await storage.dead_letter(claims[0], "unroutable")
        assert await storage.ack(claims) == 1  # "b" only: a dead entry is no longer held
        assert await storage.next_visible_ms() is None
        assert (await storage.count(), await storage.count(state="dead")) == (0, 1)
        page = await storage.list(state="dead")
        assert ids(page.items) == ["a"]
        assert page.items[0].last_error == "unroutable"
        assert (await storage.list()).items == []
        dead = await storage.get("a")
        assert dead is not None
        assert dead.last_error == "unroutable"

    async def test_dead_entries_are_never_claimed(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0)])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.dead_letter(claim, "bad")
        for now in (T0, T0 + LEASE, T0 + 1_000 * LEASE):
            assert await storage.claim_due(now, 10, LEASE) == []

    # -- next_visible_ms ---------------------------------------------------------------------------

    async def test_next_visible_ms_follows_due_times_and_leases(
        self, storage: SpoolStorage
    ) -> None:
        assert await storage.next_visible_ms() is None
        await storage.store([payload("b", T0 + 2_000), payload("a", T0 + 1_000)])
        assert await storage.next_visible_ms() == T0 + 1_000
        assert ids(await storage.claim_due(T0 + 1_000, 1, 5_000)) == ["a"]
        assert await storage.next_visible_ms() == T0 + 2_000
        assert ids(await storage.claim_due(T0 + 2_000, 1, 5_000)) == ["b"]
        assert await storage.next_visible_ms() == T0 + 6_000  # a's lease expiry
        await storage.cancel("a")
        await storage.cancel("b")
        assert await storage.next_visible_ms() is None

    # -- admin: get, list, count, cancel, reschedule -----------------------------------------------

    async def test_get(self, storage: SpoolStorage) -> None:
        stored = payload("a", T0)
        await storage.store([stored])
        assert await storage.get("a") == stored
        assert await storage.get("nope") is None

    async def test_state_of(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0), payload("b", T0), payload("c", T0 + 1)])
        claims = {c.payload.id: c for c in await storage.claim_due(T0, 10, LEASE)}
        assert await storage.dead_letter(claims["b"], "bad")
        assert await storage.ack([claims["a"]]) == 1
        assert await storage.state_of("a") is None  # delivered: a tombstone only
        assert await storage.state_of("b") == "dead"
        assert await storage.state_of("c") == "pending"
        assert await storage.state_of("nope") is None

    async def test_list_filters_by_destination_and_due_range(self, storage: SpoolStorage) -> None:
        await storage.store(
            [
                payload("x1", T0 + 1, "x"),
                payload("y2", T0 + 2, "y"),
                payload("x3", T0 + 3, "x"),
                payload("y4", T0 + 4, "y"),
                payload("x5", T0 + 5, "x"),
            ]
        )
        assert ids((await storage.list()).items) == ["x1", "y2", "x3", "y4", "x5"]
        assert ids((await storage.list(destination="x")).items) == ["x1", "x3", "x5"]
        assert ids((await storage.list(due_from_ms=T0 + 2, due_to_ms=T0 + 4)).items) == [
            "y2",
            "x3",
            "y4",
        ]
        assert ids((await storage.list(due_from_ms=T0 + 4)).items) == ["y4", "x5"]
        assert ids((await storage.list(due_to_ms=T0 + 1)).items) == ["x1"]
        page = await storage.list(destination="y", due_from_ms=T0 + 3)
        assert (ids(page.items), page.next_cursor) == (["y4"], None)
        assert (await storage.list(destination="z")).items == []
        with pytest.raises(ValueError, match="positive"):
            await storage.list(limit=0)

    async def test_list_pages_with_a_cursor(self, storage: SpoolStorage) -> None:
        # Equal due times on page boundaries: the cursor must order by (due, id).
        dues = [0, 0, 1, 1, 1, 2, 3, 3]
        entries = [payload(f"p{i}", T0 + due) for i, due in enumerate(dues)]
        await storage.store([*entries[::2], *entries[1::2]])  # not in order
        await storage.store([payload("other", T0 + 1, "elsewhere")])
        pages = []
        cursor = None
        for _ in range(3):
            page = await storage.list(destination="out", limit=3, cursor=cursor)
            pages.append(ids(page.items))
            cursor = page.next_cursor
        assert pages == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6", "p7"]]
        assert cursor is None
        whole = await storage.list(destination="out", limit=8)
        assert (ids(whole.items), whole.next_cursor) == ([f"p{i}" for i in range(8)], None)
        ranged = await storage.list(due_from_ms=T0 + 1, due_to_ms=T0 + 2, limit=2)
        assert ids(ranged.items) == ["other", "p2"]
        assert ranged.next_cursor is not None
        rest = await storage.list(due_from_ms=T0 + 1, due_to_ms=T0 + 2, cursor=ranged.next_cursor)
        assert (ids(rest.items), rest.next_cursor) == (["p3", "p4", "p5"], None)

    async def test_count(self, storage: SpoolStorage) -> None:
        assert await storage.count() == 0
        await storage.store([payload("a", T0, "x"), payload("b", T0, "x"), payload("c", T0, "y")])
        claims = await storage.claim_due(T0, 1, LEASE)
        assert await storage.dead_letter(claims[0], "bad")
        assert await storage.count() == 2  # leased entries are still pending
        assert await storage.count(destination="x") == 1
        assert await storage.count(destination="y") == 1
        assert await storage.count(state="dead") == 1
        assert await storage.count(destination="x", state="dead") == 1
        assert await storage.count(destination="y", state="dead") == 0

    async def test_count_due_counts_a_half_open_range(self, storage: SpoolStorage) -> None:
        await storage.store(
            [payload("a", T0, "x"), payload("b", T0 + 10, "x"), payload("c", T0 + 20, "y")]
        )
        claims = await storage.claim_due(T0 + 20, 3, LEASE)
        assert await storage.retry(next(c for c in claims if c.payload.id == "a"), T0 + 5, "e")
        assert await storage.dead_letter(next(c for c in claims if c.payload.id == "c"), "bad")
        # a: pending (retried, due T0 + 5), b: pending (leased), c: dead.
        assert await storage.count_due(None, None) == 2
        assert await storage.count_due(T0, T0 + 10) == 1  # the end is excluded
        assert await storage.count_due(T0 + 5, T0 + 11) == 2
        assert await storage.count_due(T0 + 6, None) == 1
        assert await storage.count_due(None, T0 + 5) == 0
        assert await storage.count_due(T0, T0 + 100, destination="y") == 0
        assert await storage.count_due(T0, T0 + 100, destination="y", state="dead") == 1
        assert await storage.count_due(T0 + 20, T0 + 21, state="dead") == 1
        with pytest.raises(ValueError, match="before"):
            await storage.count_due(T0 + 1, T0)

    async def test_cancel(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0), payload("b", T0), payload("c", T0 + 1)])
        assert await storage.cancel("c")
        assert await storage.get("c") is None
        assert not await storage.cancel("c")
        [claim, _] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.dead_letter(claim, "bad")
        assert await storage.cancel("a")  # dead
        assert await storage.cancel("b")  # leased
        assert await storage.count() + await storage.count(state="dead") == 0

    async def test_reschedule_moves_the_due_time(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0)])
        assert await storage.reschedule("a", T0 + 3_000)
        stored = await storage.get("a")
        assert stored is not None
        assert stored.due_ms == T0 + 3_000
        assert await storage.next_visible_ms() == T0 + 3_000
        assert await storage.claim_due(T0 + 2_999, 10, LEASE) == []
        assert ids(await storage.claim_due(T0 + 3_000, 10, LEASE)) == ["a"]
        assert not await storage.reschedule("nope", T0)

    async def test_reschedule_drops_the_lease(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0)])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.reschedule("a", T0 + 1)
        assert await storage.ack([claim]) == 0
        assert ids(await storage.claim_due(T0 + 1, 10, LEASE)) == ["a"]

    async def test_reschedule_revives_a_dead_entry(self, storage: SpoolStorage) -> None:
        await storage.store([payload("a", T0)])
        [claim] = await storage.claim_due(T0, 10, LEASE)
        assert await storage.dead_letter(claim, "bad")
        assert await storage.reschedule("a", T0 + 10)
        assert (await storage.count(), await storage.count(state="dead")) == (1, 0)
        assert await storage.next_visible_ms() == T0 + 10
        [again] = await storage.claim_due(T0 + 10, 10, LEASE)
        assert again.payload.due_ms == T0 + 10

    # -- lookups by message id and correlation id -----------------------------------------------

    async def test_lookup_by_message_id_and_correlation_id(self, storage: SpoolStorage) -> None:
        def props(message_id: str, correlation_id: str | None = None) -> MessageProperties:
            return MessageProperties(message_id=message_id, correlation_id=correlation_id)

        await storage.store(
            [
                payload("a", T0 + 2, properties=props("m-1", "c-1")),
                payload("b", T0 + 1, "y", properties=props("m-2", "c-1")),
                payload("c", T0, properties=props("m-3")),
                payload("d", T0 + 3, properties=props("m-4", "c-1")),
            ]
        )
        assert ids((await storage.list(message_id="m-1")).items) == ["a"]
        assert ids((await storage.list(correlation_id="c-1")).items) == ["b", "a", "d"]
        assert ids((await storage.list(correlation_id="c-1", destination="y")).items) == ["b"]
        assert ids((await storage.list(correlation_id="c-1", due_to_ms=T0 + 2)).items) == [
            "b",
            "a",
        ]
        assert ids((await storage.list(message_id="m-1", correlation_id="c-2")).items) == []
        first = await storage.list(correlation_id="c-1", limit=2)
        assert ids(first.items) == ["b", "a"]
        assert first.next_cursor is not None
        rest = await storage.list(correlation_id="c-1", limit=2, cursor=first.next_cursor)
        assert (ids(rest.items), rest.next_cursor) == (["d"], None)
        assert (await storage.list(message_id="nope")).items == []
        # Dead entries are found as dead; delivered and cancelled ones are gone from the index.
        claims = {c.payload.id: c for c in await storage.claim_due(T0 + 3, 10, LEASE)}
        assert await storage.dead_letter(claims["b"], "bad")
        assert await storage.ack([claims["a"]]) == 1
        assert await storage.cancel("d")
        assert (await storage.list(correlation_id="c-1")).items == []
        assert ids((await storage.list(correlation_id="c-1", state="dead")).items) == ["b"]
        assert ids((await storage.list(message_id="m-3")).items) == ["c"]
        assert await storage.cancel("b")
        assert (await storage.list(correlation_id="c-1", state="dead")).items == []

    async def test_a_spool_from_before_the_lookup_indexes_is_indexed_when_opened(
        self, storage: SpoolStorage, clock: FakeClock, downgrade: Any
    ) -> None:
        entry = payload(
            "old", T0, properties=MessageProperties(message_id="m-old", correlation_id="c-old")
        )
        await storage.store([entry, payload("bare", T0 + 1)])
        await downgrade(storage)  # the spool as a payler without lookups left it
        async with storage_from_url(storage.url, clock=clock) as reopened:
            assert ids((await reopened.list(message_id="m-old")).items) == ["old"]
            assert ids((await reopened.list(correlation_id="c-old")).items) == ["old"]
            assert await reopened.get("old") == entry
            assert await reopened.store([payload("new", T0 + 2)]) == 1
            assert ids(await reopened.claim_due(T0 + 2, 10, LEASE)) == ["old", "bare", "new"]

    # -- several claimants -------------------------------------------------------------------------

    async def test_concurrent_claimants_never_share_an_entry(
        self, storage: SpoolStorage, twin: SpoolStorage
    ) -> None:
        total = 60
        await storage.store([payload(f"m{i:03}", T0 + i % 7) for i in range(total)])
        seen: list[str] = []
        for _ in range(10):  # bounded: each round must claim something until all are taken
            rounds = await asyncio.gather(
                *(s.claim_due(T0 + 10, 7, LEASE) for s in (storage, twin, storage, twin))
            )
            claimed = [c.payload.id for claims in rounds for c in claims]
            if not claimed:
                break
            seen += claimed
        assert len(seen) == len(set(seen)), "an entry was claimed twice"
        assert sorted(seen) == [f"m{i:03}" for i in range(total)]

    async def test_twin_sees_the_same_spool(
        self, storage: SpoolStorage, twin: SpoolStorage
    ) -> None:
        await storage.store([payload("a", T0)])
        [claim] = await twin.claim_due(T0, 10, LEASE)
        assert await storage.claim_due(T0, 10, LEASE) == []
        assert await storage.ack([claim]) == 1
        assert await twin.get("a") is None

    # -- what a payload carries --------------------------------------------------------------------

    async def test_payload_round_trip(self, storage: SpoolStorage) -> None:
        headers: dict[str, Any] = {
            "bytes": b"\x00\xff\x80raw",
            "decimal": Decimal("12.3400"),
            "datetime": datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone(timedelta(hours=2))),
            "utc": datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
            "table": {"inner": [1, "two", {"deep": b"\x01", "none": None}], "flag": False},
            "array": [True, 1, 1.5, None, "é ü 中"],
            "bool": True,
            "int": 1,
            "big": 2**62,
            "negative": -7,
            "float": 0.1,
            "none": None,
            "str": "x-delay",
            "x-delay": 5000,
        }
        properties = MessageProperties(
            content_type="application/octet-stream",
            content_encoding="gzip",
            correlation_id="corr-1",
            message_id="msg-1",
            reply_to="replies",
            type="event",
            priority=5,
            timestamp_ms=T0 - 123,
            delivery_mode=2,
            expiration="60000",
            app_id="tests",
        )
        original = Payload(
            id="round-trip/é",
            body=bytes(range(256)),
            headers=headers,
            properties=properties,
            source="amqp://in/queue",
            destination="out.key",
            due_ms=T0,
            created_ms=T0 - 5,
            attempts=2,
            last_error="earlier failure",
        )
        empty = Payload(id="empty", body=b"", destination="out", due_ms=T0 + 1, created_ms=T0)
        assert await storage.store([original, empty]) == 2
        got = await storage.get(original.id)
        [claim, empty_claim] = await storage.claim_due(T0 + 1, 10, LEASE)
        for copy in (got, claim.payload):
            assert copy is not None
            assert_same(copy.headers, headers, "headers")
            assert copy.body == original.body
            assert copy.properties == properties
            assert copy.model_dump() == original.model_dump()
        assert empty_claim.payload == empty
        listed = (await storage.list(limit=1)).items[0]
        assert_same(listed.headers, headers, "listed headers")


# -- the backends ----------------------------------------------------------------------------------


class TestMemoryStorage(StorageContract):
    @pytest.fixture
    def downgrade(self) -> None:
        pytest.skip("an in-memory spool does not outlive its process: nothing to upgrade")

    @pytest.fixture
    async def storage(self, clock: FakeClock) -> AsyncIterator[SpoolStorage]:
        async with storage_from_url(f"memory://contract-{uuid.uuid4().hex}", clock=clock) as s:
            yield s
        MemoryStorage.forget_all()

    async def write_without_digest(self, storage: SpoolStorage, stored: Payload) -> None:
        assert isinstance(storage, MemoryStorage)
        await storage.store([stored])
        storage._entries[stored.id].digest = None


class TestSQLiteStorage(StorageContract):
    @pytest.fixture
    def downgrade(self) -> Any:
        async def to_version_0(storage: SpoolStorage) -> None:
            assert isinstance(storage, SQLiteStorage)
            path = storage.location.path  # the URL may carry a query (?locking=exclusive)
            await storage.close()
            db = sqlite3.connect(path, isolation_level=None)
            try:  # the table as payler 1.0.0.dev0 made it: no lookup columns, user_version 0
                db.execute("PRAGMA journal_mode = WAL")  # as payler then left every file
                db.execute("DROP INDEX spool_message_id")
                db.execute("DROP INDEX spool_correlation_id")
                db.execute("ALTER TABLE spool DROP COLUMN message_id")
                db.execute("ALTER TABLE spool DROP COLUMN correlation_id")
                db.execute("PRAGMA user_version = 0")
            finally:
                db.close()

        return to_version_0

    @pytest.fixture
    async def storage(self, clock: FakeClock, tmp_path: Path) -> AsyncIterator[SpoolStorage]:
        pytest.importorskip("payler.drivers.storages.sqlite")
        async with storage_from_url(f"sqlite:///{tmp_path}/spool.db", clock=clock) as s:
            yield s

    async def write_without_digest(self, storage: SpoolStorage, stored: Payload) -> None:
        assert isinstance(storage, SQLiteStorage)
        await storage.store([stored])
        forget = "UPDATE spool SET digest = NULL WHERE id = ?"
        await storage.file.write(lambda db: db.execute(forget, (stored.id,)))


class TestExclusiveSQLiteStorage(TestSQLiteStorage):
    """The SQLite file in WAL mode, kept to one process (``?locking=exclusive``)."""

    @pytest.fixture
    async def storage(self, clock: FakeClock, tmp_path: Path) -> AsyncIterator[SpoolStorage]:
        url = f"sqlite:///{tmp_path}/spool.db?locking=exclusive"
        async with storage_from_url(url, clock=clock) as s:
            yield s


@pytest.mark.mongodb
class TestMongoStorage(StorageContract):
    @pytest.fixture
    def downgrade(self) -> Any:
        async def to_layout_0(storage: SpoolStorage) -> None:
            assert isinstance(storage, MongoStorage)
            spool = storage._spool
            await spool.update_many({}, {"$unset": {"message_id": "", "correlation_id": ""}})
            await spool.database["payler_schema"].delete_many({})

        return to_layout_0

    @pytest.fixture
    async def storage(self, clock: FakeClock, mongodb_url: str) -> AsyncIterator[SpoolStorage]:
        async with storage_from_url(mongodb_url, clock=clock) as s:
            yield s

    async def write_without_digest(self, storage: SpoolStorage, stored: Payload) -> None:
        assert isinstance(storage, MongoStorage)
        await storage.store([stored])
        await storage._spool.update_one({"_id": stored.id}, {"$unset": {"digest": ""}})


@pytest.mark.redis
class TestRedisStorage(StorageContract):
    @pytest.fixture
    def downgrade(self) -> Any:
        async def to_layout_0(storage: SpoolStorage) -> None:
            assert isinstance(storage, RedisStorage)
            client, keys = storage.client, storage.keys
            async for key in client.scan_iter(match=keys.match_all):
                if key.decode().startswith((f"{keys.prefix}by:", keys.schema)):
                    await client.delete(key)
                elif key.decode().startswith(keys.entry_prefix):
                    await client.hdel(key, "message_id", "correlation_id")

        return to_layout_0

    #: Options added to the spool's URL (a subclass's key layout).
    url_options = ""

    @pytest.fixture
    async def storage(self, clock: FakeClock) -> AsyncIterator[SpoolStorage]:
        url = f"{REDIS_URL}?prefix=test:{uuid.uuid4().hex}:{self.url_options}"
        async with RedisStorage(url, clock=clock) as s:
            try:
                yield s
            finally:  # this test's keys only: other spools may share the server
                keys = [key async for key in s.client.scan_iter(match=s.keys.match_all)]
                if keys:
                    await s.client.delete(*keys)

    async def write_without_digest(self, storage: SpoolStorage, stored: Payload) -> None:
        assert isinstance(storage, RedisStorage)
        await storage.store([stored])
        await storage.client.hdel(storage.keys.entry(stored.id), "digest")


@pytest.mark.postgres
class TestPostgresStorage(StorageContract):
    @pytest.fixture
    def downgrade(self) -> Any:
        async def to_first_rows(storage: SpoolStorage) -> None:
            # Every PostgreSQL spool had its lookup columns and indexes (schema version 1);
            # what the first PostgreSQL payler left without is the content digest.
            assert isinstance(storage, PostgresStorage)
            await storage.pool.execute(f"UPDATE {storage._sql.table} SET digest = NULL")

        return to_first_rows

    @pytest.fixture
    async def storage(self, clock: FakeClock, postgres_url: str) -> AsyncIterator[SpoolStorage]:
        async with storage_from_url(postgres_url, clock=clock) as s:
            yield s

    async def write_without_digest(self, storage: SpoolStorage, stored: Payload) -> None:
        assert isinstance(storage, PostgresStorage)
        await storage.store([stored])
        forget = f"UPDATE {storage._sql.table} SET digest = NULL WHERE id = $1"
        await storage.pool.execute(forget, stored.id)


@pytest.mark.redis
class TestShardedRedisStorage(TestRedisStorage):
    """The sharded key layout (``?shards=4``) on the one shared server: a cluster's layout."""

    @pytest.fixture
    def downgrade(self) -> None:
        pytest.skip("a sharded spool has had its lookup sets from the start: nothing to upgrade")

    url_options = "&shards=4"

    async def write_without_digest(self, storage: SpoolStorage, stored: Payload) -> None:
        assert isinstance(storage, RedisStorage)
        await storage.store([stored])
        await storage.client.hdel(storage.shard(stored.id).entry(stored.id), "digest")


@pytest.mark.redis_cluster
class TestRedisClusterStorage(TestShardedRedisStorage):
    """A real Redis Cluster (three masters, a replica each; :mod:`tests.redis_cluster`),
    16 shards: every script touches one slot, claims and admin operations span the shards."""

    @pytest.fixture
    async def storage(
        self, clock: FakeClock, redis_cluster_url: str
    ) -> AsyncIterator[SpoolStorage]:
        async with RedisStorage(redis_cluster_url, clock=clock) as s:
            yield s
