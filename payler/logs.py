"""Logging for people (text) and for machines (``--log-format json``), with secrets kept out.

- Text: ``time level logger: message``, as payler always logged.
- JSON: one object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``workflow``
  (the configuration's name, for a workflow's lines), ``event`` (the message's template: the
  same for every line of one kind, to count and alert on), ``message`` (rendered), ``ids``
  (when the line names messages) and ``exception`` (the traceback, as text).
- Everywhere, tracebacks included: every URL's password is masked (``user:***@``).
- Message bodies are never logged (no log call passes one); header values only for the names
  in the allow-list (``--log-headers`` / ``PAYLER_LOG_HEADERS``), through :func:`shown_headers`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from payler.urls import mask_urls

LogFormat = Literal["text", "json"]

#: Logger name → workflow name (the runtime registers its workflows' loggers here).
workflow_names: dict[str, str] = {}
#: Header names whose values may appear in log lines.
header_allow_list: frozenset[str] = frozenset()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return mask_urls(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": str(record.msg),
            "message": record.getMessage(),
        }
        workflow = workflow_names.get(record.name) or getattr(record, "workflow", None)
        if workflow:
            line["workflow"] = workflow
        ids = getattr(record, "ids", None)
        if ids:
            line["ids"] = list(ids)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return mask_urls(json.dumps(line, ensure_ascii=False, default=str))


def setup(level: str, log_format: LogFormat = "text", headers: Iterable[str] = ()) -> None:
    """Log to stderr at ``level`` in ``log_format``; allow the values of ``headers``."""
    global header_allow_list  # noqa: PLW0603 - one process-wide setting, set once by the CLI
    header_allow_list = frozenset(h.strip() for h in headers if h.strip())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # The driver libraries log every failed connection attempt, some with tracebacks; payler
    # reports those failures itself, once and readably. DEBUG shows them all.
    if level != "DEBUG":
        for noisy in ("aio_pika", "aiormq", "pymongo", "aiosqlite", "aiokafka", "uvicorn"):
            logging.getLogger(noisy).setLevel(
                logging.CRITICAL if noisy != "uvicorn" else logging.WARNING
            )


def shown_headers(headers: Mapping[str, Any]) -> str:
    """`` (headers: name=value, ...)`` for the allow-listed headers present, else ``""``."""
    shown = [f"{name}={headers[name]!r}" for name in sorted(header_allow_list) if name in headers]
    return f" (headers: {', '.join(shown)})" if shown else ""


__all__ = [
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "setup",
    "shown_headers",
    "workflow_names",
]
