"""How the RabbitMQ driver reads the outcome of a batch of publishes when the broker answers
slowly or not at all: a stand-in for aiormq's channel decides when each publish is confirmed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from pamqp.commands import Basic

from payler.drivers.brokers.rabbitmq import RabbitMQBroker
from payler.errors import TransientError
from payler.testing import make_payload


@dataclass
class SlowChannel:
    """Confirms the publishes whose body is in ``answered`` at once; the others never."""

    answered: set[bytes]
    connection: Any = field(
        default_factory=lambda: SimpleNamespace(connection_tune=SimpleNamespace(frame_max=131_072))
    )

    async def basic_publish(self, body: bytes, **_: Any) -> Basic.Ack:
        if body not in self.answered:
            await asyncio.Event().wait()  # never confirmed
        return Basic.Ack()


def slow_broker(answered: set[bytes]) -> RabbitMQBroker:
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/", publish_timeout_s=0.2)
    channel = SlowChannel(answered)

    async def underlay() -> SlowChannel:
        return channel

    broker._publish_channel = SimpleNamespace(get_underlay_channel=underlay)  # type: ignore[assignment]
    return broker


async def test_publishes_confirmed_in_time_are_kept_and_only_the_others_retried() -> None:
    # Raising for the whole batch would publish the confirmed ones again: duplicates.
    broker = slow_broker({b"fast-1", b"fast-2"})
    batch = [make_payload(body, destination="q") for body in (b"fast-1", b"slow", b"fast-2")]

    rejections = await broker.process(batch)

    assert [(r.payload_id, r.permanent) for r in rejections] == [(batch[1].id, False)]
    assert "not confirmed within 0.2 s (outcome unknown" in rejections[0].reason


async def test_no_answer_at_all_is_an_outage() -> None:
    broker = slow_broker(set())
    with pytest.raises(TransientError, match="did not confirm 2 publish"):
        await broker.process(
            [make_payload(b"a", destination="q"), make_payload(b"b", destination="q")]
        )


async def test_publishes_after_an_unconfirmed_round_are_not_sent() -> None:
    # Two publishes with one message id go in two rounds (aiormq matches returns by id).
    broker = slow_broker({b"first"})
    batch = [
        make_payload(b"first", destination="q", message_id="same"),
        make_payload(b"slow", destination="q", message_id="other"),
        make_payload(b"second", destination="q", message_id="same"),
    ]

    rejections = {r.payload_id: r.reason for r in await broker.process(batch)}

    assert rejections.keys() == {batch[1].id, batch[2].id}
    assert rejections[batch[2].id].startswith("not sent")
