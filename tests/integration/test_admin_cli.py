"""The admin CLI through its entry point, against RabbitMQ and the SQLite spool a running daemon
uses: directly on the storage and broker, and through the daemon's API (``--api``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, Rabbit, free_port
from tests.http.conftest import eventually
from tests.integration.conftest import Payler
from tests.integration.test_operations import write_config

pytestmark = pytest.mark.rabbitmq

#: The console script pip installed (the ``[project.scripts]`` entry point).
PAYLER = str(Path(sys.executable).with_name("payler"))


async def cli(*args: str, env: dict[str, str], stdin: bytes | None = None) -> tuple[int, str, str]:
    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([PAYLER, *args], input=stdin, capture_output=True, timeout=60,
                              env={**os.environ, **env}, check=False)  # fmt: skip

    done = await asyncio.to_thread(run)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_an_operator_works_from_the_shell(rabbit: Rabbit, tmp_path: Path) -> None:
    port = free_port()
    config, q = write_config(tmp_path / "configuration.yaml", rabbit, port)
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"}
    with_config = ["--config-file", str(config)]
    payler = await (await Payler.start(config, env, tmp_path)).running()
    try:
        # payler send: to the input queue, with a delay, a destination and a header.
        code, out, err = await cli(*with_config, "send", "--delay", "1h", "--destination", q["out"],
                                   "-H", "tenant=acme", "--correlation-id", "c-9",
                                   '{"id": 1}', env=env)  # fmt: skip
        assert code == 0, err
        assert f"to {q['jobs']!r}" in out
        code, _, err = await cli(*with_config, "send", "--delay", "2h", "--correlation-id",
                                 "c-10", "--message-id", "m-10", "-",
                                 env=env, stdin=b"from stdin")  # fmt: skip
        assert code == 0, err

        async def spooled() -> bool:
            code, out, _ = await cli(*with_config, "scheduled", "count", "--json", env=env)
            return code == 0 and json.loads(out)["pending"] == 2

        await eventually(spooled, 30)
        # Find by correlation id, directly on the spool; and the table a person reads.
        code, out, err = await cli(*with_config, "scheduled", "list", "--correlation-id", "c-9",
                                   "--json", env=env)  # fmt: skip
        assert code == 0, err
        [entry] = json.loads(out)["items"]
        assert (entry["body"], entry["headers"]["tenant"]) == ('{"id": 1}', "acme")
        code, table, _ = await cli(*with_config, "scheduled", "list", env=env)
        assert table.splitlines()[0].split()[:3] == ["ID", "DUE", "DESTINATION"]
        assert "c-10" in table and "c-9" in table
        # Show and move it through the API; it is delivered.
        api = ["--api", f"http://127.0.0.1:{port}"]
        code, out, err = await cli("scheduled", "show", entry["id"], *api, env=env)
        assert code == 0 and "tenant" in out and '{"id": 1}' in out, err
        code, out, err = await cli("scheduled", "reschedule", entry["id"], "--delay", "100ms", *api,
                                   env=env)  # fmt: skip
        assert code == 0, err
        [(_, delivered)] = await rabbit.collect(q["out"], 1, timeout_s=20)
        assert (delivered.body, delivered.correlation_id) == (b'{"id": 1}', "c-9")
        # Cancel the other, directly; cancelling it again fails with one line.
        code, out, err = await cli(*with_config, "scheduled", "list", "--message-id", "m-10",
                                   "--json", env=env)  # fmt: skip
        [other] = json.loads(out)["items"]
        assert other["body"] == "from stdin"
        code, out, err = await cli(*with_config, "scheduled", "cancel", other["id"], env=env)
        assert (code, out.strip()) == (0, f"cancelled: {other['id']}"), err
        code, out, err = await cli(*with_config, "scheduled", "show", other["id"], env=env)
        assert code == 1 and err.strip() == f"payler: error: no entry {other['id']!r}"

        # Last night's dead letters: listed, then replayed once the queue exists.
        code, _, err = await cli(*with_config, "send", "--delay", "0s", "--destination", q["later"],
                                 "--message-id", "m-lost", "lost", env=env)  # fmt: skip
        assert code == 0, err

        async def dead() -> bool:
            code, out, _ = await cli(*with_config, "dead-letters", "list", "--json", env=env)
            return code == 0 and any(d["message_id"] == "m-lost" for d in json.loads(out)["items"])

        await eventually(dead, 30)
        await rabbit.channel.declare_queue(q["later"], durable=True)
        code, out, err = await cli(*with_config, "dead-letters", "replay", "--reason", "unroutable",
                                   env=env)  # fmt: skip
        assert (code, out.strip()) == (0, "replayed: 1"), err
        [(_, replayed)] = await rabbit.collect(q["later"], 1, timeout_s=20)
        assert replayed.body == b"lost"

        # A message that can never be scheduled: discarded for good, through the API.
        code, _, err = await cli(*with_config, "send", "-H", "x-delay=soon", "--message-id",
                                 "m-bad", "bad", env=env)  # fmt: skip
        assert code == 0, err

        async def invalid() -> bool:
            code, out, _ = await cli("dead-letters", "list", "--reason", "invalid-schedule",
                                     "--json", *api, env=env)  # fmt: skip
            return code == 0 and [d["message_id"] for d in json.loads(out)["items"]] == ["m-bad"]

        await eventually(invalid, 30)
        code, out, err = await cli("dead-letters", "discard", "--reason", "invalid-schedule",
                                   "--yes", *api, env=env)  # fmt: skip
        assert (code, out.strip()) == (0, "discarded: 1"), err
        assert await rabbit.count(q["dlq"]) == 0
    finally:
        assert await payler.stop() == 0, payler.log


async def test_failures_are_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"amqp://me:s3cret@127.0.0.1:{free_port()}/"
    env = {"BROKER_URL": url, "PAYLER_STORAGE_URL": f"sqlite:///{tmp_path}/spool.db"}
    code, _, err = await cli("send", "--delay", "5s", "x", env=env)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("payler: error: ")
    assert "s3cret" not in err and "me:***@" in err
    code, _, err = await cli("send", "--delay", "soon", "x", env=env)
    assert code == 2 and "not a duration" in err  # a usage error, as click says them
    code, _, err = await cli("scheduled", "list", "--api", f"http://127.0.0.1:{free_port()}",
                             env=env)  # fmt: skip
    assert code == 1 and "cannot reach the payler API" in err


async def test_the_daemon_stays_the_default_command(tmp_path: Path) -> None:
    code, _, err = await cli(env={})
    assert code == 2 and "Missing option '--config-file'" in err
    config = tmp_path / "c.yaml"
    config.write_text("workflows:\n  - callable: client.watch_storage\n")
    code, out, err = await cli("--config-file", str(config), "--check", env={})
    assert (code, out.strip()) == (0, f"{config}: OK, 1 workflow(s)"), err
