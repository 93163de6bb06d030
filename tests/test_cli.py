"""The ``payler`` command: exit statuses and messages a user reads (run as a subprocess)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.conftest import Payler

#: The repository: where ``tests.runtime_workflows`` can be imported from (``python -m payler``
#: puts the working directory first on sys.path).
ROOT = Path(__file__).resolve().parent.parent

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
    result = payler("--config-file", str(config), env={"PAYLER_STORAGE_URL": "postgres://db/x"})
    assert_clean_error(result, "postgres://db/x", "unknown scheme", "sqlite://")


def test_version() -> None:
    result = payler("--version")
    assert result.returncode == 0 and "payler" in result.stdout


def in_memory_config(tmp_path: Path, extra: str = "") -> Path:
    """Ingest and delivery on the in-memory drivers: payler as users run it, without services."""
    path = tmp_path / "configuration.yaml"
    path.write_text(
        f"""
workflows:
  - callable: client.process_queue
    options: {{broker_url: "memory://cli", storage_url: "memory://cli"}}
  - callable: client.watch_storage
    options: {{broker_url: "memory://cli", storage_url: "memory://cli"}}
{extra}"""
    )
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_every_signal_during_a_stop_ends_with_status_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # A stream of signals until payler exits: some land as its loop closes and Python shuts
    # down, where a signal used to kill the process (status -15) after a clean stop.
    for _ in range(3):
        payler = await (await Payler.start(in_memory_config(tmp_path), {}, ROOT)).running()
        # Through a pidfd: Process.send_signal would poll (reap) the child under asyncio's own
        # child watcher, which then reports a made-up status 255.
        pidfd = os.pidfd_open(payler.process.pid)
        try:
            while payler.process.returncode is None:
                try:
                    signal.pidfd_send_signal(pidfd, sig)
                except ProcessLookupError:  # it exited
                    break
                await asyncio.sleep(0.001)  # pacing the signals, not waiting for anything
        finally:
            os.close(pidfd)
        assert await payler.wait() == 0, payler.log
        assert "Traceback" not in payler.log, payler.log
        assert "payler stopped" in payler.log


def test_a_workflow_that_never_gets_ready_exits_2_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "configuration.yaml"
    config.write_text(
        """
workflows:
  - callable: client.process_queue
    options: {broker_url: "memory://cli", storage_url: "memory://cli"}
  - name: stuck connecting
    location: tests.runtime_workflows
    callable: never_ready
startup_timeout_seconds: 0.5
"""
    )
    started = time.monotonic()
    result = payler("--config-file", str(config), cwd=ROOT)
    assert_clean_error(result, "'stuck connecting' did not start within 0.5 s")
    assert time.monotonic() - started < 20


async def test_a_bug_after_start_restarts_that_workflow_and_sigterm_still_exits_0(
    tmp_path: Path,
) -> None:
    config = in_memory_config(
        tmp_path,
        extra="""  - name: buggy
    location: tests.runtime_workflows
    callable: buggy
""",
    )
    payler = await (await Payler.start(config, {}, ROOT)).running()
    await payler.wait_for_line("restarting in")
    await payler.wait_for_line("payler is running")
    assert await payler.stop() == 0, payler.log
    assert "Traceback" in payler.log and "ZeroDivisionError: a bug" in payler.log
    failures = [line for line in payler.log.splitlines() if "failed (" in line]
    assert failures and all("'buggy'" in line for line in failures)  # the others untouched
