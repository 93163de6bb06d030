"""The Dockerfile's command, run without docker (no engine here): what the image runs, we run.

The image's ENTRYPOINT + CMD, with /configuration.yaml being the repository's
configuration.yaml (the Dockerfile copies it there), in a working directory standing for /data,
configured only by environment variables, against the real RabbitMQ (a vhost of its own).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import aio_pika
import pytest

from tests.integration.conftest import Payler

ROOT = Path(__file__).parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    [value] = re.findall(rf"^{name}\s+(\[.*\])\s*$", DOCKERFILE, flags=re.MULTILINE)
    parsed: list[str] = json.loads(value)
    return parsed


def test_the_image_runs_payler_as_a_non_root_user_on_the_mounted_configuration() -> None:
    assert instruction("ENTRYPOINT") == ["payler"]
    assert instruction("CMD") == ["--config-file", "/configuration.yaml"]
    assert re.search(r"^COPY configuration.yaml /configuration.yaml$", DOCKERFILE, re.MULTILINE)
    [user] = re.findall(r"^USER\s+(\S+)\s*$", DOCKERFILE, flags=re.MULTILINE)
    assert user not in {"root", "0"}
    assert "useradd" in DOCKERFILE and user in DOCKERFILE
    # No storage variable is baked in: it would shadow the MONGODB_URL users pass.
    env_blocks = re.findall(r"^ENV\s+(?:.*\\\n)*.*$", DOCKERFILE, flags=re.MULTILINE)
    assert env_blocks, "the ENV instruction was not found"
    for block in env_blocks:
        assert "STORAGE_URL" not in block
        assert "MONGODB_URL" not in block


@pytest.mark.rabbitmq
async def test_the_image_command_delays_a_message(vhost: str, tmp_path: Path) -> None:
    command = instruction("ENTRYPOINT") + instruction("CMD")
    config = ROOT / "configuration.yaml"
    assert command[0] == "payler" and command[1:] == ["--config-file", "/configuration.yaml"]
    data = tmp_path / "data"
    data.mkdir()
    payler = await (await Payler.start(config, {"BROKER_URL": vhost}, cwd=data)).running()
    try:
        connection = await aio_pika.connect(vhost)
        channel = await connection.channel()
        published = time.time()
        await channel.default_exchange.publish(
            aio_pika.Message(b"from docker", headers={"x-delay": "300"}), "payler-jobs"
        )
        out = await channel.declare_queue("payler-out", passive=True)
        message = await _next(out)
        arrived = time.time()
        await connection.close()
    finally:
        assert await payler.stop() == 0, payler.log
    assert message.body == b"from docker"
    assert arrived - published >= 0.3
    assert (data / "payler-spool.db").exists(), "the embedded spool lives in the working dir"


async def _next(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    async with queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            return message
    raise AssertionError("the queue iterator ended")
