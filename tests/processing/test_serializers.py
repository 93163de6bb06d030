"""Serializers: round trips, and only ValueError on a body that cannot be read."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from payler.processing.serializers import BYTES, JSON, MSGPACK, TEXT, find_serializer


class Item(BaseModel):
    name: str
    tags: list[str]


@pytest.mark.parametrize("serializer", [JSON, MSGPACK])
def test_structured_round_trips(serializer: object) -> None:
    value = {"a": [1, 2.5, "é", None, True], "b": {"c": "d"}}
    assert serializer.decode(serializer.encode(value)) == value  # type: ignore[attr-defined]
    model = Item(name="x", tags=["y"])
    assert serializer.decode(serializer.encode(model)) == model.model_dump()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("serializer", "body"),
    [
        (JSON, b"{nope"),
        (JSON, b"\xff"),
        (MSGPACK, b"\xc1"),
        (MSGPACK, b"\x92\x01"),
        (TEXT, b"\xff"),
    ],
)
def test_unreadable_bodies_raise_value_error_only(serializer: object, body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any message: the type is the contract
        serializer.decode(body)  # type: ignore[attr-defined]


def test_lookup_by_content_type() -> None:
    assert find_serializer("application/json; charset=utf-8") is JSON
    assert find_serializer("application/vnd.acme+json") is JSON
    assert find_serializer("application/x-msgpack") is MSGPACK
    assert find_serializer("text/markdown") is TEXT
    assert find_serializer("bytes") is BYTES
    assert find_serializer("image/png") is None
    with pytest.raises(TypeError):
        TEXT.encode(b"bytes")
