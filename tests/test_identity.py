"""Spool ids: stable for one message, distinct for different ones."""

from __future__ import annotations

from payler.identity import random_spool_id, spool_id


def test_a_message_id_is_the_identity() -> None:
    assert spool_id("amqp", "jobs", "m-1", b"a", "{}") == "amqp:jobs:m-1"
    assert spool_id("amqp", "jobs", "m-1", b"other body", "{}") == "amqp:jobs:m-1"
    assert spool_id("amqp", "other", "m-1", b"a", "{}") != "amqp:jobs:m-1"


def test_without_a_message_id_the_content_is_the_identity() -> None:
    first = spool_id("amqp", "jobs", None, b"body", '{"headers":{"x-delay":5}}')
    assert first == spool_id("amqp", "jobs", None, b"body", '{"headers":{"x-delay":5}}')
    assert first.startswith("amqp:jobs:#")
    assert first != spool_id("amqp", "jobs", None, b"body", '{"headers":{"x-delay":6}}')
    assert first != spool_id("amqp", "jobs", None, b"body!", '{"headers":{"x-delay":5}}')
    # Body and metadata are separated: moving bytes from one to the other changes the id.
    assert spool_id("amqp", "q", None, b"ab", "c") != spool_id("amqp", "q", None, b"a", "bc")


def test_random_ids_never_repeat() -> None:
    ids = {random_spool_id("amqp", "jobs") for _ in range(1000)}
    assert len(ids) == 1000
