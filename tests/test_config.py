"""The configuration file (``payler/config.py``): loading, expansion and the errors it explains.

Each test writes its file under ``tmp_path`` and passes ``environ`` explicitly. The built-in
options' URL defaults read ``os.environ`` when validated: those tests use ``monkeypatch``.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from payler import client, config
from payler.errors import ConfigError
from payler.options import (
    DEFAULT_BROKER_URL,
    DEFAULT_STORAGE_URL,
    ProcessQueueOptions,
    WatchStorageOptions,
)

#: The original Payler's configuration file, as users have it.
ORIGINAL = """\
---
workflows:
  - name: "Fetch payloads from RabbitMQ and store them"
    location: "payler"
    callable: "client.process_queue"
  - name: "Re-inject payloads to RabbitMQ"
    callable: "client.watch_storage"
"""

URL_VARIABLES = ("BROKER_URL", "PAYLER_STORAGE_URL", "MONGODB_URL")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No URL variables from the outside; sys.path and the user modules restored afterwards."""
    for name in URL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # config.load appends the config's folder
    importlib.invalidate_caches()
    yield
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(tmp_path.resolve()):
            del sys.modules[name]


def write(tmp_path: Path, text: str, name: str = "payler.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path, environ: dict[str, str] | None = None) -> str:
    """The message of the :class:`ConfigError` that loading ``path`` raises; it names the file."""
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={} if environ is None else environ)
    message = str(caught.value)
    assert str(path) in message
    return message


def one_workflow(options: str) -> str:
    """A file with ``client.process_queue`` and the given ``options:`` block (YAML lines)."""
    body = textwrap.indent(textwrap.dedent(options), "      ")
    return f"workflows:\n  - callable: client.process_queue\n    options:\n{body}"


# -- the original file and the defaults ---------------------------------------------------------


def test_the_original_payler_file_loads_with_defaults(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, ORIGINAL), environ={})
    assert loaded.path == tmp_path / "payler.yaml"
    assert [w.index for w in loaded.workflows] == [0, 1]
    process, watch = loaded.workflows

    assert process.function is client.process_queue
    assert process.name == "Fetch payloads from RabbitMQ and store them"
    assert process.config.location == "payler"
    assert isinstance(process.options, ProcessQueueOptions)
    assert process.options.queue == "payler-jobs"
    assert process.options.default_destination == "payler-out"
    assert process.options.default_delay_ms is None
    assert process.options.delay_from == "published"
    assert process.options.broker_url == DEFAULT_BROKER_URL
    assert process.options.storage_url == DEFAULT_STORAGE_URL == "sqlite:///payler-spool.db"

    assert watch.function is client.watch_storage
    assert watch.config.location == "payler"  # the default location
    assert isinstance(watch.options, WatchStorageOptions)
    assert watch.options.declare_queues == ["payler-out"]
    assert watch.options.broker_url == DEFAULT_BROKER_URL

    assert loaded.config.shutdown_grace_seconds == 10
    assert loaded.config.stats_interval_seconds == 60
    assert loaded.config.startup_timeout_seconds == 60


def test_a_workflow_without_a_name_is_named_by_its_callable(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, "workflows:\n  - callable: client.watch_storage\n"), {})
    assert loaded.workflows[0].name == "payler.client.watch_storage"


def test_top_level_settings_are_read(tmp_path: Path) -> None:
    text = ORIGINAL + "shutdown_grace_seconds: 2.5\nstats_interval_seconds: 5\n"
    text += "startup_timeout_seconds: 120\n"
    loaded = config.load(write(tmp_path, text), environ={})
    assert loaded.config.shutdown_grace_seconds == 2.5
    assert loaded.config.stats_interval_seconds == 5
    assert loaded.config.startup_timeout_seconds == 120


@pytest.mark.parametrize(
    ("environment", "storage_url"),
    [
        ({}, "sqlite:///payler-spool.db"),
        ({"MONGODB_URL": "mongodb://mongo:27017/payler"}, "mongodb://mongo:27017/payler"),
        ({"PAYLER_STORAGE_URL": "sqlite:///other.db"}, "sqlite:///other.db"),
        (
            {"PAYLER_STORAGE_URL": "sqlite:///other.db", "MONGODB_URL": "mongodb://mongo/"},
            "sqlite:///other.db",
        ),
        ({"PAYLER_STORAGE_URL": "", "MONGODB_URL": "mongodb://mongo/"}, "mongodb://mongo/"),
    ],
    ids=["none", "mongodb-url", "payler-storage-url", "both", "empty-payler-storage-url"],
)
def test_storage_url_defaults_to_the_environment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    storage_url: str,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    loaded = config.load(write(tmp_path, ORIGINAL), environ={})
    assert [w.options.storage_url for w in loaded.workflows] == [storage_url, storage_url]


