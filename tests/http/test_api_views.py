"""The API's answers for the console's pages, over real HTTP against a daemon in the test
process: due filters, the due-time histogram, dead letters by reason, discard, the overview."""

from __future__ import annotations

import time

from payler.admin.times import iso
from payler.testing import make_payload
from tests.http.conftest import Start, eventually

HOUR = 3_600_000


async def test_due_filters_and_the_histogram(start_daemon: Start) -> None:
    daemon = await start_daemon()
    now = int(time.time() * 1000)
    for key, hours in (("a", 1), ("b", 2), ("c", 2), ("d", 30)):
        scheduled = await daemon.client.post(
            "/v1/scheduled",
            json={"destination": "out", "body": key, "idempotency_key": key,
                  "deliver_at": iso(now + hours * HOUR - 1000)},
        )  # fmt: skip
        assert scheduled.status_code == 201, scheduled.text
    # The due range filters the listing (ISO 8601 or epoch ms).
    listed = await daemon.client.get(
        "/v1/scheduled", params={"due_from": iso(now + HOUR), "due_to": str(now + 3 * HOUR)}
    )
    assert [e["body"] for e in listed.json()["items"]] == ["b", "c"]
    assert (await daemon.client.get("/v1/scheduled", params={"due_from": ""})).status_code == 200
    bad = await daemon.client.get("/v1/scheduled", params={"due_to": "tomorrow"})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("due_to: expected ISO 8601")

    histogram = await daemon.client.get(
        "/v1/scheduled/histogram",
        params={"due_from": str(now), "due_to": str(now + 4 * HOUR), "bucket_ms": HOUR},
    )
    assert histogram.status_code == 200, histogram.text
    body = histogram.json()
    assert [b["count"] for b in body["buckets"]] == [1, 2, 0, 0]
    assert (body["overdue"], body["later"], body["bucket_ms"]) == (0, 1, HOUR)
    default = (await daemon.client.get("/v1/scheduled/histogram")).json()
    assert len(default["buckets"]) == 24 and default["later"] == 1
    too_many = await daemon.client.get("/v1/scheduled/histogram", params={"bucket_ms": 1000})
    assert too_many.status_code == 400 and "at most 200 buckets" in too_many.json()["detail"]


async def test_the_same_idempotency_key_schedules_once_whatever_it_carries(
    start_daemon: Start,
) -> None:
    # The spool tells a redelivery from a reused id by content; an idempotency key is the
    # client's word that two requests are one, so there the key decides.
    daemon = await start_daemon()
    first = {"destination": "out", "body": "v1", "idempotency_key": "k", "delay_ms": HOUR}
    again = {**first, "body": "v2", "headers": {"retry": 1}}
    created = await daemon.client.post("/v1/scheduled", json=first)
    repeated = await daemon.client.post("/v1/scheduled", json=again)
    assert (created.status_code, repeated.status_code) == (201, 200), repeated.text
    assert created.json()["id"] == repeated.json()["id"] == "api:k"
    assert repeated.json()["created"] is False
    listed = (await daemon.client.get("/v1/scheduled")).json()["items"]
    assert [(e["id"], e["body"]) for e in listed] == [("api:k", "v1")]


async def test_dead_letters_by_reason_and_discard(start_daemon: Start) -> None:
    daemon = await start_daemon()
    daemon.broker.publish("payler-jobs", make_payload(b"bad", headers={"x-delay": "soon"}))
    daemon.broker.publish("payler-jobs", make_payload(b"worse", headers={"x-delay": -1}))

    async def grouped() -> bool:
        reasons = (await daemon.client.get("/v1/dead-letters/reasons")).json()
        return bool(reasons["total"] == 2)

    await eventually(grouped)
    reasons = (await daemon.client.get("/v1/dead-letters/reasons")).json()
    [group] = reasons["groups"]
    assert (group["reason_class"], group["count"], group["queue"]) == ("invalid-schedule", 2, 2)
    assert "x-delay" in group["example"] and reasons["complete"] is True
    listed = (await daemon.client.get("/v1/dead-letters")).json()["items"]
    one = next(d for d in listed if d["body"] == "bad")
    discarded = await daemon.client.post("/v1/dead-letters/discard", json={"ids": [one["id"]]})
    assert discarded.json() == {"discarded": 1, "failed": []}
    assert [p.body for p in daemon.broker.messages("payler-dead-letter")] == [b"worse"]
    refused = await daemon.client.post("/v1/dead-letters/discard", json={})
    assert refused.status_code == 400 and "select the dead letters" in refused.json()["detail"]


async def test_overview_shows_states_rates_lateness_and_the_spool(start_daemon: Start) -> None:
    daemon = await start_daemon()
    await daemon.broker.ensure_queue("out")
    now = int(time.time() * 1000)  # the messages' publish time, which delays count from
    for n in range(3):
        headers = {"x-delay": 0, "x-destination": "out"}
        daemon.broker.publish("payler-jobs", make_payload(b"%d" % n, headers=headers, due_ms=now))
    later = make_payload(b"later", headers={"x-delay": HOUR}, due_ms=now)
    daemon.broker.publish("payler-jobs", later)
    await daemon.broker.wait_for("out", 3)

    async def counted() -> bool:
        view = (await daemon.client.get("/v1/overview")).json()
        deliver = next(w for w in view["workflows"] if w["name"] == "deliver")
        return bool(deliver["totals"]["delivered"] == 3 and view["spools"][0]["pending"] == 1)

    await eventually(counted)
    view = (await daemon.client.get("/v1/overview")).json()
    assert (view["ready"], view["reason"]) == (True, None)
    workflows = {w["name"]: w for w in view["workflows"]}
    assert {w["state"] for w in workflows.values()} == {"ready"}
    assert workflows["ingest"]["totals"]["received"] == 4
    # Rates are per minute over the time since start (under a second: counted as one).
    assert workflows["deliver"]["rates"]["delivered"] > 0
    assert workflows["deliver"]["lateness"]["count"] == 3
    assert 0 < workflows["deliver"]["lateness"]["p99_ms"] < 60_000
    [spool] = view["spools"]
    assert (spool["storage"], spool["up"], spool["dead"]) == (f"memory://{daemon.name}", True, 0)
    assert spool["oldest_overdue_s"] == 0 and view["version"]
