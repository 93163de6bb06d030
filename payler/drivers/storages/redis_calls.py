"""How the Redis spool storage talks to its shards (:mod:`payler.drivers.storages.redis`).

One script call on one shard; calls on many shards in one pipeline (a cluster client sends
each node its share at once, on one connection); a read per shard; a store that waits for
replicas (``WAIT``); and which errors are outages. The same code serves one server (a plain
``Redis`` client, one shard or several) and a cluster (``RedisCluster``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from payler.drivers.storages.base import EntryState
from payler.drivers.storages.redis_keys import KeySpace
from payler.errors import TransientError, is_transient

#: The client of one server, or of a cluster.
Client = Redis | RedisCluster
T = TypeVar("T")

#: How a replica refuses WAIT (a pipeline that reached a master just demoted by a failover).
_WAIT_ON_REPLICA = "WAIT cannot be used with replica"
_REDIS_CONNECTION_MODULE = os.path.join("redis", "asyncio", "connection.py")


def is_outage(exc: BaseException) -> bool:
    """:func:`~payler.errors.is_transient`, and one race of redis-py's cluster client: on
    CLUSTERDOWN it closes every connection (to read the topology again) while other calls of
    this storage may be using them, which then fail inside redis-py's connection module with an
    AttributeError (its stream is gone: ``'NoneType' object has no attribute 'writelines'``).
    Seen in the cluster failover test: a lost connection, by its cause."""
    if isinstance(exc, AttributeError):
        return _raised_in(exc, _REDIS_CONNECTION_MODULE)
    return is_transient(exc)


def _raised_in(exc: BaseException, path_end: str) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in a file ending with
    ``path_end``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(path_end)


@dataclass(frozen=True, slots=True)
class Shard:
    """One shard's keys, as the scripts take them."""

    keys: KeySpace
    #: KEYS of every script but the listing.
    indexes: tuple[str, ...]
    #: The first ARGVs of every script but the listing.
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, keys: KeySpace) -> Shard:
        indexes = (
            keys.visible,
            keys.by_due("pending"),
            keys.by_due("dead"),
            keys.delivered,
            keys.delivered_digests,
        )
        prefixes = (
            keys.entry_prefix,
            keys.destination_prefix("pending"),
            keys.destination_prefix("dead"),
        )
        return cls(keys, indexes, prefixes)

    def index(self, destination: str | None, state: EntryState) -> str:
        if destination is None:
            return self.keys.by_due(state)
        return self.keys.by_destination(state, destination)


async def gather_all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``calls`` concurrently (one per shard); once all have ended, raise the first error.

    Not a TaskGroup: its ExceptionGroup would hide a Redis error from the outage check, and a
    shard's call that fails leaves the others' effects in place anyway (each is atomic)."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]  # no exception is left in it


async def run(shard: Shard, script: AsyncScript, *args: str | int | bytes) -> Any:
    """Run one of the spool scripts (not the listing) on ``shard``."""
    return await script(keys=list(shard.indexes), args=[*shard.prefixes, *args])


async def run_many(
    client: Client, calls: Sequence[tuple[Shard, AsyncScript, Sequence[str | int | bytes]]]
) -> list[Any]:
    """Run spool scripts on several shards in one pipeline (a cluster's sends one per
    node, at once): one round trip instead of one per shard. A node that does not have a
    script yet (NOSCRIPT: a new master after a failover) gets it, and those calls again."""
    if not calls:
        return []
    if len(calls) == 1:
        shard, script, args = calls[0]
        return [await run(shard, script, *args)]
    async with client.pipeline(transaction=False) as pipe:
        for shard, script, args in calls:
            keys = shard.indexes
            # (By name: redis-py's cluster pipeline refuses its evalsha method, for the
            # NOSCRIPT it cannot handle; this one handles it, below.)
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *shard.prefixes, *args)
        results = list(await pipe.execute(raise_on_error=False))
    for i, result in enumerate(results):
        if isinstance(result, NoScriptError):
            shard, script, args = calls[i]
            results[i] = await run(shard, script, *args)  # loads it, and runs it
        elif isinstance(result, Exception):
            raise result
    return results


