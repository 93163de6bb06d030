"""Crashes at the two points where a loss or a double spool could hide, injected on purpose.

``PAYLER_FAULT`` makes payler exit like a kill -9 exactly there (payler/faults.py):
- ``after-store``: the batch is in the spool, the source messages are not acknowledged: they come
  back, and must not be spooled (so delivered) twice;
- ``after-publish``: the broker confirmed the batch, the spool entries are not deleted: they are
  delivered again (at least once), and nothing is lost.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from payler.drivers.storages import storage_from_url
from payler.faults import FAULT_EXIT_STATUS
from tests.conftest import AMQP_URL, Rabbit
from tests.integration.conftest import Payler

pytestmark = pytest.mark.rabbitmq

N = 60


def configure(tmp_path: Path, rabbit: Rabbit, spool_id: str = "random") -> tuple[Path, str, str]:
    jobs, out = rabbit.queue_name("jobs"), rabbit.queue_name("out")
    dead = rabbit.queue_name("dlq")
    config = tmp_path / "configuration.yaml"
    config.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{queue: "{jobs}", default_destination: "{out}", dead_letter_queue: "{dead}",
               spool_id: "{spool_id}", prefetch: {N}, batch_size: {N}}}
  - callable: client.watch_storage
    options: {{declare_queues: ["{out}"], dead_letter_queue: "{dead}", batch_size: 20,
               lease_ms: 1000}}
"""
    )
    return config, jobs, out


@dataclass
class AfterCrash:
    """What is where once payler died: delivered so far, in the spool, back in the source."""

    delivered: int
    in_spool: int
    in_source: int


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The spool the crashing payler and its successor share."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path}/spool.db"


async def crash_then_recover(
    rabbit: Rabbit, tmp_path: Path, storage_url: str, config: Path, fault: str, jobs: str,
    out: str, messages: list[aio_pika.Message], expected: Callable[[AfterCrash], int],
) -> Counter[bytes]:  # fmt: skip
    """Run payler into the fault, restart it, and collect every delivery (duplicates too).

    ``expected`` says, from where things stood after the crash, how many deliveries there must
    be in all; the deliveries are collected until there are that many, plus a short settle time
    in which any further one would show.
    """
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": storage_url}
    bodies: list[bytes] = []
    target = asyncio.Event()
    wanted = [len(messages) * 10]

    async def on_message(message: AbstractIncomingMessage) -> None:
        bodies.append(message.body)
        await message.ack()
        if len(bodies) >= wanted[0]:
            target.set()

    await rabbit.channel.declare_queue(jobs, durable=True)
    channel = await rabbit.connection.channel()
    await (await channel.declare_queue(out, durable=True)).consume(on_message)
    if all(m.message_id for m in messages):
        for message in messages:
            await rabbit.publish(jobs, message)
    else:
        plain = [(m.body, dict(m.headers or {})) for m in messages]
        await rabbit.publish_without_message_ids(jobs, plain)
    crashing = await Payler.start(config, {**env, "PAYLER_FAULT": fault}, tmp_path)
    code = await crashing.wait(timeout_s=30)
    assert code == FAULT_EXIT_STATUS, crashing.log
    assert f"injected fault at {fault!r}" in crashing.log

    async with storage_from_url(storage_url) as storage:
        state = AfterCrash(len(bodies), await storage.count(), await rabbit.count(jobs))
    wanted[0] = expected(state)
    if len(bodies) >= wanted[0]:
        target.set()
    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        await asyncio.wait_for(target.wait(), 30)
        await rabbit.drain(out, settle_s=1.0)  # a delivery beyond the expected would land here
    except TimeoutError:
        pass
    finally:
        assert await payler.stop() == 0, payler.log
    await channel.close()
    assert len(bodies) == wanted[0], (state, len(bodies))
    return Counter(bodies)


@pytest.mark.parametrize(
    "with_message_ids", [True, False], ids=["message-ids", "no-ids-content-spool-ids"]
)
async def test_a_crash_between_store_and_ack_spools_nothing_twice(
    rabbit: Rabbit, tmp_path: Path, storage_url: str, with_message_ids: bool
) -> None:
    # Without message ids, only `spool_id: content` recognises a redelivery.
    config, jobs, out = configure(tmp_path, rabbit, "random" if with_message_ids else "content")
    messages = [
        aio_pika.Message(
            f"m{i}".encode(),
            headers={"x-delay": 300},
            message_id=f"id-{i}" if with_message_ids else None,
        )
        for i in range(N)
    ]
    delivered = await crash_then_recover(
        rabbit, tmp_path, storage_url, config, "after-store", jobs, out, messages, lambda _: N
    )
    assert set(delivered) == {f"m{i}".encode() for i in range(N)}, "lost"
    assert max(delivered.values()) == 1, f"spooled twice: {delivered.most_common(3)}"


async def test_without_message_ids_the_default_random_ids_spool_twice_there(
    rabbit: Rabbit, tmp_path: Path, storage_url: str
) -> None:
    # The control experiment: the test above can fail, and does with `spool_id: random` (the
    # default, which never merges two identical messages: at least once, never lost).
    config, jobs, out = configure(tmp_path, rabbit, spool_id="random")
    messages = [aio_pika.Message(f"m{i}".encode(), headers={"x-delay": 300}) for i in range(N)]
    stored_before_crash = []
    delivered = await crash_then_recover(
        rabbit, tmp_path, storage_url, config, "after-store", jobs, out, messages,
        lambda after: stored_before_crash.append(after.in_spool) or N + after.in_spool,
    )  # fmt: skip
    assert set(delivered) == {f"m{i}".encode() for i in range(N)}, "lost"
    assert stored_before_crash[0] > 0
    assert sum(n - 1 for n in delivered.values()) == stored_before_crash[0]


async def test_a_crash_between_publish_and_delete_loses_nothing(
    rabbit: Rabbit, tmp_path: Path, storage_url: str
) -> None:
    config, jobs, out = configure(tmp_path, rabbit)
    # Due together, after everything is spooled: the first delivered batch is cut short.
    messages = [
        aio_pika.Message(f"m{i}".encode(), headers={"x-delay": 1500}, message_id=f"id-{i}")
        for i in range(N)
    ]
    seen: list[AfterCrash] = []
    delivered = await crash_then_recover(
        rabbit, tmp_path, storage_url, config, "after-publish", jobs, out, messages,
        lambda after: seen.append(after) or after.delivered + after.in_spool,
    )  # fmt: skip
    [after] = seen
    assert after.in_source == 0
    assert after.in_spool == N, "nothing was deleted before the crash"
    assert set(delivered) == {f"m{i}".encode() for i in range(N)}, "lost"
    twice = [body for body, n in delivered.items() if n > 1]
    # At least once: the batch confirmed before the crash comes again, and only that batch.
    assert len(twice) == after.delivered
    assert 0 < len(twice) <= 20
