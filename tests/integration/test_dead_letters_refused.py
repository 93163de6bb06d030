"""Dead letters the broker refuses, through the real RabbitMQ and the ``payler`` command (issue 7,
defect 2): what cannot be dead-lettered is parked in the spool as dead, its batch-mates flow
once, and the daemon stays up.

The dead-letter queue is deleted while payler runs, so that every dead letter is unroutable,
the minimal copy included.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, Rabbit
from tests.integration.conftest import Payler

pytestmark = pytest.mark.rabbitmq


def dead_entries(spool: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(spool) as db:
        rows = db.execute("SELECT body, last_error FROM spool WHERE state = 'dead' ORDER BY body")
        return [(bytes(body).decode(), error) for body, error in rows]


async def test_dead_letters_refused_for_good_are_parked_and_the_rest_flows_once(
    rabbit: Rabbit, tmp_path: Path
) -> None:
    jobs, out, dead = (rabbit.queue_name(role) for role in ("jobs", "out", "dlq"))
    config = tmp_path / "configuration.yaml"
    config.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{queue: "{jobs}", default_destination: "{out}", dead_letter_queue: "{dead}"}}
  - callable: client.watch_storage
    options: {{declare_queues: ["{out}"], dead_letter_queue: "{dead}"}}
"""
    )
    spool = tmp_path / "spool.db"
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": f"sqlite:///{spool}"}
    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await rabbit.channel.queue_delete(dead)
        # Without message ids: a batch that failed and came back would be spooled again under
        # new random ids, and its good messages delivered again (what the issue saw).
        messages: list[tuple[bytes, dict[str, object]]] = [
            (f"good-{i}".encode(), {"x-delay": 0}) for i in range(6)
        ]
        messages.insert(2, (b"invalid", {"x-delay": "soon"}))  # dead-lettered at ingest
        messages.insert(5, (b"unroutable", {"x-delay": 0, "x-destination": f"{out}-nowhere"}))
        await rabbit.publish_without_message_ids(jobs, messages)

        await payler.wait_for_line("is refused by", timeout_s=30)  # at ingest
        await payler.wait_for_line("refused it (", timeout_s=30)  # at delivery
        delivered = await rabbit.collect(out, 6, timeout_s=30)
    finally:
        code = await payler.stop()
    assert code == 0, payler.log

    delivered += [(0.0, m) for m in await rabbit.drain(out)]  # anything more: a duplicate
    bodies = sorted(m.body for _, m in delivered)
    assert bodies == sorted(f"good-{i}".encode() for i in range(6))  # each exactly once
    (invalid, ingest_error), (unroutable, delivery_error) = dead_entries(spool)
    assert (invalid, unroutable) == ("invalid", "unroutable")
    assert "not a number" in ingest_error and "minimal copy" in ingest_error
    assert "unroutable" in delivery_error and "minimal copy" in delivery_error
    parked = [line for line in payler.log.splitlines() if "parked in the spool as dead" in line]
    assert len(parked) == 2 and all("ERROR" in line for line in parked), payler.log
    assert "restarting" not in payler.log  # no workflow failed: the daemon stayed up throughout