async def each_shard(
    client: Client, shards: Sequence[Shard], command: Callable[[Any, Shard], object]
) -> list[Any]:
    """``command(pipeline, shard)`` for each of ``shards`` (a read), in one pipeline (a
    cluster's groups them by node); their replies."""
    async with client.pipeline(transaction=False) as pipe:
        for shard in shards:
            command(pipe, shard)
        return list(await pipe.execute())


def masters(client: Client, shards: Sequence[Shard]) -> dict[str, ClusterNode]:
    """The cluster nodes serving ``shards`` now, by name, as the client knows them (none
    on a single server)."""
    found: dict[str, ClusterNode] = {}
    if isinstance(client, RedisCluster):
        for shard in shards:
            node = client.get_node_from_key(shard.keys.visible)
            if node is not None:
                found[node.name] = node
    return found


async def store_and_wait(
    client: Client,
    script: AsyncScript,
    chunks: Sequence[tuple[Shard, Sequence[str | int | bytes]]],
    state: str,
    wanted: int,
    timeout_ms: int,
) -> list[list[bytes]] | None:
    """Run the store ``script`` for ``chunks`` (shard, arguments) and ``WAIT`` until
    ``wanted`` replicas of every master they went to have them (``timeout_ms`` at most).

    Returns each chunk's outcome, or None when a master lacks the script (NOSCRIPT: load it,
    call again). Raises :class:`~payler.errors.TransientError` when fewer replicas
    acknowledged in time, or a shard's master changed under the call (a failover)."""
    shards = list({id(shard): shard for shard, _ in chunks}.values())
    # WAIT covers the writes made on *its* connection: the scripts, then a counter bump per
    # shard (a write even when every payload was a duplicate, stored by an earlier attempt
    # that may not have reached a replica), then WAIT, on each master's one connection (a
    # cluster's pipeline sends each node its commands in order, on one connection).
    pinned = masters(client, shards)
    async with client.pipeline(transaction=False) as pipe:
        for shard, args in chunks:
            keys = shard.indexes
            pipe.execute_command(
                "EVALSHA", script.sha, len(keys), *keys, *shard.prefixes, state, *args
            )
        for shard in shards:
            pipe.incr(shard.keys.wait_fence)
        for node in pinned.values():
            pipe.execute_command("WAIT", wanted, timeout_ms, target_nodes=node)
        if not pinned:
            pipe.execute_command("WAIT", wanted, timeout_ms)
        results = list(await pipe.execute(raise_on_error=False))
    stored, acked = results[: len(chunks)], results[len(chunks) + len(shards) :]
    if any(isinstance(result, NoScriptError) for result in stored):
        return None
    moved = False
    for result in results:
        if isinstance(result, ResponseError) and _WAIT_ON_REPLICA in str(result):
            moved = True  # the node was just demoted: the scripts went elsewhere
        elif isinstance(result, Exception):
            raise result
    # The client followed a redirection (MOVED: a failover, a resharding) for a script or
    # a counter: the WAIT sent to the node it had then may not have covered them.
    moved = moved or set(masters(client, shards)) != set(pinned)
    if moved:
        raise TransientError(
            "Redis spool: a shard's master changed during a store that waits for "
            "replicas (a failover): it is retried"
        )
    fewest = min(int(count) for count in acked)
    if fewest < wanted:
        raise TransientError(
            f"Redis spool: {fewest} of {wanted} replicas acknowledged a store within "
            f"{timeout_ms} ms (wait_replicas): it is retried"
        )
    return [list(got) for got in stored]


__all__ = [
    "Client",
    "Shard",
    "each_shard",
    "gather_all",
    "is_outage",
    "masters",
    "run",
    "run_many",
    "store_and_wait",
]
