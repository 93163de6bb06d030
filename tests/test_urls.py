"""URL helpers (``payler/urls.py``): passwords never reach messages or logs."""

from __future__ import annotations

import pytest

from payler.urls import mask_url, redact, scheme_of


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://user:secret@host:5672/vhost", "amqp://user:***@host:5672/vhost"),
        ("amqp://user:secret@host/", "amqp://user:***@host/"),
        ("amqps://user:secret@host", "amqps://user:***@host"),
        ("amqp://user:@host/", "amqp://user:***@host/"),
        ("amqp://user:p@ss@host/", "amqp://user:***@host/"),
        ("amqp://user:p%40ss@host/", "amqp://user:***@host/"),
        ("amqp://user:a:b@host/", "amqp://user:***@host/"),
        (
            "mongodb://user:secret@localhost:27017/payler",
            "mongodb://user:***@localhost:27017/payler",
        ),
        (
            "mongodb://user:s@cr@t@h1:27017,h2:27017/db?replicaSet=rs&authSource=admin",
            "mongodb://user:***@h1:27017,h2:27017/db?replicaSet=rs&authSource=admin",
        ),
        (
            "mongodb+srv://user:secret@cluster.example.net/db",
            "mongodb+srv://user:***@cluster.example.net/db",
        ),
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://user:secret@host/vhost@x", "amqp://user:***@host/vhost@x"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "secret" not in mask_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest@localhost:5672/",
        "amqp://localhost/",
        "amqp://host",
        "mongodb://localhost:27017/payler",
        "mongodb://h1,h2/db?replicaSet=rs",
        "sqlite:///payler-spool.db",
        "memory://",
        "localhost:5672",  # no scheme: not a URL, left as it is
        "payler-spool.db",
        "",
    ],
)
def test_mask_url_leaves_urls_without_password_alone(url: str) -> None:
    assert mask_url(url) == url


def test_mask_url_hides_a_password_with_a_slash() -> None:
    assert "se/cret" not in mask_url("amqp://user:se/cret@host/")


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("amqp://h/", "amqp"),
        ("AMQP://h/", "amqp"),
        ("mongodb+srv://h", "mongodb+srv"),
        ("sqlite:///x.db", "sqlite"),
        ("localhost:5672", ""),
        ("", ""),
    ],
)
def test_scheme_of(url: str, scheme: str) -> None:
    assert scheme_of(url) == scheme


def test_mask_url_hides_passwords_in_the_query() -> None:
    assert (
        mask_url("redis://h:6379/0?password=hunter2&db=1") == "redis://h:6379/0?password=***&db=1"
    )
    assert mask_url("mongodb://h/?tls=true&Password=x") == "mongodb://h/?tls=true&Password=***"


def test_redact_removes_a_url_s_secrets_from_library_messages() -> None:
    url = "amqp://payler:s3cret-pw@host:5672/?token=abcdef"
    message = "ACCESS_REFUSED for payler:s3cret-pw (token abcdef)"
    assert redact(message, url) == "ACCESS_REFUSED for payler:*** (token ***)"
    assert redact("nothing secret", "amqp://host/") == "nothing secret"
