"""How the Redis spool spreads over shards, and the URL options that say so.

A *shard* is one complete set of the spool's keys (:class:`~.redis_keys.KeySpace`) whose names
all carry one Redis Cluster hash tag, ``<prefix>{<tag>}:...``: every key of a shard lives in one
hash slot, so each Lua script, which only touches the keys of one shard, runs on one node. An
entry belongs to the shard :func:`shard_of` its id: the same id always maps to the same shard, so
the dedupe rule (an id already stored, or its tombstone) holds within that shard.

The tags are chosen so that the shards' slots are spread evenly over the 16,384 slots (shard
``i`` of ``n`` in the ``i``-th ``n``-th of them): a cluster created with ``redis-cli --cluster
create`` gives each master an even, contiguous run of slots, and so an even share of the shards.

URL options (removed from the URL before redis-py sees it):

``prefix``          what every key starts with (``payler:``)
``shards``          how many shards; unsharded (today's single-server key layout) when absent on
                    ``redis://``; 16 on ``redis+cluster://``
``wait_replicas``   after each store, ``WAIT`` until this many replicas have it (0: do not wait)
``wait_timeout_ms`` how long that ``WAIT`` may take (1000 ms); fewer replicas by then is an outage
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from payler.drivers.storages.redis_keys import DEFAULT_PREFIX, KeySpace
from payler.errors import ConfigError
from payler.identity import DERIVED_ID_DIGITS
from payler.urls import mask_url

#: The URL schemes of a Redis Cluster (the others name one server).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Shards of a cluster spool unless the URL says otherwise: a few per master of a small
#: cluster, so that adding masters later still spreads the load.
DEFAULT_CLUSTER_SHARDS = 16
#: The most shards a spool may have: a claim reads the head of every shard.
MAX_SHARDS = 256
DEFAULT_WAIT_TIMEOUT_MS = 1000
_OPTIONS = ("prefix", "shards", "wait_replicas", "wait_timeout_ms")


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """The spool's own options from its URL (see the module docstring)."""

    prefix: str = DEFAULT_PREFIX
    shards: int | None = None  # None: unsharded
    wait_replicas: int = 0
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS
    cluster: bool = False


def split_options(url: str) -> tuple[str, RedisOptions]:
    """``url`` without payler's own query parameters, and those parameters.

    Raises :class:`~payler.errors.ConfigError` for a value that is not a number in range.
    """
    parts = urlsplit(url)
    cluster = parts.scheme.lower() in CLUSTER_SCHEMES
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {name: value for name, value in query if name in _OPTIONS}
    rest = urlencode([(name, value) for name, value in query if name not in _OPTIONS])

    def number(name: str, default: int | None, low: int, high: int) -> int | None:
        if name not in given:
            return default
        value = given[name]
        if not value.isdigit() or not low <= int(value) <= high:
            raise ConfigError(
                f"storage URL {mask_url(url)!r}: {name}={value!r} is not a whole number "
                f"from {low} to {high}"
            )
        return int(value)

    shards = number("shards", DEFAULT_CLUSTER_SHARDS if cluster else None, 1, MAX_SHARDS)
    prefix = given.get("prefix", DEFAULT_PREFIX)
    if shards is not None and ("{" in prefix or "}" in prefix):
        raise ConfigError(
            f"storage URL {mask_url(url)!r}: a sharded spool's prefix may not hold {{ or }} "
            "(they would change the keys' hash slots)"
        )
    options = RedisOptions(
        prefix=prefix,
        shards=shards,
        wait_replicas=number("wait_replicas", 0, 0, 100) or 0,
        wait_timeout_ms=number("wait_timeout_ms", DEFAULT_WAIT_TIMEOUT_MS, 1, 3_600_000)
        or DEFAULT_WAIT_TIMEOUT_MS,
        cluster=cluster,
    )
    return urlunsplit(parts._replace(query=rest)), options


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A ``redis+cluster://[user:pw@]host:port,host:port/...`` URL as a ``redis://`` (or
    ``rediss://``) URL naming its first node, which redis-py can parse, and every node."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"storage URL {mask_url(url)!r}: {item!r} is not host:port (a cluster URL "
                "names its nodes as host:port,host:port,...)"
            )
        nodes.append((host.strip("[]"), int(port)))
    scheme = parts.scheme.lower().removesuffix("+cluster")
    first = f"{userinfo}@{hosts.split(',')[0]}" if userinfo else hosts.split(",")[0]
    return urlunsplit(parts._replace(scheme=scheme, netloc=first)), nodes


def shard_tags(count: int) -> list[str]:
    """The hash tag of each of ``count`` shards: shard ``i``'s slot lies in the ``i``-th
    ``count``-th of the slots (an even spread over a cluster's masters)."""
    tags = []
    for i in range(count):
        low = i * REDIS_CLUSTER_HASH_SLOTS // count
        high = (i + 1) * REDIS_CLUSTER_HASH_SLOTS // count
        attempt = 0
        while not low <= key_slot(f"{i}.{attempt}".encode()) < high:
            attempt += 1  # about `count` attempts: each lands in the range with 1/count odds
        tags.append(f"{i}.{attempt}")
    return tags


def shard_keys(prefix: str, count: int | None) -> list[KeySpace]:
    """The key spaces of the shards (one, with the plain ``prefix``, when unsharded)."""
    if count is None:
        return [KeySpace(prefix)]
    return [KeySpace(f"{prefix}{{{tag}}}:") for tag in shard_tags(count)]


def shard_key(payload_id: str) -> str:
    """What decides an id's shard: the id less any derived-id suffixes (``~`` and the digest
    digits), so that an entry stored under :func:`~payler.identity.derived_id` is in the shard
    of the id it derives from, where the store script put it."""
    while (
        len(payload_id) > DERIVED_ID_DIGITS
        and payload_id[-DERIVED_ID_DIGITS - 1] == "~"
        and all(c in "0123456789abcdef" for c in payload_id[-DERIVED_ID_DIGITS:])
    ):
        payload_id = payload_id[: -DERIVED_ID_DIGITS - 1]
    return payload_id


def shard_of(payload_id: str, count: int) -> int:
    """The shard (0 to ``count`` - 1) of ``payload_id``: stable across processes and versions."""
    return zlib.crc32(shard_key(payload_id).encode()) % count


__all__ = [
    "CLUSTER_SCHEMES",
    "DEFAULT_CLUSTER_SHARDS",
    "MAX_SHARDS",
    "RedisOptions",
    "cluster_nodes",
    "shard_key",
    "shard_keys",
    "shard_of",
    "shard_tags",
    "split_options",
]
