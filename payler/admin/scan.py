"""Reading a spool in due order, boundedly: for the filters that have no index (a header's
value, a dead letter's reason class)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from payler.drivers.storages.base import SpoolStorage, encode_cursor
from payler.payload import Payload

#: A scan reads at most this many entries per call (a header filter has no index): the page
#: then says how many it scanned and where to continue.
HEADER_SCAN_LIMIT = 10_000


async def scan(
    storage: SpoolStorage,
    filters: dict[str, Any],
    keep: Callable[[Payload], bool],
    limit: int,
    cursor: str | None,
) -> tuple[str | None, int]:
    """Read entries in due order until ``keep`` kept ``limit`` of them or
    :data:`HEADER_SCAN_LIMIT` were read; return where to continue (``None``: the end) and how
    many were read."""
    kept = scanned = 0
    while True:
        page = await storage.list(
            **filters, limit=min(500, HEADER_SCAN_LIMIT - scanned), cursor=cursor
        )
        for index, payload in enumerate(page.items):
            scanned += 1
            cursor = encode_cursor(payload.due_ms, payload.id)
            kept += keep(payload)
            if kept == limit:
                last = index == len(page.items) - 1 and page.next_cursor is None
                return (None if last else cursor), scanned
        if page.next_cursor is None:
            return None, scanned
        if scanned >= HEADER_SCAN_LIMIT:
            return cursor, scanned


def header_matches(headers: dict[str, Any], name: str, value: str) -> bool:
    """Whether header ``name`` is ``value`` (compared as text; bytes as UTF-8)."""
    if name not in headers:
        return False
    found = headers[name]
    if isinstance(found, bytes):
        found = found.decode("utf-8", "replace")
    elif isinstance(found, bool):
        found = str(found).lower()
    return str(found) == value


__all__ = ["HEADER_SCAN_LIMIT", "header_matches", "scan"]
