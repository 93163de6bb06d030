"""What the console's charts and groups show, computed where the data is (never in a browser
from raw lists): pending entries due per time bucket, and dead letters grouped by reason class.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from payler.admin.scan import scan
from payler.admin.times import iso
from payler.admin.views import DueBucket, DueHistogram, ReasonGroup, ReasonGroups
from payler.drivers.brokers.base import DEAD_LETTER_DESTINATION, DEAD_LETTER_REASON
from payler.payload import Payload
from payler.reasons import REASON_CLASSES, ReasonClass, reason_class

if TYPE_CHECKING:
    from payler.admin.operations import Admin

#: The most buckets one histogram has (each is one indexed count).
MAX_BUCKETS = 200
#: The most messages of each dead-letter queue looked at to group them (a queue is read one
#: message at a time, and put back).
REASON_QUEUE_SCAN_LIMIT = 1_000


async def due_histogram(
    admin: Admin,
    start_ms: int,
    end_ms: int,
    bucket_ms: int,
    destination: str | None = None,
) -> DueHistogram:
    """Pending entries due per ``bucket_ms`` from ``start_ms`` to ``end_ms``, plus those due
    before (overdue, when the start is now) and at the end or after. One indexed count per
    bucket: as fast with a million entries as with ten. Raises ``ValueError`` for a range that
    is empty, backwards, or more than :data:`MAX_BUCKETS` buckets."""
    if bucket_ms <= 0 or end_ms <= start_ms:
        raise ValueError("the range must end after it starts, with a positive bucket size")
    if -(-(end_ms - start_ms) // bucket_ms) > MAX_BUCKETS:
        raise ValueError(
            f"at most {MAX_BUCKETS} buckets: choose a larger bucket or a shorter range"
        )
    buckets = []
    async with admin.storage() as storage:
        overdue = await storage.count_due(None, start_ms, destination=destination)
        for low in range(start_ms, end_ms, bucket_ms):
            count = await storage.count_due(
                low, min(low + bucket_ms, end_ms), destination=destination
            )
            buckets.append(DueBucket(start_ms=low, start_at=iso(low), count=count))
        later = await storage.count_due(end_ms, None, destination=destination)
    return DueHistogram(
        start_ms=start_ms,
        end_ms=end_ms,
        bucket_ms=bucket_ms,
        buckets=buckets,
        overdue=overdue,
        later=later,
    )


async def reason_groups(admin: Admin, destination: str | None = None) -> ReasonGroups:
    """Dead letters grouped by reason class, with counts: the spool's dead entries (read in
    due order, at most :data:`~payler.admin.scan.HEADER_SCAN_LIMIT`: a reason has no index)
    and what each dead-letter queue holds (its first :data:`REASON_QUEUE_SCAN_LIMIT`
    messages, looked at and put back). ``complete`` says whether every one was counted."""
    spool: Counter[ReasonClass] = Counter()
    queue: Counter[ReasonClass] = Counter()
    texts: dict[ReasonClass, Counter[str]] = {name: Counter() for name in REASON_CLASSES}

    def tally(counter: Counter[ReasonClass], reason: str | None) -> bool:
        name = reason_class(reason)
        counter[name] += 1
        if reason:
            texts[name][reason[:300]] += 1
        return False  # keep reading: nothing is collected

    async with admin.storage() as storage:
        dead = await storage.count(destination=destination, state="dead")
        filters = {"state": "dead", "destination": destination}
        more, _ = await scan(storage, filters, lambda p: tally(spool, p.last_error), 1, None)
    complete = more is None and sum(spool.values()) >= dead
    errors: dict[str, str] = {}
    for name in admin.target.dead_letter_queues:
        try:
            async with admin.broker() as broker:
                waiting = await broker.peek(name, REASON_QUEUE_SCAN_LIMIT)
        except NotImplementedError:
            errors[name] = "this broker cannot look into a queue without taking from it"
            continue
        complete = complete and len(waiting) < REASON_QUEUE_SCAN_LIMIT
        for payload in waiting:
            if destination is None or _header(payload, DEAD_LETTER_DESTINATION) == destination:
                tally(queue, _header(payload, DEAD_LETTER_REASON))
    groups = [
        ReasonGroup(
            reason_class=name,
            count=spool[name] + queue[name],
            spool=spool[name],
            queue=queue[name],
            example=texts[name].most_common(1)[0][0] if texts[name] else None,
        )
        for name in REASON_CLASSES
        if spool[name] + queue[name]
    ]
    groups.sort(key=lambda g: -g.count)
    return ReasonGroups(
        groups=groups,
        total=sum(g.count for g in groups),
        complete=complete and not errors,
        queue_errors=errors,
    )


def _header(payload: Payload, name: str) -> str | None:
    value = payload.headers.get(name)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


__all__ = ["MAX_BUCKETS", "REASON_QUEUE_SCAN_LIMIT", "due_histogram", "reason_groups"]
