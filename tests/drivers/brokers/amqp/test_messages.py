"""AMQP messages to payloads and back, without a broker: the rules that make one message affect
only itself."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from payler.drivers.brokers.amqp.messages import (
    ORIGINAL_HEADERS,
    FrameTooLarge,
    dead_letter_outgoing,
    to_outgoing,
    to_payload,
)
from payler.drivers.brokers.amqp.tolerant import UnreadableTimestamp
from payler.testing import make_payload


def delivered(body: bytes = b"b", **properties: Any) -> DeliveredMessage:
    return DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="c", delivery_tag=1, routing_key="q"),
        header=ContentHeader(0, len(body), Basic.Properties(**properties)),
        body=body,
        channel=cast(Any, None),
    )


class Exploding:
    """Properties whose every read raises: a bug, wherever it would be."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"cannot read {name}")


def test_reading_a_message_never_raises_whatever_goes_wrong() -> None:
    message = DeliveredMessage(
        delivery=Basic.Deliver(delivery_tag=1),
        header=cast(Any, type("Header", (), {"properties": Exploding()})()),
        body=b"raw",
        channel=cast(Any, None),
    )

    payload = to_payload(message, "jobs", 1_000)

    assert payload.body == b"raw" and payload.source == "jobs" and payload.due_ms == 1_000
    assert payload.defect is not None and "cannot read" in payload.defect
    assert payload.id.startswith("amqp:jobs:#")


def test_properties_are_read_exactly_as_they_came() -> None:
    payload = to_payload(
        delivered(
            content_type="application/json",
            message_id="m-1",
            expiration="0060000",  # aio-pika would have made it 60.0 seconds, then "60000"
            timestamp=datetime(2200, 1, 1, tzinfo=UTC),
            delivery_mode=2,
            priority=3,
            message_type="t",
            headers={"blob": bytearray(b"\x00"), "nested": [{"b": bytearray(b"1")}]},
        ),
        "jobs",
        1_000,
    )
    props = payload.properties
    assert payload.defect is None and payload.id == "amqp:jobs:m-1"
    assert (props.expiration, props.timestamp_ms) == ("0060000", 7_258_118_400_000)
    assert (props.delivery_mode, props.priority, props.type) == (2, 3, "t")
    assert payload.headers == {"blob": b"\x00", "nested": [{"b": b"1"}]}
    assert type(payload.headers["blob"]) is bytes


def test_headers_nested_deeper_than_the_spool_holds_are_a_defect() -> None:
    deep: Any = "leaf"
    for _ in range(70):
        deep = {"d": deep}
    payload = to_payload(delivered(headers={"deep": deep}), "jobs", 1_000)
    assert payload.defect is not None and "nested more than 64 levels" in payload.defect


def test_an_unreadable_timestamp_header_keeps_its_seconds() -> None:
    payload = to_payload(delivered(headers={"at": UnreadableTimestamp(2**62)}), "jobs", 1)
    assert payload.headers == {"at": 2**62}
    assert (
        payload.defect is not None and f"header 'at' is a timestamp ({2**62} s)" in payload.defect
    )


@pytest.mark.parametrize(("mode", "sent"), [(None, 2), (0, 2), (1, 1), (2, 2), (7, 2)])
def test_publishes_are_persistent_unless_the_payload_says_transient(
    mode: int | None, sent: int
) -> None:
    payload = make_payload(destination="q", delivery_mode=mode)
    assert to_outgoing(payload, {}, 131_072).properties.delivery_mode == sent


def test_the_content_header_size_counts_the_message_id_aiormq_adds() -> None:
    def fitting(message_id: str | None) -> int:
        """The largest header value that fits a frame of 4096 bytes."""
        size = 4096
        while True:
            payload = make_payload(
                destination="q", headers={"h": "x" * size}, message_id=message_id
            )
            try:
                to_outgoing(payload, payload.headers, 4096)
                return size
            except FrameTooLarge:
                size -= 1

    # aiormq gives a message without an id one of 32 characters: 33 bytes more than ""...
    assert fitting(None) == fitting("m" * 32) < fitting("m")


def test_a_dead_letter_falls_back_to_json_headers_but_not_when_too_large() -> None:
    payload = make_payload(destination="dead", headers={"n": 10**30})
    with pytest.raises(TypeError, match="Unsupported numeric value"):
        to_outgoing(payload, payload.headers, 131_072)
    outgoing = dead_letter_outgoing(payload, {**payload.headers, "reason": "r"}, 131_072)
    assert outgoing.properties.headers == {
        "reason": "r",
        ORIGINAL_HEADERS: '{"n":1000000000000000000000000000000}',
    }
    big = make_payload(destination="dead", headers={"h": "x" * 5000})
    with pytest.raises(FrameTooLarge, match="frame_max of 4096 bytes"):
        dead_letter_outgoing(big, big.headers, 4096)
    assert to_outgoing(big, big.headers, 0).body == big.body  # frame_max 0: no limit


def test_a_header_name_longer_than_amqp_allows_is_refused_not_cut() -> None:
    # pamqp would cut it to 128 bytes, with only a warning in the log.
    long_name = "k" * 129
    for headers in ({long_name: 1}, {"outer": {long_name: 1}}, {"list": [{long_name: 1}]}):
        payload = make_payload(destination="q", headers=headers)
        with pytest.raises(ValueError, match="longer than AMQP's 128 bytes"):
            to_outgoing(payload, payload.headers, 131_072)
    assert to_outgoing(make_payload(destination="q"), {"k" * 128: 1}, 131_072)
