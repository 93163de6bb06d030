"""The MongoDB spool storage, through pymongo's native asyncio API (``AsyncMongoClient``).

``mongodb://[user:password@]host[:port][/DATABASE][?options]`` (or ``mongodb+srv://``): the spool is
the collection ``payler_spool`` of DATABASE, ``payler`` when the URL names none. One document per
entry: ``_id`` (the payload id), ``due_ms``, ``visible_ms``, ``token`` (``None`` when unleased),
``state`` (``pending``/``dead``), ``destination``, ``attempts``, ``last_error``, ``created_ms``,
``body`` (binary), ``meta`` (headers, properties and source as lossless JSON text) and ``digest``
(of the content; documents written by an older payler have none, and count as the same content).

Durability: writes use the write concern of the URL. A replica set's default is ``w: majority``
(journaled), which is what makes a returned ``store()`` durable; on a standalone server or with a
lowered default, put ``w=majority&journal=true`` (or at least ``journal=true``) in the URL.

Switching from the original Payler (0.2, Motor-based): its spool, the collection ``payloads`` of
the same database, is imported once in :meth:`MongoStorage.connect` (each legacy document is stored
here, then deleted there), so no pending message is stranded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, ConnectionFailure, PyMongoError, WriteConcernError

from payler import codec
from payler.clock import Clock
from payler.drivers.storages import HARD_MAX_BODY_BYTES
from payler.drivers.storages.base import (
    DEFAULT_DEDUPE_WINDOW_MS,
    LOOKUP_FIELDS,
    Claim,
    EntryState,
    LookupField,
    Page,
    SpoolStorage,
    decode_cursor,
    encode_cursor,
    new_token,
)
from payler.drivers.storages.dedupe import Stored, candidate_ids, plan_store
from payler.errors import StartupError, TransientError, transient_on
from payler.metrics import Metrics
from payler.payload import Payload
from payler.urls import mask_url, redact

log = logging.getLogger("payler.storage.mongodb")

Doc = dict[str, Any]

SPOOL_COLLECTION = "payler_spool"
#: Where the layout version of each payler collection is kept (``{_id: name, version: n}``).
SCHEMA_COLLECTION = "payler_schema"
#: The version of the document layout this module writes (1: the lookup fields).
_LAYOUT = 1
DEFAULT_DATABASE = "payler"
#: The original Payler's spool collection, imported once at connect.
LEGACY_COLLECTION = "payloads"
LEGACY_ID_PREFIX = "payler-0.2:"
_DUPLICATE_KEY = 11000
_LEGACY_BATCH = 500
#: Claim rounds per call: concurrent claimants race for the same earliest entries.
_CLAIM_ROUNDS = 3
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DUE_ORDER = [("due_ms", ASCENDING), ("_id", ASCENDING)]
_VISIBLE_ORDER = [("visible_ms", ASCENDING)]


_transient = transient_on((ConnectionFailure, WriteConcernError), "MongoDB spool")


class MongoStorage(SpoolStorage):
    """The spool in a MongoDB collection; see :class:`~payler.drivers.storages.base.SpoolStorage`.

    ``server_selection_timeout_ms`` bounds how long :meth:`connect` (and any later operation)
    waits for a reachable server before failing.
    """

    schemes = ("mongodb", "mongodb+srv")
    #: A BSON document is at most 16 MiB: the body, with room for the headers.
    max_body_bytes = 15 * 1024 * 1024
    hard_max_body_bytes = HARD_MAX_BODY_BYTES["mongodb"]

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        dedupe_window_ms: int = DEFAULT_DEDUPE_WINDOW_MS,
        max_body_bytes: int | None = None,
        min_free_bytes: int | None = None,
        server_selection_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(
            url,
            clock=clock,
            metrics=metrics,
            dedupe_window_ms=dedupe_window_ms,
            max_body_bytes=max_body_bytes,
            min_free_bytes=min_free_bytes,
        )
        self.server_selection_timeout_ms = server_selection_timeout_ms
        self._client: AsyncMongoClient[Doc] | None = None
        self._spool_collection: AsyncCollection[Doc] | None = None

    async def connect(self) -> None:
        """Reach the server (ping), create the indexes, import a legacy Payler spool.

        Raises :class:`~payler.errors.StartupError` naming the (password-masked) URL.
        """
        try:
            self._client = AsyncMongoClient(
                self.url, serverSelectionTimeoutMS=self.server_selection_timeout_ms
            )
            database = self._client.get_default_database(DEFAULT_DATABASE)
            await self._client.admin.command("ping")
            spool = self._spool_collection = database[SPOOL_COLLECTION]
            await spool.create_index([("state", ASCENDING), ("visible_ms", ASCENDING)])
            await spool.create_index(
                [("state", ASCENDING), ("destination", ASCENDING), *_DUE_ORDER]
            )
            for field in LOOKUP_FIELDS:
                await spool.create_index([(field, ASCENDING), ("state", ASCENDING)])
            await self._upgrade(database[SCHEMA_COLLECTION])
            await self._import_legacy(database[LEGACY_COLLECTION])
        except (PyMongoError, TransientError, ValueError) as exc:  # ValueError: a malformed URL
            await self.close()
            # pymongo appends the whole topology description: the first part says it all.
            what = str(exc).partition(", Topology Description:")[0]
            what = redact(what, self.url)
            raise StartupError(f"MongoDB spool storage {mask_url(self.url)}: {what}") from exc

    async def close(self) -> None:
        client, self._client, self._spool_collection = self._client, None, None
        if client is not None:
            await client.close()

    @property
    def _spool(self) -> AsyncCollection[Doc]:
        if self._spool_collection is None:
            raise RuntimeError("MongoStorage used before connect()")
        return self._spool_collection

    # -- the hooks -------------------------------------------------------------------------------

    @_transient
    async def _store(
        self, batch: Sequence[Payload], digests: Sequence[str], state: EntryState = "pending"
    ) -> Stored:
        found = self._spool.find({"_id": {"$in": candidate_ids(batch, digests)}}, {"digest": 1})
        taken = {doc["_id"]: doc.get("digest") async for doc in found}
        inserts, stored = plan_store(batch, digests, taken)
        if not inserts:
            return stored
        try:
            await self._spool.insert_many(
                [_to_doc(p, state, digest) for p, digest in inserts], ordered=False
            )
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                # Written, but not as durably as the URL asks (w, journal): not yet safe to ack.
                raise TransientError(
                    f"MongoDB spool: write concern not met: {exc.details['writeConcernErrors'][0]}"
                ) from exc
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors):
                raise
            # Another instance stored these ids between our look-up and the insert: the same
            # message redelivered to both, in all likelihood; its copy stays (a duplicate).
            for error in errors:
                payload = inserts[error["index"]][0]
                original = next(
                    (k for k, v in stored.renamed.items() if v == payload.id), payload.id
                )
                stored.new.remove(payload.id)
                stored.renamed.pop(original, None)
                stored.duplicates.append(original)
        return stored

    @_transient
    async def _claim_due(self, now_ms: int, limit: int, lease_ms: int) -> list[Claim]:
        visible = {"state": "pending", "visible_ms": {"$lte": now_ms}}
        claims: list[Claim] = []
        for _ in range(_CLAIM_ROUNDS):  # another round only for candidates lost to a race
            # In visibility order, as the (state, visible_ms) index runs: no sort of the backlog.
            found = self._spool.find(visible, {"_id": 1}).sort(_VISIBLE_ORDER)
            ids = [doc["_id"] async for doc in found.limit(limit - len(claims))]
            if not ids:
                break
            token = new_token()
            # The filter is re-checked per document as it is updated: an entry another claimant
            # leased in between no longer matches, so no entry is ever held twice.
            await self._spool.update_many(
                {"_id": {"$in": ids}, **visible},
                {"$set": {"token": token, "visible_ms": now_ms + lease_ms}},
            )
            got = self._spool.find({"_id": {"$in": ids}, "token": token})
            won = [Claim(_from_doc(doc), token) async for doc in got]
            claims += won
            if len(won) == len(ids):  # no race lost: the limit is reached or nothing is left
                break
        return sorted(claims, key=lambda c: (c.payload.due_ms, c.payload.id))

    @_transient
    async def _ack(self, claims: Sequence[Claim], tombstone_until_ms: int) -> int:
        by_token: dict[str, list[str]] = {}
        for claim in claims:
            by_token.setdefault(claim.token, []).append(claim.payload.id)
        # The document stays, emptied, as the tombstone that keeps a redelivered copy out.
        tombstone = {"state": "delivered", "visible_ms": tombstone_until_ms, "token": None}
        settled = 0
        for token, ids in by_token.items():
            result = await self._spool.update_many(
                {"_id": {"$in": ids}, "token": token, "state": "pending"},
                {"$set": tombstone, "$unset": {"body": "", "meta": ""}},
            )
            settled += result.modified_count
        return settled

    @_transient
    async def _purge_tombstones(self, now_ms: int) -> None:
        await self._spool.delete_many({"state": "delivered", "visible_ms": {"$lte": now_ms}})

    @_transient
    async def _retry(self, claim: Claim, due_ms: int, reason: str, attempts: int) -> bool:
        again = {"due_ms": due_ms, "visible_ms": due_ms, "token": None, "last_error": reason}
        result = await self._spool.update_one(
            _held(claim), {"$set": {**again, "attempts": attempts}}
        )
        return result.matched_count == 1

    @_transient
    async def _dead_letter(self, claim: Claim, reason: str) -> bool:
        result = await self._spool.update_one(
            _held(claim), {"$set": {"state": "dead", "token": None, "last_error": reason}}
        )
        return result.matched_count == 1

    @_transient
    async def _next_visible_ms(self) -> int | None:
        doc = await self._spool.find_one(
            {"state": "pending"}, {"visible_ms": 1}, sort=[("visible_ms", ASCENDING)]
        )
        return None if doc is None else int(doc["visible_ms"])

    @_transient
    async def _get(self, payload_id: str) -> Payload | None:
        doc = await self._spool.find_one({"_id": payload_id, "state": {"$ne": "delivered"}})
        return None if doc is None else _from_doc(doc)

    @_transient
    async def _state_of(self, payload_id: str) -> EntryState | None:
        doc = await self._spool.find_one(
            {"_id": payload_id, "state": {"$ne": "delivered"}}, {"state": 1}
        )
        if doc is None:
            return None
        return "dead" if doc["state"] == "dead" else "pending"

    @_transient
    async def _list(
        self,
        destination: str | None,
        due_from_ms: int | None,
        due_to_ms: int | None,
        state: EntryState,
        limit: int,
        cursor: str | None,
    ) -> Page:
        query = _filter(destination, state)
        due = {op: ms for op, ms in (("$gte", due_from_ms), ("$lte", due_to_ms)) if ms is not None}
        if due:
            query["due_ms"] = due
        if cursor:
            after_due, after_id = decode_cursor(cursor)
            query["$or"] = [
                {"due_ms": {"$gt": after_due}},
                {"due_ms": after_due, "_id": {"$gt": after_id}},
            ]
        found = self._spool.find(query).sort(_DUE_ORDER).limit(limit + 1)
        items = [_from_doc(doc) async for doc in found]
        if len(items) <= limit:
            return Page(items, None)
        del items[limit:]
        return Page(items, encode_cursor(items[-1].due_ms, items[-1].id))

    @_transient
    async def _count(self, destination: str | None, state: EntryState) -> int:
        return await self._spool.count_documents(_filter(destination, state))

    @_transient
    async def _count_due(
        self, destination: str | None, state: EntryState, start_ms: int | None, end_ms: int | None
    ) -> int:
        query = _filter(destination, state)
        due = {op: ms for op, ms in (("$gte", start_ms), ("$lt", end_ms)) if ms is not None}
        if due:
            query["due_ms"] = due
        return await self._spool.count_documents(query)

    @_transient
    async def _cancel(self, payload_id: str) -> bool:
        result = await self._spool.delete_one({"_id": payload_id, "state": {"$ne": "delivered"}})
        return result.deleted_count == 1

    @_transient
    async def _reschedule(self, payload_id: str, due_ms: int) -> bool:
        result = await self._spool.update_one(
            {"_id": payload_id, "state": {"$ne": "delivered"}},
            {"$set": {"due_ms": due_ms, "visible_ms": due_ms, "token": None, "state": "pending"}},
        )
        return result.matched_count == 1

    @_transient
    async def _lookup(
        self, field: LookupField, value: str, state: EntryState, limit: int
    ) -> list[Payload]:
        found = self._spool.find({field: value, "state": state}).limit(limit)
        return [_from_doc(doc) async for doc in found]

    async def _upgrade(self, schema: AsyncCollection[Doc]) -> None:
        """Bring a spool made by an earlier payler to this document layout (additive only).

        Layout 1 added the lookup fields (``message_id``, ``correlation_id``): the entries
        stored before get them from their metadata, once; a marker in ``payler_schema``
        records it, so that later starts do not look again.
        """
        marker = await schema.find_one({"_id": SPOOL_COLLECTION})
        if marker is not None and marker.get("version", 0) >= _LAYOUT:
            return
        old = {"message_id": {"$exists": False}, "state": {"$in": ["pending", "dead"]}}
        async for doc in self._spool.find(old, {"meta": 1}):
            try:
                properties = codec.loads(doc.get("meta") or "{}").get("properties", {})
            except (ValueError, AttributeError):
                properties = {}
            update = {field: properties.get(field) for field in LOOKUP_FIELDS}
            await self._spool.update_one({"_id": doc["_id"]}, {"$set": update})
        await schema.update_one(
            {"_id": SPOOL_COLLECTION}, {"$set": {"version": _LAYOUT}}, upsert=True
        )

    # -- the original Payler's spool ---------------------------------------------------------------

    async def _import_legacy(self, legacy: AsyncCollection[Doc]) -> None:
        """Move every document of Payler 0.2's ``payloads`` collection into the spool.

        Store first, delete after: a crash in between only leaves documents that the next start
        imports again, idempotently (their id derives from the legacy ``_id``).
        """
        now_ms, imported, skipped = self.clock.now_ms(), 0, 0
        cursor = legacy.find({})
        while docs := await cursor.to_list(_LEGACY_BATCH):
            moved = [(d["_id"], p) for d in docs if (p := _from_legacy(d, now_ms)) is not None]
            skipped += len(docs) - len(moved)
            if moved:
                await self.store_batch([payload for _, payload in moved])
                await legacy.delete_many({"_id": {"$in": [legacy_id for legacy_id, _ in moved]}})
                imported += len(moved)
        if imported:
            log.info("imported %d pending payloads from Payler 0.2's %r", imported, legacy.name)
        if skipped:
            log.warning(
                "left %d documents in %r: no destination or reference_date", skipped, legacy.name
            )


def _held(claim: Claim) -> Doc:
    # Dead and retried entries have no token, so a token match also means "still leased".
    return {"_id": claim.payload.id, "token": claim.token}


def _filter(destination: str | None, state: EntryState) -> Doc:
    query: Doc = {"state": state}
    if destination is not None:
        query["destination"] = destination
    return query


def _to_doc(payload: Payload, state: EntryState = "pending", digest: str | None = None) -> Doc:
    return {
        "_id": payload.id,
        "due_ms": payload.due_ms,
        "visible_ms": payload.due_ms,
        "token": None,
        "state": state,
        "destination": payload.destination,
        "attempts": payload.attempts,
        "last_error": payload.last_error,
        "created_ms": payload.created_ms,
        "body": payload.body,
        "meta": payload.meta_json(),
        "digest": digest,
        "message_id": payload.properties.message_id,
        "correlation_id": payload.properties.correlation_id,
    }


def _from_doc(doc: Doc) -> Payload:
    return Payload.from_stored(
        id=doc["_id"],
        body=doc["body"],
        meta_json=doc["meta"],
        destination=doc["destination"],
        due_ms=doc["due_ms"],
        created_ms=doc["created_ms"],
        attempts=doc["attempts"],
        last_error=doc["last_error"],
    )


def _from_legacy(doc: Doc, now_ms: int) -> Payload | None:
    """A Payler 0.2 document as a payload; ``None`` if it cannot be scheduled."""
    reference_date, destination = doc.get("reference_date"), doc.get("destination")
    if not isinstance(reference_date, datetime) or not isinstance(destination, str):
        return None
    if reference_date.tzinfo is None:  # BSON dates are UTC; pymongo returns them naive
        reference_date = reference_date.replace(tzinfo=UTC)
    message = doc.get("message")
    if isinstance(message, bytes):  # bson.Binary too
        body = bytes(message)
    elif isinstance(message, str):
        body = message.encode()
    else:  # a dict (Payler 0.2 sent it as JSON), or whatever else it was handed
        body = json.dumps(message, default=str).encode()
    return Payload(
        id=f"{LEGACY_ID_PREFIX}{doc['_id']}",
        body=body,
        source=str(doc.get("source") or ""),
        destination=destination,
        due_ms=(reference_date - _EPOCH) // timedelta(milliseconds=1),
        created_ms=now_ms,
    )


__all__ = ["MongoStorage"]