def test_broker_url_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_URL", "amqp://u:p@rabbit:5672/v")
    loaded = config.load(write(tmp_path, ORIGINAL), environ={})
    assert [w.options.broker_url for w in loaded.workflows] == ["amqp://u:p@rabbit:5672/v"] * 2


def test_options_in_the_file_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_URL", "amqp://from-env/")
    monkeypatch.setenv("PAYLER_STORAGE_URL", "mongodb://from-env/")
    path = write(
        tmp_path,
        one_workflow("""\
            broker_url: amqp://from-file/
            storage_url: sqlite:///file.db
            queue: jobs
            prefetch: 500
            batch_size: 50
            default_delay_ms: 1000
            delay_from: received
        """),
    )
    options = config.load(path, environ={}).workflows[0].options
    assert options == ProcessQueueOptions(
        broker_url="amqp://from-file/",
        storage_url="sqlite:///file.db",
        queue="jobs",
        prefetch=500,
        batch_size=50,
        default_delay_ms=1000,
        delay_from="received",
    )


# -- environment variables ----------------------------------------------------------------------


USER_MODULE = "async def run(ctx):\n    pass\n"


def user_workflow(tmp_path: Path, options: str, module: str = "my_workflows") -> Path:
    """A file running ``{module}.run`` (written beside it) with a free-form ``options:`` block."""
    (tmp_path / f"{module}.py").write_text(USER_MODULE, encoding="utf-8")
    body = textwrap.indent(textwrap.dedent(options), "      ")
    text = f"workflows:\n  - location: {module}\n    callable: run\n    options:\n{body}"
    return write(tmp_path, text)


def test_variables_are_expanded_in_nested_options(tmp_path: Path) -> None:
    path = user_workflow(
        tmp_path,
        """\
        queue: ${QUEUE}
        nested:
          list: ["${A}", "x-${B:-b-default}-y", 3]
          deeper: {url: "amqp://${HOST:-localhost}:${PORT:-5672}/"}
        literal: "$${NOT_EXPANDED} and $${A}"
        untouched: "$HOME, $A and {A}"
        number: 5
        """,
    )
    loaded = config.load(path, environ={"QUEUE": "jobs", "A": "a", "HOST": "rabbit"})
    options = loaded.workflows[0].options
    assert options == {
        "queue": "jobs",
        "nested": {
            "list": ["a", "x-b-default-y", 3],
            "deeper": {"url": "amqp://rabbit:5672/"},
        },
        "literal": "${NOT_EXPANDED} and ${A}",
        "untouched": "$HOME, $A and {A}",
        "number": 5,
    }


def test_a_default_applies_when_the_variable_is_unset_or_empty(tmp_path: Path) -> None:
    path = user_workflow(tmp_path, 'a: "${V:-dflt}"\nb: "${W:-}"\nc: "${E}"\n')
    options = config.load(path, environ={"V": "", "E": ""}).workflows[0].options
    assert options == {"a": "dflt", "b": "", "c": ""}  # a set but empty ${E} is ""
    options = config.load(path, environ={"V": "set", "W": "w", "E": "e"}).workflows[0].options
    assert options == {"a": "set", "b": "w", "c": "e"}


def test_expanded_strings_are_validated_as_their_option_type(tmp_path: Path) -> None:
    path = write(tmp_path, one_workflow("prefetch: ${PREFETCH}\nbatch_size: ${BATCH:-10}\n"))
    options = config.load(path, environ={"PREFETCH": "300"}).workflows[0].options
    assert (options.prefetch, options.batch_size) == (300, 10)


def test_a_missing_variable_names_the_file_the_key_and_the_variable(tmp_path: Path) -> None:
    path = user_workflow(tmp_path, 'nested:\n  list: [ok, "amqp://${RABBIT_HOST}/"]\n')
    message = config_error(path, environ={"OTHER": "x"})
    assert "workflows[0].options.nested.list[1]" in message
    assert "RABBIT_HOST" in message
    assert "not set" in message


