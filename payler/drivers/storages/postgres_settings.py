"""What a ``postgresql://`` URL says: asyncpg's connection string, and payler's own parameters
(``schema``, ``pool_size``, ``notify``, ``command_timeout``; see
:mod:`payler.drivers.storages.postgres`), which asyncpg would take for server settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from payler.errors import ConfigError
from payler.urls import mask_url

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class Settings:
    """What a ``postgresql://`` URL says: asyncpg's DSN and payler's own parameters."""

    dsn: str
    schema: str
    pool_size: int
    notify: bool
    command_timeout_s: float


def split_settings(url: str) -> Settings:
    """Take payler's parameters out of ``url``; raise :class:`ConfigError` on a bad one."""
    parts = urlsplit(url)
    ours = {"schema", "pool_size", "notify", "command_timeout"}
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {name: value for name, value in query if name in ours}
    rest = urlencode([(name, value) for name, value in query if name not in ours])
    dsn = urlunsplit(parts._replace(query=rest))

    def bad(name: str, expected: str) -> ConfigError:
        return ConfigError(
            f"storage URL {mask_url(url)!r}: {name}={given[name]!r} is not {expected}"
        )

    schema = given.get("schema", "")
    if "\x00" in schema or ("schema" in given and not schema.strip()):
        raise bad("schema", "a schema name")
    try:
        pool_size = int(given.get("pool_size", "4"))
    except ValueError:
        raise bad("pool_size", "a whole number") from None
    if not 1 <= pool_size <= 100:
        raise bad("pool_size", "between 1 and 100")
    notify_text = given.get("notify", "true").lower()
    if notify_text not in _TRUE | _FALSE:
        raise bad("notify", "true or false")
    try:
        command_timeout_s = float(given.get("command_timeout", "30"))
    except ValueError:
        raise bad("command_timeout", "a number of seconds") from None
    if not command_timeout_s > 0:
        raise bad("command_timeout", "a positive number of seconds")
    return Settings(dsn, schema, pool_size, notify_text in _TRUE, command_timeout_s)


def channel_of(schema: str) -> str:
    """The ``NOTIFY`` channel of the spool in ``schema`` (an identifier: at most 63 bytes)."""
    channel = f"payler_spool.{schema}"
    if len(channel.encode()) <= 63:
        return channel
    return f"payler_spool.{hashlib.sha256(schema.encode()).hexdigest()[:32]}"


__all__ = ["Settings", "channel_of", "split_settings"]
