"""Duplicates and reused ids: what a store does with an id the spool already holds.

A source redelivers a message after a crash between the spool write and its acknowledgement:
same id, same content — a *duplicate*, not stored again. A producer may also reuse a message
id for a different message: same id, other content — a new message, which must not be taken for
a duplicate (acknowledged and never delivered). Every entry keeps the digest of its content
(:func:`~payler.identity.content_digest`) so that a store can tell the two apart, against
pending, dead and delivered (tombstone) entries alike; the new message is stored under
:func:`~payler.identity.derived_id`.

:func:`plan_store` is the rule; backends that can read the digests of the ids a batch touches
and then insert (in one transaction, or racing benignly) apply it as it is, the Redis backend
applies the same rule inside its store script.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from payler.identity import derived_id
from payler.payload import Payload


@dataclass(frozen=True, slots=True)
class Stored:
    """What one store did with its batch.

    ``new``: the ids the new entries were stored under, in batch order (a reused id's derived
    one); ``duplicates``: the ids of payloads already stored with the same content, left as they
    were; ``renamed``: each reused id and the derived id its (different) message was stored under.
    """

    new: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    def __add__(self, other: Stored) -> Stored:
        return Stored(
            self.new + other.new,
            self.duplicates + other.duplicates,
            self.renamed | other.renamed,
        )


def candidate_ids(batch: Sequence[Payload], digests: Sequence[str]) -> list[str]:
    """Every id a store of ``batch`` may look at: each payload's own, and its derived one."""
    return [i for p, d in zip(batch, digests, strict=True) for i in (p.id, derived_id(p.id, d))]


def plan_store(
    batch: Sequence[Payload], digests: Sequence[str], taken: dict[str, str | None]
) -> tuple[list[tuple[Payload, str]], Stored]:
    """Decide what a store inserts: the payloads (under their final id) with their digests.

    ``taken`` maps each id already in the spool (among :func:`candidate_ids`) to its digest,
    ``None`` when the entry has none (written before digests were kept: taken as the same
    message, as payler always did). Payloads earlier in ``batch`` count as stored for the later
    ones. A derived id already taken means that reuse was stored before: a duplicate.
    """
    taken = dict(taken)
    inserts: list[tuple[Payload, str]] = []
    stored = Stored()
    for payload, digest in zip(batch, digests, strict=True):
        target = payload.id
        if target in taken:
            if taken[target] is None or taken[target] == digest:
                stored.duplicates.append(payload.id)
                continue
            target = derived_id(payload.id, digest)
            if target in taken:
                stored.duplicates.append(payload.id)
                continue
            stored.renamed[payload.id] = target
        taken[target] = digest
        entry = payload if target == payload.id else payload.model_copy(update={"id": target})
        inserts.append((entry, digest))
        stored.new.append(target)
    return inserts, stored


__all__ = ["Stored", "candidate_ids", "plan_store"]
