"""``client.handle`` in the configuration file, and plugins (entry points, dotted paths)."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from payler import config
from payler.drivers.brokers import broker_from_url
from payler.errors import ConfigError
from payler.processing import Application
from payler.processing.options import HandleOptions
from payler.processing.serializers import find_serializer
from payler.testing import TestClient


def write(tmp_path: Path, options: str, top: str = "") -> Path:
    path = tmp_path / "configuration.yaml"
    path.write_text(f"workflows:\n  - callable: client.handle\n    options: {options}\n{top}")
    return path


def test_the_handle_workflow_loads_its_application_by_path(tmp_path: Path) -> None:
    loaded = config.load(
        write(tmp_path, '{app: "tests.processing.apps:app", queue: in, concurrency: 8}'),
        environ={},
    )
    options = loaded.workflows[0].options
    assert isinstance(options, HandleOptions)
    assert isinstance(options.app, Application) and options.app.name == "echo"
    assert (options.source_batch_size, options.source_prefetch) == (8, 16)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('{app: "tests.processing.apps:missing", queue: in}',
         "options.app: cannot import 'tests.processing.apps:missing': AttributeError"),
        ('{app: "tests.processing.apps:not_an_app", queue: in}',
         "is a object, not a payler Application"),
        ('{app: "tests.processing.apps:app"}', "options.queue: required key is missing"),
        ('{app: "tests.processing.apps:app", queue: in, outputs: {source: "amqp://x"}}',
         "output name 'source'"),
        ('{app: "tests.processing.apps:app", queue: in, outputs: {a: "nats://x"}}',
         "broker URL 'nats://x' has an unknown scheme"),
        ('{app: "tests.processing.apps:app", queue: in, default_output: audit}',
         "default_output 'audit' is none of ['source']"),
        ('{app: "tests.processing.apps:app", queue: in, order_by: "colour"}',
         "order_by is key, partition or header:NAME"),
        ('{app: "tests.processing.apps:app", queue: in, batch_size: 50, prefetch: 10}',
         "prefetch (10) cannot be below batch_size (50)"),
        ('{app: "tests.processing.apps:app", queue: in, breaker: {max_invalid_ratio: 2}}',
         "options.breaker.max_invalid_ratio"),
    ],
)  # fmt: skip
def test_bad_handle_options_are_named(tmp_path: Path, options: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, options), environ={})
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "configuration.yaml"))


@pytest.fixture
def plugin_package(tmp_path: Path) -> Iterator[Path]:
    """An installed distribution (a dist-info on sys.path) declaring payler entry points."""
    (tmp_path / "acme_plugins.py").write_text(
        "from payler.drivers.brokers.memory import MemoryBroker\n"
        "class AcmeBroker(MemoryBroker):\n    pass\n"
        "class Csv:\n"
        "    content_type = 'text/csv'\n"
        "    def decode(self, body):\n"
        "        return [line.split(',') for line in body.decode().splitlines()]\n"
        "    def encode(self, value):\n"
        "        return '\\n'.join(','.join(row) for row in value).encode()\n"
    )
    info = tmp_path / "acme_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[payler.brokers]\nacme = acme_plugins:AcmeBroker\n\n"
        "[payler.serializers]\ntext/csv = acme_plugins:Csv\n"
    )
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("acme_plugins", None)


async def test_entry_points_add_brokers_and_serializers(plugin_package: Path) -> None:
    broker = broker_from_url("acme://x")
    assert type(broker).__name__ == "AcmeBroker"
    HandleOptions(app=Application(), queue="in", source_url="acme://x")  # a known scheme now
    assert find_serializer("text/csv; header=present") is not None

    app = Application()
    seen = []

    @app.handler()
    async def rows(table: list[list[str]]) -> None:
        seen.append(table)

    await TestClient(app).send(b"a,b\n1,2", content_type="text/csv")
    assert seen == [[["a", "b"], ["1", "2"]]]


def test_the_configuration_registers_plugins_by_dotted_path(tmp_path: Path) -> None:
    (tmp_path / "local_plugins.py").write_text(
        "from payler.drivers.brokers.memory import MemoryBroker\n"
        "class LocalBroker(MemoryBroker):\n    pass\n"
    )
    try:
        loaded = config.load(
            write(
                tmp_path,
                '{app: "tests.processing.apps:app", queue: in, source_url: "local://x"}',
                'plugins:\n  brokers: {local: "local_plugins:LocalBroker"}\n',
            ),
            environ={},
        )
        assert loaded.workflows[0].options.source_url == "local://x"
        assert type(broker_from_url("local://x")).__name__ == "LocalBroker"
        with pytest.raises(ConfigError, match=r"plugins\.brokers\.bad: cannot import"):
            config.load(
                write(tmp_path, '{app: "tests.processing.apps:app", queue: in}',
                      'plugins:\n  brokers: {bad: "local_plugins:Nothing"}\n'),
                environ={},
            )  # fmt: skip
    finally:
        sys.modules.pop("local_plugins", None)
