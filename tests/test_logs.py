"""Logs for people and machines (``payler/logs.py``): JSON lines, masked passwords, no bodies,
header values only through the allow-list."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from payler import logs
from tests.integration.conftest import Payler


def record(
    message: str, *args: object, name: str = "payler.workflow.0", **extra: object
) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_json_lines_name_the_workflow_the_event_and_the_ids() -> None:
    logs.workflow_names["payler.workflow.0"] = "ingest"
    line = logs.JsonFormatter().format(
        record("dead-lettering message %s: %s", "m-1", "bad x-delay", ids=["m-1"])
    )
    parsed = json.loads(line)
    assert parsed["workflow"] == "ingest"
    assert parsed["event"] == "dead-lettering message %s: %s"
    assert parsed["message"] == "dead-lettering message m-1: bad x-delay"
    assert parsed["ids"] == ["m-1"]
    assert parsed["level"] == "WARNING" and parsed["time"].endswith("Z")
    assert "\n" not in line


def test_passwords_are_masked_in_messages_and_tracebacks() -> None:
    try:
        raise ConnectionError("cannot reach amqp://payler:s3cret@rabbit:5672/ (refused)")
    except ConnectionError:
        failed = record("workflow failed: %s", "redis://:pa55word@cache:6379/0?password=x")
        failed.exc_info = sys.exc_info()
    for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
        text = formatter.format(failed)
        assert "s3cret" not in text and "pa55word" not in text and "password=x" not in text
        assert "payler:***@rabbit" in text and ":***@cache" in text


def test_header_values_only_through_the_allow_list() -> None:
    headers = {"tenant": "acme", "authorization": "Bearer xyz", "x-delay": 5}
    logs.header_allow_list = frozenset()
    assert logs.shown_headers(headers) == ""
    logs.header_allow_list = frozenset({"tenant", "x-delay", "absent"})
    try:
        assert logs.shown_headers(headers) == " (headers: tenant='acme', x-delay=5)"
    finally:
        logs.header_allow_list = frozenset()


async def test_the_daemon_logs_json_lines(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "workflows:\n  - name: deliver\n    callable: client.watch_storage\n"
        '    options: {broker_url: "memory://j", storage_url: "memory://j"}\n'
    )
    payler = await (await Payler.start(config, {"PAYLER_LOG_FORMAT": "json"}, tmp_path)).running()
    assert await payler.stop() == 0
    lines = [json.loads(line) for line in payler.lines if line.strip()]
    assert any(line["event"] == "payler is running %d workflow(s)" for line in lines)
    assert any(line.get("workflow") == "deliver" for line in lines), lines


@pytest.fixture(autouse=True)
def _forget_names() -> None:
    logs.workflow_names.clear()
