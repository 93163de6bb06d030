"""The configuration file: load, expand environment variables, validate — once, at start-up.

The file is the original Payler's format, extended::

    workflows:
      - name: "Fetch payloads from RabbitMQ and store them"
        location: "payler"              # optional, defaults to payler
        callable: "client.process_queue"
        options:                        # optional; validated by the workflow's options model
          queue: "${PAYLER_QUEUE:-payler-jobs}"
    shutdown_grace_seconds: 10          # optional
    stats_interval_seconds: 60          # optional
    http: {host: 127.0.0.1, port: 8000} # optional: metrics, probes, admin API (payler.http)
    startup_timeout_seconds: 60         # optional

Every string may use ``${VAR}`` (the variable must be set) and ``${VAR:-default}`` (the default
when it is unset or empty); ``$${`` writes a literal ``${``. Errors name the file, the key and
what was expected, and never show a URL's password.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from payler.errors import ConfigError
from payler.http.settings import HttpConfig, HttpSettings
from payler.http.settings import resolve as resolve_http
from payler.urls import mask_url

_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}|\$\{[^}]*\}?")


class WorkflowConfig(BaseModel):
    """One entry of ``workflows``."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    location: str = "payler"
    callable: str
    options: dict[str, Any] = Field(default_factory=dict)


class PaylerConfig(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid")

    workflows: list[WorkflowConfig] = Field(min_length=1)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    stats_interval_seconds: float = Field(default=60.0, gt=0)
    http: HttpConfig | None = None
    #: How long every workflow has to call ``ctx.ready()``; past it, payler exits (status 2).
    startup_timeout_seconds: float = Field(default=60.0, gt=0)


@dataclass(frozen=True, slots=True)
class LoadedWorkflow:
    """A workflow ready to run: its entry, its callable and its validated options."""

    index: int
    config: WorkflowConfig
    function: Callable[..., Any]
    options: Any

    @property
    def name(self) -> str:
        return self.config.name or f"{self.config.location}.{self.config.callable}"


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated configuration file."""

    path: Path
    config: PaylerConfig
    workflows: list[LoadedWorkflow]
    #: The HTTP server's settings; ``None``: no server.
    http: HttpSettings | None = None


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Loaded:
    """Read, expand and validate the file; raise :class:`ConfigError` naming what is wrong."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{at}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'workflows' list at the top")
    expanded = expand(raw, environ, path=str(path))
    try:
        config = PaylerConfig.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(_explain(path, exc)) from None
    # Users' workflow modules often sit beside the configuration file.
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    workflows = [_load_workflow(path, i, entry) for i, entry in enumerate(config.workflows)]
    try:
        http = resolve_http(config.http, environ, where=f"{path}: http")
    except ConfigError as exc:
        raise ConfigError(
            str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
        ) from None
    return Loaded(path, config, workflows, http)


def expand(value: Any, environ: Mapping[str, str], *, path: str, key: str = "") -> Any:
    """``value`` with ``${VAR}`` and ``${VAR:-default}`` replaced in every string."""
    if isinstance(value, dict):
        return {k: expand(v, environ, path=path, key=_join(key, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, environ, path=path, key=f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:  # ${VAR-x}, ${ VAR }, ${VAR:=x}, an unclosed ${...: not ours to guess
            raise ConfigError(
                f"{path}: {key}: cannot expand {match.group(0)!r}: write ${{VAR}} or "
                "${VAR:-default} (or $${ for a literal ${)"
            )
        found = environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        if found is not None:
            return found
        raise ConfigError(
            f"{path}: {key}: environment variable {name} is not set "
            f"(set it, or write ${{{name}:-default}})"
        )

    return _VARIABLE.sub(substitute, value)


def _load_workflow(path: Path, index: int, entry: WorkflowConfig) -> LoadedWorkflow:
    key = f"workflows[{index}]"
    target = f"{entry.location}.{entry.callable}" if entry.location else entry.callable
    function = _import(path, key, target)
    if not inspect.iscoroutinefunction(function):
        raise ConfigError(
            f"{path}: {key}.callable: {target!r} is not an async function "
            "(a workflow is `async def workflow(ctx)`)"
        )
    model: type[BaseModel] | None = getattr(function, "options_model", None)
    options: Any = entry.options
    if model is not None:
        try:
            options = model.model_validate(entry.options)
        except ValidationError as exc:
            raise ConfigError(_explain(path, exc, prefix=f"{key}.options")) from None
    return LoadedWorkflow(index, entry, function, options)


def _import(path: Path, key: str, target: str) -> Callable[..., Any]:
    """Import ``package.module.attr``: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(f"{path}: {key}: importing {module_name!r} failed: {exc}") from None
        except Exception as exc:  # the user's module raised on import
            raise ConfigError(
                f"{path}: {key}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(
                f"{path}: {key}.callable: module {module_name!r} has no {'.'.join(parts[split:])!r}"
            ) from None
        if not callable(obj):
            raise ConfigError(f"{path}: {key}.callable: {target!r} is not callable")
        return obj  # type: ignore[no-any-return]
    raise ConfigError(
        f"{path}: {key}: cannot import {target!r}: no module {parts[0]!r} "
        "(check location and callable)"
    )


def _explain(path: Path, exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for error in exc.errors():
        loc = prefix
        for part in error["loc"]:
            loc = f"{loc}[{part}]" if isinstance(part, int) else _join(loc, str(part))
        problem = error["msg"]
        if error["type"] == "extra_forbidden":
            problem = "unknown key"
        elif error["type"] == "missing":
            problem = "required key is missing"
        elif error["type"] == "value_error":
            problem = problem.removeprefix("Value error, ")
        else:
            shown = error.get("input")
            if isinstance(shown, str):
                shown = mask_url(shown)
            problem = f"{problem} (got {shown!r})"
        lines.append(f"{path}: {loc or '(top)'}: {problem}")
    return "\n".join(lines)


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part
