"""Assertions shared by several test modules."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any


def assert_same(got: Any, expected: Any, path: str = "value") -> None:
    """Equal, with the same types all the way down: ``True`` is not ``1``, ``1.50`` not ``1.5``."""
    assert type(got) is type(expected), f"{path}: {got!r} is not a {type(expected).__name__}"
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key in expected:
            assert_same(got[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_same(g, e, f"{path}[{i}]")
    elif isinstance(expected, datetime):
        assert (got, got.utcoffset()) == (expected, expected.utcoffset()), path
    elif isinstance(expected, Decimal):
        assert str(got) == str(expected), path
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(got), path  # NaN is the same value, though never equal to itself
    else:
        assert got == expected, path
