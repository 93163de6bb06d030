"""The ``payler`` command: exit statuses and messages a user reads (run as a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ORIGINAL_PAYLER_CONFIG = """\
---
workflows:
  - name: "Fetch payloads from RabbitMQ and store them in MongoDB"
    location: "payler"
    callable: "client.process_queue"
  - name: "Re-injects payloads to RabbitMQ"
    callable: "client.watch_storage"
"""


def payler(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "payler", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit status 2, one message naming what is wrong, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)


def test_missing_configuration_file(tmp_path: Path) -> None:
    result = payler("--config-file", str(tmp_path / "nope.yaml"))
    assert_clean_error(result, "nope.yaml", "no such configuration file")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("workflows:\n  - callable: [\n")
    assert_clean_error(payler("--config-file", str(config)), "bad.yaml", "line", "not valid YAML")


def test_unknown_option_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "workflows:\n  - callable: client.process_queue\n    options:\n      prefetchh: 5\n"
    )
    assert_clean_error(
        payler("--config-file", str(config)), "c.yaml", "workflows[0].options.prefetchh", "unknown"
    )


def test_callable_that_cannot_be_imported(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("workflows:\n  - location: no_such_package\n    callable: run\n")
    assert_clean_error(payler("--config-file", str(config)), "workflows[0]", "no_such_package")


def test_check_validates_without_connecting(tmp_path: Path) -> None:
    config = tmp_path / "configuration.yaml"
    config.write_text(ORIGINAL_PAYLER_CONFIG)
    result = payler("--config-file", str(config), "--check", env={"BROKER_URL": "amqp://x:1/"})
    assert result.returncode == 0, result.stderr
    assert "2 workflow(s)" in result.stdout


def test_unreachable_broker_at_start_exits_2_with_the_password_masked(tmp_path: Path) -> None:
    config = tmp_path / "configuration.yaml"
    config.write_text(ORIGINAL_PAYLER_CONFIG)
    url = f"amqp://payler:s3cret@127.0.0.1:{free_port()}/"
    started = time.monotonic()
    result = payler(
        "--config-file",
        str(config),
        env={"BROKER_URL": url, "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"},
    )
    assert_clean_error(result, "payler:***@127.0.0.1", "cannot connect to RabbitMQ")
    assert "s3cret" not in result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.mongodb
def test_unreachable_storage_at_start_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "configuration.yaml"
    config.write_text(ORIGINAL_PAYLER_CONFIG)
    url = f"mongodb://payler:s3cret@127.0.0.1:{free_port()}/payler?serverSelectionTimeoutMS=1000"
    result = payler("--config-file", str(config), env={"MONGODB_URL": url})
    assert_clean_error(result, "payler:***@127.0.0.1")
    assert "s3cret" not in result.stderr


def test_unknown_storage_scheme_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "configuration.yaml"
    config.write_text(ORIGINAL_PAYLER_CONFIG)
    result = payler("--config-file", str(config), env={"PAYLER_STORAGE_URL": "cassandra://db/x"})
    assert_clean_error(result, "cassandra://db/x", "unknown scheme", "postgresql://")


def test_version() -> None:
    result = payler("--version")
    assert result.returncode == 0 and "payler" in result.stdout
