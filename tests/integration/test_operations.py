"""The operator's surface against the real thing: payler run as users run it (a subprocess), with
RabbitMQ and each storage of the contract, driven over real HTTP from the test process — an
operator finding one message by its correlation id, moving it, cancelling another, and
replaying last night's dead letters; and ``/readyz`` when a real Redis goes away."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AMQP_URL, Rabbit, free_port, server_process
from tests.http.conftest import eventually
from tests.integration.conftest import Payler

pytestmark = pytest.mark.rabbitmq


def write_config(path: Path, rabbit: Rabbit, port: int) -> tuple[Path, dict[str, str]]:
    queues = {role: rabbit.queue_name(role) for role in ("jobs", "out", "dlq", "later")}
    path.write_text(
        f"""
workflows:
  - name: ingest
    callable: client.process_queue
    options: {{queue: "{queues["jobs"]}", default_destination: "{queues["out"]}",
               dead_letter_queue: "{queues["dlq"]}"}}
  - name: deliver
    callable: client.watch_storage
    options: {{declare_queues: ["{queues["out"]}"], dead_letter_queue: "{queues["dlq"]}",
               max_poll_interval_ms: 100}}
http: {{port: {port}, sample_interval_seconds: 0.2}}
"""
    )
    return path, queues


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("mongodb", marks=pytest.mark.mongodb),
                        pytest.param("postgres", marks=pytest.mark.postgres)])  # fmt: skip
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/spool.db"
    fixture = {"redis": "redis_spool_url", "mongodb": "mongodb_url", "postgres": "postgres_url"}
    url: str = request.getfixturevalue(fixture[request.param])
    return url


async def message(rabbit: Rabbit, queue: str, body: bytes, **fields: object) -> None:
    await rabbit.publish(queue, aio_pika.Message(body, **fields))  # type: ignore[arg-type]


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    await eventually(check, timeout_s)


async def test_find_move_cancel_and_replay_over_http(
    rabbit: Rabbit, storage_url: str, tmp_path: Path
) -> None:
    port = free_port()
    config, q = write_config(tmp_path / "configuration.yaml", rabbit, port)
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": storage_url}
    payler = await (await Payler.start(config, env, tmp_path)).running()
    api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        hour = {"x-delay": 3_600_000}
        await message(
            rabbit, q["jobs"], b"a", message_id="m-a", correlation_id="order-1", headers=hour
        )
        await message(rabbit, q["jobs"], b"b", message_id="m-b", correlation_id="order-2",
                      headers={**hour, "tenant": "acme"})  # fmt: skip
        await message(
            rabbit, q["jobs"], b"c", message_id="m-c", correlation_id="order-3", headers=hour
        )

        async def spooled() -> bool:
            return (await api.get("/v1/scheduled/count")).json()["pending"] == 3

        await until(spooled)
        # Find one by its correlation id (an indexed lookup), and by a header (a bounded scan).
        found = (await api.get("/v1/scheduled", params={"correlation_id": "order-1"})).json()
        [entry] = found["items"]
        assert (entry["message_id"], entry["body"], entry["state"]) == ("m-a", "a", "pending")
        by_header = (await api.get("/v1/scheduled", params={"header": "tenant=acme"})).json()
        assert [e["message_id"] for e in by_header["items"]] == ["m-b"]
        assert by_header["scanned"] == 3
        shown = (await api.get(f"/v1/scheduled/{entry['id']}")).json()
        assert shown["headers"]["x-delay"] == 3_600_000
        assert shown["properties"]["correlation_id"] == "order-1"

        # Move it: due in a moment, then delivered.
        moved = await api.patch(f"/v1/scheduled/{entry['id']}", json={"delay_ms": 200})
        assert moved.status_code == 200, moved.text
        [(_, delivered)] = await rabbit.collect(q["out"], 1, timeout_s=20)
        assert (delivered.body, delivered.correlation_id) == (b"a", "order-1")
        assert "x-delay" not in (delivered.headers or {})
        # Deliver one now; cancel another: the storage no longer holds it.
        ids = {e["message_id"]: e["id"] for e in (await api.get("/v1/scheduled")).json()["items"]}
        assert (await api.post(f"/v1/scheduled/{ids['m-c']}/deliver")).status_code == 200
        [(_, now)] = await rabbit.collect(q["out"], 1, timeout_s=20)
        assert now.body == b"c"
        assert (await api.delete(f"/v1/scheduled/{ids['m-b']}")).status_code == 200
        assert (await api.get(f"/v1/scheduled/{ids['m-b']}")).status_code == 404
        assert (await api.delete(f"/v1/scheduled/{ids['m-b']}")).status_code == 404
        bad = await api.patch(f"/v1/scheduled/{entry['id']}", json={"delay_ms": 1})
        assert bad.status_code == 404  # delivered already

        # Schedule over HTTP, idempotently.
        new = {"destination": q["out"], "body": "from http", "delay_ms": 100,
               "idempotency_key": "k-1", "headers": {"h": 1}}  # fmt: skip
        first = await api.post("/v1/scheduled", json=new)
        again = await api.post("/v1/scheduled", json=new)
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["id"] == again.json()["id"] == "api:k-1"
        [(_, scheduled)] = await rabbit.collect(q["out"], 1, timeout_s=20)
        assert (scheduled.body, scheduled.headers) == (b"from http", {"h": 1})
        assert (
            await api.post("/v1/scheduled", json={**new, "delay_ms": 10**13})
        ).status_code == 400

        # Last night's dead letters: an unroutable one, replayed once its queue exists.
        await message(rabbit, q["jobs"], b"lost", message_id="m-lost",
                      headers={"x-delay": 0, "x-destination": q["later"]})  # fmt: skip

        async def dead_lettered() -> bool:
            page = (await api.get("/v1/dead-letters", params={"reason": "unroutable"})).json()
            return any(d["message_id"] == "m-lost" for d in page["items"])

        await until(dead_lettered)
        [dead] = (await api.get("/v1/dead-letters", params={"reason": "unroutable"})).json()[
            "items"
        ]
        assert (dead["where"], dead["queue"], dead["destination"]) == (
            "queue",
            q["dlq"],
            q["later"],
        )
        await rabbit.channel.declare_queue(q["later"], durable=True)
        replay = await api.post("/v1/dead-letters/replay", json={"reason_class": "unroutable"})
        assert replay.json() == {"replayed": 1, "failed": []}
        [(_, replayed)] = await rabbit.collect(q["later"], 1, timeout_s=20)
        assert replayed.body == b"lost"
        assert not any(k.startswith("x-payler-dead-letter") for k in replayed.headers or {})
        again_replay = await api.post(
            "/v1/dead-letters/replay", json={"reason_class": "unroutable"}
        )
        assert again_replay.json()["replayed"] == 0  # each once
        assert await rabbit.count(q["dlq"]) == 0

        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families((await api.get("/metrics")).text)
            for s in family.samples
        }
        assert samples[("payler_delivered_total", (("workflow", "deliver"),))] == 3
        assert samples[("payler_received_total", (("workflow", "ingest"),))] == 4
    finally:
        await api.aclose()
        assert await payler.stop() == 0, payler.log
    assert "body" not in payler.log.lower() or "from http" not in payler.log


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, Callable[[], object]]]:
    """A Redis server of this test's own, on a free port; ``restart`` starts it again."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip
    stack: list[object] = []

    def start() -> None:
        context = server_process("redis", command, port, tmp_path, 10)
        context.__enter__()
        stack.append(context)

    def stop() -> None:
        while stack:
            stack.pop().__exit__(None, None, None)  # type: ignore[attr-defined]

    start()
    try:
        yield port, lambda: (stop(), start())
    finally:
        stop()


async def test_readyz_takes_payler_out_of_rotation_while_its_spool_is_down(
    rabbit: Rabbit, redis_server: tuple[int, Callable[[], object]], tmp_path: Path
) -> None:
    redis_port, _ = redis_server
    port = free_port()
    config, _ = write_config(tmp_path / "configuration.yaml", rabbit, port)
    env = {"BROKER_URL": AMQP_URL, "PAYLER_STORAGE_URL": f"redis://127.0.0.1:{redis_port}/0"}
    payler = await (await Payler.start(config, env, tmp_path)).running()
    api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
    stopped = await asyncio.to_thread(
        subprocess.run, ["redis-cli", "-p", str(redis_port), "shutdown", "nosave"],
        capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    try:
        assert stopped.returncode in (0, 1), stopped.stderr

        async def unready() -> bool:
            return (await api.get("/readyz")).status_code == 503

        await until(unready)
        body = (await api.get("/readyz")).json()
        assert "'deliver' is restarting" in body["reason"], body
        assert (await api.get("/healthz")).status_code == 200
        assert (await api.get("/v1/scheduled")).status_code == 503  # the storage is down: said so
    finally:
        await api.aclose()
        assert await payler.stop() == 0, payler.log
