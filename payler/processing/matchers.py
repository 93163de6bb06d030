"""Matchers: which handler takes a message.

A matcher is any callable of a :class:`~payler.processing.messages.Message` that returns a
truth value; :class:`Matcher` wraps one and composes with ``&``, ``|`` and ``~``::

    header("type", "order.created") & ~has_header("x-test")
    content_type("application/json") | field("kind", "invoice")

Exactly one handler of an application must match a message (see
:mod:`payler.processing.application`). A matcher that raises does not match (the error is
logged once per matcher): one odd message cannot stop the routing of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from payler.processing.messages import Message
from payler.processing.serializers import media_type

log = logging.getLogger("payler.processing")

Predicate = Callable[[Message], Any]
_MISSING = object()


class Matcher:
    """A predicate over messages, with a description for logs and dead-letter reasons."""

    __slots__ = ("_warned", "description", "test")

    def __init__(self, test: Predicate, description: str | None = None) -> None:
        self.test = test
        self.description = description or str(getattr(test, "__name__", None) or repr(test))
        self._warned = False

    def __call__(self, message: Message) -> bool:
        try:
            return bool(self.test(message))
        except Exception:
            if not self._warned:
                self._warned = True
                log.exception("matcher %s raised: it does not match such messages", self)
            return False

    def __and__(self, other: Predicate) -> Matcher:
        right = as_matcher(other)
        return Matcher(lambda m: self(m) and right(m), f"({self} & {right})")

    def __or__(self, other: Predicate) -> Matcher:
        right = as_matcher(other)
        return Matcher(lambda m: self(m) or right(m), f"({self} | {right})")

    def __invert__(self) -> Matcher:
        return Matcher(lambda m: not self(m), f"~{self}")

    def __str__(self) -> str:
        return self.description

    def __repr__(self) -> str:
        return f"Matcher({self.description})"


def as_matcher(predicate: Predicate) -> Matcher:
    """``predicate`` as a :class:`Matcher` (a matcher stays as it is)."""
    if isinstance(predicate, Matcher):
        return predicate
    if not callable(predicate):
        raise TypeError(f"a matcher is a callable of the message, not {predicate!r}")
    return Matcher(predicate)


#: Matches every message.
always = Matcher(lambda _: True, "always")


def header(name: str, value: Any) -> Matcher:
    """The header ``name`` equals ``value`` (bytes and text compare equal when the text is the
    UTF-8 of the bytes: Kafka headers arrive as bytes)."""

    def test(message: Message) -> bool:
        found = message.headers.get(name, _MISSING)
        if isinstance(found, bytes | bytearray) and isinstance(value, str):
            return bytes(found) == value.encode()
        return bool(found == value)

    return Matcher(test, f"header({name!r}, {value!r})")


def has_header(name: str) -> Matcher:
    """The message carries header ``name`` (whatever its value)."""
    return Matcher(lambda m: name in m.headers, f"has_header({name!r})")


def content_type(expected: str) -> Matcher:
    """The message's content type is ``expected`` (parameters such as ``charset`` ignored;
    ``text/*`` matches every text type)."""
    wanted = media_type(expected)

    def test(message: Message) -> bool:
        if not message.content_type:
            return False
        actual = media_type(message.content_type)
        if wanted.endswith("/*"):
            return actual.startswith(wanted[:-1])
        return actual == wanted

    return Matcher(test, f"content_type({expected!r})")


def field(path: str, value: Any) -> Matcher:
    """The decoded body's field ``path`` (dotted for nested mappings: ``"order.kind"``) equals
    ``value``. A body that cannot be decoded, or has no such field, does not match."""
    parts = path.split(".")

    def test(message: Message) -> bool:
        data = message.data
        for part in parts:
            if not isinstance(data, dict) or part not in data:
                return False
            data = data[part]
        return bool(data == value)

    return Matcher(test, f"field({path!r}, {value!r})")


__all__ = ["Matcher", "always", "as_matcher", "content_type", "field", "has_header", "header"]
