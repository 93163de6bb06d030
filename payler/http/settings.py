"""The ``http:`` section of the configuration, and the variables that stand in for it.

::

    http:
      host: 127.0.0.1            # the default: loopback only
      port: 8000                 # the original Payler's METRIC_SERVER_PORT default
      token: ${PAYLER_HTTP_TOKEN}   # or token_file: one "name:token" per line
      max_request_bytes: 1048576

The server runs when the section is present, or when ``PAYLER_HTTP_PORT`` or the original
Payler's ``METRIC_SERVER_PORT`` is set. A key the section does not set comes from its variable:
``PAYLER_HTTP_HOST``, ``PAYLER_HTTP_PORT`` (else ``METRIC_SERVER_PORT``), ``PAYLER_HTTP_TOKEN``,
``PAYLER_HTTP_TOKEN_FILE``.

**Security**: bound to anything but a loopback address, every ``/v1`` endpoint needs a bearer
token, and payler refuses to start without one. Tokens are compared in constant time and never
logged or shown (``repr`` hides them); a token from ``token_file`` has a name, which the log of
each change made through the API names as who asked.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from payler.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


class HttpConfig(BaseModel):
    """The ``http:`` section, as written (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = None
    port: int | None = Field(default=None, ge=0, le=65_535)
    token: SecretStr | None = None
    token_file: Path | None = None
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, ge=1024)
    #: The spool and broker the admin API works on; by default the built-in workflows'.
    storage_url: str | None = None
    broker_url: str | None = None
    #: How often the pending-entry gauges are sampled from the storage.
    sample_interval_seconds: float = Field(default=15.0, gt=0)


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and the name the audit log gives whoever presents it."""

    name: str
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The server's settings, resolved from the section and the environment."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    tokens: tuple[Token, ...] = ()
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    storage_url: str | None = None
    broker_url: str | None = None
    sample_interval_seconds: float = 15.0

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def resolve(
    section: HttpConfig | None, environ: Mapping[str, str] | None = None, *, where: str = "http"
) -> HttpSettings | None:
    """The server's settings, or ``None`` when nothing asks for a server.

    Raises :class:`~payler.errors.ConfigError` for a bad port variable, an unreadable token
    file, or a non-loopback address without a token.
    """
    env = os.environ if environ is None else environ
    port_variable = next(
        (v for v in ("PAYLER_HTTP_PORT", "METRIC_SERVER_PORT") if env.get(v)), None
    )
    if section is None and port_variable is None:
        return None
    section = section or HttpConfig()
    port = section.port
    if port is None and port_variable is not None:
        port = _port(env[port_variable], port_variable)
    host = section.host or env.get("PAYLER_HTTP_HOST") or DEFAULT_HOST
    tokens: list[Token] = []
    token = section.token.get_secret_value() if section.token else env.get("PAYLER_HTTP_TOKEN")
    if token:
        tokens.append(Token("token", token.strip()))
    token_file = section.token_file or (
        Path(env["PAYLER_HTTP_TOKEN_FILE"]) if env.get("PAYLER_HTTP_TOKEN_FILE") else None
    )
    if token_file is not None:
        tokens += read_tokens(token_file, where=f"{where}.token_file")
    settings = HttpSettings(
        host=host,
        port=DEFAULT_PORT if port is None else port,
        tokens=tuple(tokens),
        max_request_bytes=section.max_request_bytes,
        storage_url=section.storage_url,
        broker_url=section.broker_url,
        sample_interval_seconds=section.sample_interval_seconds,
    )
    if not settings.loopback and not settings.tokens:
        raise ConfigError(
            f"{where}.host: {host!r} is not a loopback address, and the admin API would be open "
            "to anyone who reaches it: set http.token (or PAYLER_HTTP_TOKEN, or a token_file / "
            "PAYLER_HTTP_TOKEN_FILE), or bind to 127.0.0.1"
        )
    return settings


def read_tokens(path: Path, *, where: str) -> list[Token]:
    """The tokens of a file: one per line, ``name:token`` (or a bare token, named after its
    line); blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read the token file {str(path)!r}: {exc.strerror}"
        ) from None
    tokens = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep:
            name, secret = f"{path.name}:{number}", line
        if len(secret.strip()) < 16:
            raise ConfigError(
                f"{where}: {str(path)!r} line {number}: a token must have at least 16 characters"
            )
        tokens.append(Token(name.strip(), secret.strip()))
    if not tokens:
        raise ConfigError(f"{where}: the token file {str(path)!r} holds no token")
    return tokens


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _port(value: str, variable: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65_535:
        raise ConfigError(f"{variable}: expected a TCP port (0-65535), got {value!r}")
    return port


__all__ = ["HttpConfig", "HttpSettings", "Token", "is_loopback", "read_tokens", "resolve"]
