"""Reason classes: a small, fixed set of names for why a message was dead-lettered.

A dead letter's reason is free text ("x-delay is not a number ('soon')"): right for a person,
wrong for a metric label or a filter, where every distinct text would be a new series. Each
reason belongs to one class of :data:`REASON_CLASSES`; :func:`reason_class` finds it from the
text payler itself writes. A reason payler did not write (a user's workflow) is ``other``.
"""

from __future__ import annotations

from typing import Literal

ReasonClass = Literal[
    "invalid-schedule",  # x-delay / x-deliver-at / x-destination cannot be honoured
    "undecodable",  # the message (or its spool entry) could not be decoded
    "too-large",  # over the spool's or the destination's size limit
    "unroutable",  # the destination does not exist (a returned, mandatory publish)
    "unencodable",  # a header or property the destination cannot carry
    "max-attempts",  # delivery failed max_attempts times
    "misfire",  # found later than max_lateness_ms
    "payler-error",  # a bug in payler, for this message alone
    "other",
]

#: Every reason class, in a stable order (metric labels, filters, the API's enum).
REASON_CLASSES: tuple[ReasonClass, ...] = (
    "invalid-schedule",
    "undecodable",
    "too-large",
    "unroutable",
    "unencodable",
    "max-attempts",
    "misfire",
    "payler-error",
    "other",
)

# First match wins: "gave up after 3 attempts: unroutable: ..." is max-attempts.
_RULES: tuple[tuple[ReasonClass, tuple[str, ...]], ...] = (
    ("max-attempts", ("gave up after",)),
    ("misfire", ("missed its due time",)),
    ("payler-error", ("a bug in payler", "cannot publish it", "cannot store it")),
    ("too-large", ("over the spool's limit", "too large", "larger than", "too big")),
    ("unroutable", ("unroutable", "no destination stream", "NO_ROUTE")),
    ("unencodable", ("cannot encode",)),
    ("undecodable", ("cannot be decoded", "cannot be read", "not valid", "cannot decode")),
    ("invalid-schedule", ("x-delay", "x-deliver-at", "x-destination", "default_delay_ms")),
)


def reason_class(reason: str | None) -> ReasonClass:
    """The class of a dead-letter reason text (``other`` when payler does not know it)."""
    if not reason:
        return "other"
    for name, markers in _RULES:
        if any(marker in reason for marker in markers):
            return name
    return "other"


__all__ = ["REASON_CLASSES", "ReasonClass", "reason_class"]
