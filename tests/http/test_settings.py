"""The ``http:`` section and its variables (``payler/http/settings.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from payler import config
from payler.errors import ConfigError
from payler.http.settings import HttpConfig, is_loopback, resolve

WORKFLOW = "workflows:\n  - callable: client.watch_storage\n"


def test_no_section_and_no_variable_means_no_server() -> None:
    assert resolve(None, {}) is None


def test_the_original_payler_variable_starts_the_server_on_its_port() -> None:
    settings = resolve(None, {"METRIC_SERVER_PORT": "9100"})
    assert settings is not None
    assert (settings.host, settings.port, settings.tokens) == ("127.0.0.1", 9100, ())
    both = resolve(None, {"METRIC_SERVER_PORT": "9100", "PAYLER_HTTP_PORT": "9200"})
    assert both is not None and both.port == 9200


def test_the_section_wins_over_the_variables() -> None:
    section = HttpConfig(port=7000, host="127.0.0.2")
    settings = resolve(section, {"PAYLER_HTTP_PORT": "9200", "PAYLER_HTTP_HOST": "::1"})
    assert settings is not None
    assert (settings.host, settings.port) == ("127.0.0.2", 7000)


def test_a_bad_port_variable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PAYLER_HTTP_PORT: expected a TCP port"):
        resolve(None, {"PAYLER_HTTP_PORT": "http"})


def test_any_other_address_than_loopback_needs_a_token(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(WORKFLOW + "http: {host: 0.0.0.0, port: 8000}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: http.host: '0.0.0.0' is not a loopback"):
        config.load(path, environ={})
    loaded = config.load(path, environ={"PAYLER_HTTP_TOKEN": "a-long-enough-secret-token"})
    assert loaded.http is not None
    assert [t.name for t in loaded.http.tokens] == ["token"]
    assert "a-long-enough-secret-token" not in repr(loaded.http)  # never shown


def test_tokens_from_a_file_have_names(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\nalice:0123456789abcdef-alice\n\nbob: 0123456789abcdef-bob\n")
    settings = resolve(HttpConfig(host="0.0.0.0", token_file=tokens), {})
    assert settings is not None
    assert [(t.name, t.secret) for t in settings.tokens] == [
        ("alice", "0123456789abcdef-alice"),
        ("bob", "0123456789abcdef-bob"),
    ]
    tokens.write_text("alice:short\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        resolve(HttpConfig(token_file=tokens), {})
    with pytest.raises(ConfigError, match="cannot read the token file"):
        resolve(HttpConfig(token_file=tmp_path / "missing"), {})


def test_an_unknown_key_of_the_section_names_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(WORKFLOW + "http: {prot: 8000}\n")
    with pytest.raises(ConfigError, match=r"http.prot: unknown key"):
        config.load(path, environ={})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
