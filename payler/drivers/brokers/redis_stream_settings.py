"""The URL of a Redis streams broker: payler's own query parameters, and the server's identity.

See :mod:`payler.drivers.brokers.redis_streams` for what each parameter does.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

from payler.errors import ConfigError
from payler.urls import mask_url

_DEFAULT_PORT = 6379


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """payler's query parameters of a stream broker URL (see :mod:`.redis_streams`)."""

    group: str = "payler"
    consumer: str = ""
    trim: Literal["none", "acked"] = "none"
    min_idle_ms: int = 60_000
    block_ms: int = 1_000


def split_settings(url: str) -> tuple[str, StreamSettings]:
    """``url`` without payler's parameters (for redis-py), and those parameters."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = {*StreamSettings.__slots__, "maxlen"}
    ours = {name: value for name, value in query if name in names}
    rest = urlencode([(name, value) for name, value in query if name not in ours])

    def number(name: str, default: int, least: int) -> int:
        text = ours.get(name, str(default))
        if not text.isdigit() or int(text) < least:
            raise ConfigError(
                f"broker URL {mask_url(url)!r}: {name} must be an integer >= {least}, not {text!r}"
            )
        return int(text)

    if "maxlen" in ours:
        raise ConfigError(
            f"broker URL {mask_url(url)!r}: maxlen is not supported: XADD MAXLEN trims entries "
            "that the stream's consumer groups have not read yet (they are lost); trim=acked "
            "trims only what every group has read and acknowledged"
        )
    for name in ("group", "consumer"):
        if name in ours and not ours[name]:
            raise ConfigError(f"broker URL {mask_url(url)!r}: {name} is empty")
    trim = ours.get("trim", "none")
    if trim not in ("none", "acked"):
        raise ConfigError(
            f"broker URL {mask_url(url)!r}: trim must be 'none' or 'acked', not {trim!r}"
        )
    settings = StreamSettings(
        group=ours.get("group", "payler"),
        consumer=ours.get("consumer") or f"{socket.gethostname()}-{os.getpid()}",
        trim="acked" if trim == "acked" else "none",
        min_idle_ms=number("min_idle_ms", 60_000, 0),
        block_ms=number("block_ms", 1_000, 1),  # BLOCK 0 would wait forever
    )
    return urlunsplit(parts._replace(query=rest)), settings


def server_identity(url: str) -> str:
    """``host:port/db`` of a Redis URL, normalised (lower-case host, default port and
    database): what tells two servers apart in spool ids. Never the user or password."""
    parts = urlsplit(url)
    host = (parts.hostname or "localhost").lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port or _DEFAULT_PORT
    except ValueError as exc:
        raise ConfigError(f"broker URL {mask_url(url)!r}: {exc}") from None
    path = parts.path.strip("/")
    db = path or parse_qs(parts.query).get("db", ["0"])[-1]
    if not db.isdigit():
        raise ConfigError(f"broker URL {mask_url(url)!r}: the database must be a number")
    return f"{host}:{port}/{int(db)}"


__all__ = ["StreamSettings", "server_identity", "split_settings"]
