"""The HTTP server inside the daemon: probes, /metrics, /openapi.json, security — over real HTTP
against a daemon running in the test process (in-memory broker and spool)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from payler.errors import StartupError
from payler.testing import make_payload
from tests import runtime_workflows
from tests.conftest import free_port
from tests.http.conftest import Daemon, Start, eventually


async def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await daemon.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples[(name, tuple(sorted(labels.items())))]


async def test_probes_and_metrics_count_what_the_workflows_do(start_daemon: Start) -> None:
    daemon = await start_daemon()
    assert (await daemon.client.get("/healthz")).json() == {"status": "ok"}
    ready = await daemon.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["workflows"]["deliver"]["state"] == "ready"

    await daemon.broker.ensure_queue("out")
    daemon.broker.publish(
        "payler-jobs", make_payload(b"now", headers={"x-delay": 0, "x-destination": "out"})
    )
    daemon.broker.publish("payler-jobs", make_payload(b"bad", headers={"x-delay": "soon"}))
    await daemon.broker.wait_for("out", 1)

    storage = f"memory://{daemon.name}"

    async def counted() -> bool:
        samples = await scrape(daemon)
        # The pending gauge is sampled now and then, not counted per message: it may still
        # show the entry for a moment after its delivery was counted.
        return (
            value(samples, "payler_delivered_total", workflow="deliver") == 1
            and value(samples, "payler_pending_entries", storage=storage) == 0
        )

    await eventually(counted)
    samples = await scrape(daemon)
    assert value(samples, "payler_received_total", workflow="ingest") == 2
    assert value(samples, "payler_spooled_total", workflow="ingest") == 1
    assert (
        value(samples, "payler_dead_lettered_total", workflow="ingest", reason="invalid-schedule")
        == 1
    )
    assert value(samples, "payler_workflow_jobs_total", workflow="ingest", status="success") == 1
    assert value(samples, "payler_workflow_jobs_total", workflow="ingest", status="failed") == 1
    assert value(samples, "payler_workflow_jobs_total", workflow="deliver", status="success") == 1
    assert value(samples, "payler_lateness_seconds_count", workflow="deliver") == 1
    assert value(samples, "payler_store_batch_seconds_count", workflow="ingest") >= 1
    assert value(samples, "payler_publish_batch_seconds_count", workflow="deliver") >= 1
    assert value(samples, "payler_workflow_state", workflow="deliver", state="ready") == 1
    assert value(samples, "payler_workflow_state", workflow="deliver", state="restarting") == 0
    assert value(samples, "payler_in_flight_messages", workflow="deliver") == 0
    assert value(samples, "payler_pending_entries", storage=storage) == 0
    assert value(samples, "payler_spool_up", storage=storage) == 1
    [build] = [labels for (name, labels) in samples if name == "payler_build_info"]
    assert dict(build)["version"]
    # Bounded cardinality: no label but these, whatever the messages were.
    labels = {key for (_, pairs) in samples for key, _ in pairs}
    assert labels <= {"workflow", "reason", "status", "state", "storage", "le", "version", "python"}


async def test_the_pending_gauges_sample_the_spool(start_daemon: Start) -> None:
    daemon = await start_daemon()
    for i in range(3):
        # (The in-memory broker counts delays from the payload's created_ms: now.)
        now_ms = daemon.runtime.clock.now_ms()
        payload = make_payload(headers={"x-delay": 3_600_000 + i}, due_ms=now_ms)
        daemon.broker.publish("payler-jobs", payload)
    storage = f"memory://{daemon.name}"

    async def sampled() -> bool:
        return value(await scrape(daemon), "payler_pending_entries", storage=storage) == 3

    await eventually(sampled)
    assert value(await scrape(daemon), "payler_oldest_overdue_seconds", storage=storage) == 0


async def test_readyz_names_the_workflow_that_is_restarting(start_daemon: Start) -> None:
    runtime_workflows.calls.clear()
    runtime_workflows.gates.update(fail=asyncio.Event(), resume=asyncio.Event())
    daemon = await start_daemon(
        workflows="  - name: gated\n    location: tests.runtime_workflows\n    callable: gated\n"
    )
    assert (await daemon.client.get("/readyz")).status_code == 200
    runtime_workflows.gates["fail"].set()

    async def unready() -> bool:
        return (await daemon.client.get("/readyz")).status_code == 503

    await eventually(unready)
    body = (await daemon.client.get("/readyz")).json()
    assert body["ready"] is False
    assert "'gated' is restarting" in body["reason"]
    assert "lost the broker" in body["reason"]
    assert "s3cret" not in body["reason"]  # passwords stay masked
    assert body["workflows"]["gated"]["state"] == "restarting"
    assert (await daemon.client.get("/healthz")).status_code == 200  # alive all the same
    runtime_workflows.gates["resume"].set()

    async def ready() -> bool:
        return (await daemon.client.get("/readyz")).status_code == 200

    await eventually(ready)


async def test_openapi_describes_every_endpoint(start_daemon: Start) -> None:
    daemon = await start_daemon()
    document = (await daemon.client.get("/openapi.json")).json()
    paths = document["paths"]
    for path, method in [
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/v1/scheduled", "get"),
        ("/v1/scheduled", "post"),
        ("/v1/scheduled/count", "get"),
        ("/v1/scheduled/{entry_id}", "get"),
        ("/v1/scheduled/{entry_id}", "delete"),
        ("/v1/scheduled/{entry_id}", "patch"),
        ("/v1/scheduled/{entry_id}/deliver", "post"),
        ("/v1/dead-letters", "get"),
        ("/v1/dead-letters/replay", "post"),
    ]:
        assert method in paths[path], (path, method)


async def test_a_port_in_use_is_a_startup_error(start_daemon: Start) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await start_daemon(http=f"{{port: {port}}}")


async def test_tokens_guard_the_admin_api_and_name_who_changed_what(
    start_daemon: Start, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-0123456789abcdef\nbob:bob-0123456789abcdef\n")
    daemon = await start_daemon(http=f"{{port: {free_port()}, token_file: '{tokens}'}}")
    client = daemon.client
    assert (await client.get("/v1/scheduled")).status_code == 401
    wrong = await client.get("/v1/scheduled", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/metrics")).status_code == 200  # no token for these
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    bob = {"Authorization": "Bearer bob-0123456789abcdef"}
    caplog.set_level(logging.INFO, "payler.admin")
    new = {"destination": "out", "body": "secret body", "delay_ms": 60_000}
    created = await client.post("/v1/scheduled", json=new, headers=bob)
    assert created.status_code == 201, created.text
    entry_id = created.json()["id"]
    assert (await client.delete(f"/v1/scheduled/{entry_id}", headers=bob)).status_code == 200
    audit = [r.getMessage() for r in caplog.records if r.name == "payler.admin"]
    assert any("bob scheduled" in line and entry_id in line for line in audit), audit
    assert any("bob cancelled" in line and entry_id in line for line in audit), audit
    text = caplog.text
    assert "secret body" not in text  # bodies never logged
    assert "0123456789abcdef" not in text  # tokens never logged


async def test_request_bodies_over_the_limit_are_refused(start_daemon: Start) -> None:
    daemon = await start_daemon(http=f"{{port: {free_port()}, max_request_bytes: 2048}}")
    big = {"destination": "out", "body": "x" * 4096, "delay_ms": 1}
    response = await daemon.client.post("/v1/scheduled", json=big)
    assert response.status_code == 413
    assert "2048" in response.json()["detail"]

    async def chunks() -> object:
        for _ in range(10):
            yield b"x" * 512

    chunked = await daemon.client.post(
        "/v1/scheduled", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    small = await daemon.client.post("/v1/scheduled", json={**big, "body": "ok"})
    assert small.status_code == 201