def test_expansion_reads_only_the_environ_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYLER_TEST_ONLY_IN_OS_ENVIRON", "x")
    path = user_workflow(tmp_path, 'a: "${PAYLER_TEST_ONLY_IN_OS_ENVIRON}"\n')
    assert "PAYLER_TEST_ONLY_IN_OS_ENVIRON" in config_error(path, environ={})


# -- what a bad file gets told ------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nowhere.yaml")
    assert "no such configuration file" in message


def test_yaml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        workflows:
          - callable: client.process_queue
            options: {queue: [unclosed
        stats_interval_seconds: 5
        """,
    )
    message = config_error(path)
    assert "not valid YAML" in message
    assert "(line 4, column" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "", "# only a comment\n", "42\n"])
def test_the_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    message = config_error(write(tmp_path, text))
    assert "expected a mapping with a 'workflows' list" in message


def test_workflows_must_not_be_empty(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "workflows: []\n"))
    assert "workflows: " in message
    assert "at least 1 item" in message


def test_workflows_are_required(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "stats_interval_seconds: 5\n"))
    assert "workflows: required key is missing" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, ORIGINAL + "shutdown_grace: 5\n"))
    assert "shutdown_grace: unknown key" in message


def test_unknown_workflow_key(tmp_path: Path) -> None:
    text = "workflows:\n  - callable: client.process_queue\n    locaton: payler\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0].locaton: unknown key" in message


def test_a_workflow_needs_a_callable(tmp_path: Path) -> None:
    text = ORIGINAL + "  - name: third\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[2].callable: required key is missing" in message


def test_unknown_option_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, one_workflow("prefetchh: 10\n")))
    assert "workflows[0].options.prefetchh: unknown key" in message


def test_wrong_option_type(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, one_workflow("prefetch: lots\n")))
    assert "workflows[0].options.prefetch: " in message
    assert "valid integer" in message
    assert "'lots'" in message


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("prefetch: 0", "greater than or equal to 1"),
        ("delay_from: sent", "'published' or 'received'"),
        ("queue: ''", "at least 1 character"),
        ("default_delay_ms: -1", "greater than or equal to 0"),
    ],
)
def test_option_bounds(tmp_path: Path, option: str, expected: str) -> None:
    message = config_error(write(tmp_path, one_workflow(option + "\n")))
    assert f"workflows[0].options.{option.partition(':')[0]}: " in message
    assert expected in message


@pytest.mark.parametrize("key", ["stats_interval_seconds", "startup_timeout_seconds"])
def test_wrong_top_level_value(tmp_path: Path, key: str) -> None:
    message = config_error(write(tmp_path, ORIGINAL + f"{key}: 0\n"))
    assert f"{key}: " in message
    assert "greater than 0" in message


def test_batch_size_cannot_exceed_prefetch(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, one_workflow("prefetch: 10\nbatch_size: 20\n")))
    assert "workflows[0].options: " in message
    assert "batch_size (20) cannot exceed prefetch (10)" in message


def test_a_password_in_a_bad_option_value_is_masked(tmp_path: Path) -> None:
    path = write(tmp_path, one_workflow("prefetch: amqp://user:secret@host/\n"))
    message = config_error(path)
    assert "workflows[0].options.prefetch: " in message
    assert "amqp://user:***@host/" in message
    assert "secret" not in message


def test_a_password_beside_a_bad_option_combination_is_masked(tmp_path: Path) -> None:
    text = "prefetch: 10\nbatch_size: 20\nbroker_url: amqp://user:secret@host/\n"
    assert "secret" not in config_error(write(tmp_path, one_workflow(text)))


def test_a_password_in_a_bad_workflow_entry_is_masked(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "workflows:\n  - amqp://user:secret@host/\n"))
    assert "workflows[0]: " in message
    assert "secret" not in message


# -- callables ----------------------------------------------------------------------------------


def test_a_callable_in_a_module_that_does_not_exist(tmp_path: Path) -> None:
    text = "workflows:\n  - location: no_such_module_xyz\n    callable: run\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0]: " in message
    assert "no_such_module_xyz.run" in message
    assert "no module 'no_such_module_xyz'" in message


def test_a_callable_that_the_module_does_not_have(tmp_path: Path) -> None:
    text = "workflows:\n  - callable: client.process_queues\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0].callable: " in message
    assert "'payler.client' has no 'process_queues'" in message


def test_a_callable_that_is_not_async(tmp_path: Path) -> None:
    text = "workflows:\n  - callable: urls.mask_url\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0].callable: " in message
    assert "'payler.urls.mask_url' is not an async function" in message


def test_a_workflow_module_beside_the_config_file(tmp_path: Path) -> None:
    path = user_workflow(tmp_path, "a: 1\nb: [x, y]\n")
    workflow = config.load(path, environ={}).workflows[0]
    assert workflow.function.__module__ == "my_workflows"
    assert workflow.function.__name__ == "run"
    assert str(tmp_path.resolve()) in sys.path
    assert workflow.options == {"a": 1, "b": ["x", "y"]}  # no options_model: a plain dict
    assert workflow.name == "my_workflows.run"


def test_a_user_workflow_without_options_gets_an_empty_dict(tmp_path: Path) -> None:
    (tmp_path / "my_workflows.py").write_text(USER_MODULE, encoding="utf-8")
    text = "workflows:\n  - location: my_workflows\n    callable: run\n"
    assert config.load(write(tmp_path, text), environ={}).workflows[0].options == {}


def test_a_user_workflow_in_a_package_with_an_empty_location(tmp_path: Path) -> None:
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "jobs.py").write_text(USER_MODULE, encoding="utf-8")
    text = "workflows:\n  - location: ''\n    callable: my_package.jobs.run\n"
    workflow = config.load(write(tmp_path, text), environ={}).workflows[0]
    assert workflow.function.__module__ == "my_package.jobs"


def test_a_user_workflow_with_an_options_model(tmp_path: Path) -> None:
    (tmp_path / "my_workflows.py").write_text(
        textwrap.dedent("""\
            from pydantic import BaseModel, ConfigDict

            class Options(BaseModel):
                model_config = ConfigDict(extra="forbid")
                greeting: str = "hello"
                times: int = 1

            async def run(ctx):
                pass

            run.options_model = Options
        """),
        encoding="utf-8",
    )
    text = "workflows:\n  - location: my_workflows\n    callable: run\n"
    loaded = config.load(write(tmp_path, text + "    options: {times: 3}\n"), environ={})
    options = loaded.workflows[0].options
    assert type(options).__name__ == "Options"
    assert (options.greeting, options.times) == ("hello", 3)

    message = config_error(write(tmp_path, text + "    options: {time: 3}\n", name="bad.yaml"))
    assert "workflows[0].options.time: unknown key" in message


def test_a_user_workflow_that_is_not_async(tmp_path: Path) -> None:
    (tmp_path / "my_workflows.py").write_text("def run(ctx):\n    pass\n", encoding="utf-8")
    text = "workflows:\n  - location: my_workflows\n    callable: run\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0].callable: 'my_workflows.run' is not an async function" in message


def test_a_user_workflow_that_is_not_callable(tmp_path: Path) -> None:
    (tmp_path / "my_workflows.py").write_text("run = 5\n", encoding="utf-8")
    text = "workflows:\n  - location: my_workflows\n    callable: run\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0].callable: 'my_workflows.run' is not callable" in message


def test_a_user_module_that_fails_on_import(tmp_path: Path) -> None:
    (tmp_path / "my_workflows.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    text = "workflows:\n  - location: my_workflows\n    callable: run\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0]: importing 'my_workflows' failed: RuntimeError: boom" in message


def test_a_user_module_with_a_missing_dependency(tmp_path: Path) -> None:
    (tmp_path / "my_workflows.py").write_text(
        "import no_such_dependency_xyz\n\n" + USER_MODULE, encoding="utf-8"
    )
    text = "workflows:\n  - location: my_workflows\n    callable: run\n"
    message = config_error(write(tmp_path, text))
    assert "workflows[0]: importing 'my_workflows' failed" in message
    assert "no_such_dependency_xyz" in message


def test_lowering_only_the_prefetch_lowers_the_batch_to_fit() -> None:
    assert ProcessQueueOptions(prefetch=50).batch_size == 50
    assert ProcessQueueOptions(prefetch=500).batch_size == 100
    with pytest.raises(ValueError, match="cannot exceed prefetch"):
        ProcessQueueOptions(prefetch=50, batch_size=60)


@pytest.mark.parametrize("written", ["${Q-jobs}", "${ Q }", "${Q:=jobs}", "${Q"])
def test_an_expansion_payler_does_not_know_is_an_error_not_text(written: str) -> None:
    with pytest.raises(ConfigError, match="cannot expand"):
        config.expand({"queue": written}, {}, path="c.yaml")


def test_a_prefetch_from_the_environment_lowers_the_batch_too() -> None:
    assert ProcessQueueOptions.model_validate({"prefetch": "50"}).batch_size == 50
