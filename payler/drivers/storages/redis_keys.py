"""Every Redis key the Redis spool storage uses, and nothing else (arq keeps them in one place too).

All keys of one spool start with its prefix (``payler:`` unless the URL says ``?prefix=...``), so
several spools, or the tests, can share one Redis database. A prefix must not be a prefix of
another spool's, or their keys could meet (``a:`` and ``a:entry:`` would).

==========================================  =============================================
``<prefix>entry:<id>``                      hash: one entry (the payload and its bookkeeping)
``<prefix>visible``                         zset: pending entries by *visibility* ms (claims)
``<prefix>due:pending``                     zset: pending entries (leased or not) by due ms
``<prefix>due:dead``                        zset: dead entries by due ms
``<prefix>due:pending:to:<destination>``    zset: one destination's pending entries by due ms
``<prefix>due:dead:to:<destination>``       zset: one destination's dead entries by due ms
``<prefix>delivered``                       zset: delivered entries' ids by tombstone expiry ms
``<prefix>delivered:digests``               hash: delivered entry id → its content digest
``<prefix>by:message_id:<value>``           set: ids of the entries with that message id
``<prefix>by:correlation_id:<value>``       set: ids of the entries with that correlation id
``<prefix>schema``                          string: the version of this key layout
``<prefix>shards``                          string: a sharded spool's shard count
``<prefix>wait``                            string: a counter bumped by stores that WAIT
==========================================  =============================================

A sharded spool (:mod:`payler.drivers.storages.redis_shards`) has one complete set of these keys
per shard, each under its own prefix ``<prefix>{<tag>}:`` (a Redis Cluster hash tag), and the
``shards`` key under the plain prefix; an unsharded one (a single server, by default) has the
keys above as they are.

The lookup sets (``by:``) were added in layout version 1: a spool made before is indexed when
a payler that knows them first opens it. The Lua scripts build their names from the entry
prefix (``<prefix>entry:`` less ``entry:``, plus ``by:``): keep :meth:`KeySpace.lookup` and
``_SPOOL`` in ``redis.py`` in step.

Members of every zset are entry ids. Ids and destinations are the *last* part of their keys, so
no id or destination can make two keys collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from payler.drivers.storages.base import EntryState

DEFAULT_PREFIX = "payler:"

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The key names of one spool, built from its prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def entry_prefix(self) -> str:
        """What an entry's key starts with; the Lua scripts append the id."""
        return f"{self.prefix}entry:"

    def entry(self, payload_id: str) -> str:
        """The hash holding one entry."""
        return f"{self.entry_prefix}{payload_id}"

    @property
    def visible(self) -> str:
        """The claim index: pending entries scored by the time they may next be claimed."""
        return f"{self.prefix}visible"

    @property
    def delivered(self) -> str:
        """The tombstones: ids of delivered entries, scored by when they may be forgotten."""
        return f"{self.prefix}delivered"

    @property
    def delivered_digests(self) -> str:
        """The tombstones' content digests, by id (a tombstone of an older payler has none)."""
        return f"{self.prefix}delivered:digests"

    def by_due(self, state: EntryState) -> str:
        """The entries in ``state``, scored by due ms (listing and counting)."""
        return f"{self.prefix}due:{state}"

    def destination_prefix(self, state: EntryState) -> str:
        """What a per-destination index starts with; the Lua scripts append the destination."""
        return f"{self.by_due(state)}:to:"

    def by_destination(self, state: EntryState, destination: str) -> str:
        """The entries in ``state`` going to ``destination``, scored by due ms."""
        return f"{self.destination_prefix(state)}{destination}"

    def lookup(self, field: str, value: str) -> str:
        """The set of the ids of entries whose property ``field`` is ``value``."""
        return f"{self.prefix}by:{field}:{value}"

    @property
    def schema(self) -> str:
        """The layout version of this spool's keys."""
        return f"{self.prefix}schema"

    @property
    def shards(self) -> str:
        """A sharded spool's shard count (absent: unsharded), checked by every process."""
        return f"{self.prefix}shards"

    @property
    def wait_fence(self) -> str:
        """A counter that a store waiting for replicas bumps, so that its ``WAIT`` covers the
        batch even when every payload in it was stored already (by an earlier attempt)."""
        return f"{self.prefix}wait"

    @property
    def match_entries(self) -> str:
        """A ``SCAN MATCH`` pattern for every entry hash of this spool."""
        return _GLOB_SPECIALS.sub(r"\\\1", self.entry_prefix) + "*"

    @property
    def match_all(self) -> str:
        """A ``SCAN MATCH`` pattern for every key of this spool (to drop a test's spool)."""
        return _GLOB_SPECIALS.sub(r"\\\1", self.prefix) + "*"


__all__ = ["DEFAULT_PREFIX", "KeySpace"]
