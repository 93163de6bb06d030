"""asyncpg against psycopg 3 on the PostgreSQL spool's hot statements: why payler uses asyncpg.

The same SQL on each driver, one connection, autocommit, prepared statements: a batch insert
through ``unnest`` of arrays (the store), then ``FOR UPDATE SKIP LOCKED`` claims of a batch with
their ack (the watch loop). Prints messages per second and this process's CPU per message, three
rounds each, alternating. psycopg is not a payler dependency: ``pip install 'psycopg[binary]'``
first.

    python benchmarks/postgres_drivers.py
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg
from infra import require_local

DSN = require_local(
    os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)
BATCHES, BATCH = 100, 100
DDL = """CREATE TABLE {t} (id text COLLATE "C" PRIMARY KEY, state text NOT NULL,
 due_ms bigint NOT NULL, visible_ms bigint NOT NULL, token text, destination text NOT NULL,
 body bytea NOT NULL, meta text NOT NULL);
 CREATE INDEX ON {t} (visible_ms, id) WHERE state = 'pending';"""
STORE = (
    "INSERT INTO {t} (id, state, due_ms, visible_ms, destination, body, meta)"
    " SELECT i, 'pending', d, d, 'out', b, '{{}}' FROM unnest({a}::text[], {b}::bigint[],"
    " {c}::bytea[]) AS x(i, d, b) ON CONFLICT (id) DO NOTHING"
)
CLAIM = (
    "UPDATE {t} SET token = {c}, visible_ms = {a} + 30000 WHERE id = ANY(ARRAY("
    "SELECT id FROM {t} WHERE state = 'pending' AND visible_ms <= {a}"
    " ORDER BY visible_ms, id LIMIT {b} FOR UPDATE SKIP LOCKED))"
    " RETURNING id, body, meta, destination, due_ms"
)
ACK = (
    "UPDATE {t} AS s SET state = 'delivered', body = '', meta = '{{}}'"
    " FROM unnest({a}::text[]) AS c(id) WHERE s.id = c.id AND s.token = {b}"
)
Rows = tuple[list[str], list[int], list[bytes]]


def batch(number: int) -> Rows:
    ids = [f"id-{number}-{i}" for i in range(BATCH)]
    return ids, [1000 + i for i in range(BATCH)], [os.urandom(512) for _ in range(BATCH)]


async def with_asyncpg(table: str) -> tuple[Callable[[Rows], Awaitable[None]], ...]:
    conn = await asyncpg.connect(DSN)
    await conn.execute(DDL.format(t=table))
    marks = {"t": table, "a": "$1", "b": "$2", "c": "$3"}

    async def store(rows: Rows) -> None:
        await conn.execute(STORE.format(**marks), *rows)

    async def claim_ack(_rows: Rows) -> None:
        token = uuid.uuid4().hex
        got = await conn.fetch(CLAIM.format(**marks), 10**12, BATCH, token)
        await conn.execute(ACK.format(**marks), [r["id"] for r in got], token)

    async def close(_rows: Rows) -> None:
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()

    return store, claim_ack, close


async def with_psycopg(table: str) -> tuple[Callable[[Rows], Awaitable[None]], ...]:
    conn = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
    await conn.execute(DDL.format(t=table))
    marks = {"t": table, "a": "%s", "b": "%s", "c": "%s"}
    claim = CLAIM.format(t=table, a="%(now)s", b="%(limit)s", c="%(token)s")

    async def store(rows: Rows) -> None:
        await conn.execute(STORE.format(**marks), rows, prepare=True)

    async def claim_ack(_rows: Rows) -> None:
        token = uuid.uuid4().hex
        params = {"now": 10**12, "limit": BATCH, "token": token}
        got = await (await conn.execute(claim, params, prepare=True)).fetchall()
        ids = [r[0] for r in got]
        await conn.execute(ACK.format(**marks), (ids, token), prepare=True)

    async def close(_rows: Rows) -> None:
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()

    return store, claim_ack, close


async def timed(step: Callable[[Rows], Awaitable[None]]) -> tuple[float, float]:
    """Messages per second and this process's CPU µs per message of ``step`` over the batches."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for number in range(BATCHES):
        await step(batch(number))
    count = BATCHES * BATCH
    return count / (time.perf_counter() - wall0), (time.process_time() - cpu0) / count * 1e6


async def main() -> None:
    for name, driver in [("asyncpg", with_asyncpg), ("psycopg", with_psycopg)] * 3:
        store, claim_ack, close = await driver(f"bench_{name}_{uuid.uuid4().hex[:8]}")
        try:
            store_rate, store_cpu = await timed(store)
            claim_rate, claim_cpu = await timed(claim_ack)
        finally:
            await close(batch(0))
        print(
            f"{name:8} store {store_rate:7.0f} msg/s ({store_cpu:5.1f} µs CPU/msg)"
            f"  claim+ack {claim_rate:7.0f} msg/s ({claim_cpu:5.1f} µs CPU/msg)"
        )


if __name__ == "__main__":
    asyncio.run(main())
