"""The handler API through the test client users get (no broker, a fake clock): routing,
decoding and validation, outputs, retries and dead letters."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import msgpack
import pytest
from pydantic import BaseModel

from payler.processing import (
    Application,
    Context,
    Message,
    Output,
    Reject,
    RetryLater,
    RetryPolicy,
    content_type,
    field,
    has_header,
    header,
)
from payler.reasons import reason_class
from payler.testing import FakeClock, TestClient

START_MS = 1_700_000_000_000


class Order(BaseModel):
    id: int
    amount: float


class Invoice(BaseModel):
    order_id: int
    total: float


def orders_app() -> Application:
    app = Application("orders")

    @app.handler(header("type", "order"))
    async def invoice(order: Order, ctx: Context) -> list[Output]:
        return [
            Output("invoices", Invoice(order_id=order.id, total=order.amount)),
            Output("reminders", {"order": order.id}, delay_ms=86_400_000, broker="audit"),
        ]

    @app.handler(header("type", "ping"))
    def pong(body: bytes) -> Output:  # a plain function: run in a thread
        return Output("pongs", body)

    return app


async def test_a_message_is_decoded_validated_and_its_outputs_encoded() -> None:
    client = TestClient(orders_app(), clock=FakeClock(START_MS), outputs=["audit"])

    handled = await client.send(
        {"id": 7, "amount": 12.5}, headers={"type": "order"}, correlation_id="c-7", key="k"
    )

    assert handled.handler == "invoice" and handled.dead_letter is None
    [invoice] = handled.outputs
    assert (invoice.broker, invoice.destination) == ("source", "invoices")
    assert invoice.json() == {"order_id": 7, "total": 12.5}
    assert invoice.content_type == "application/json"
    assert invoice.payload.properties.correlation_id == "c-7"  # carried over by default
    assert invoice.payload.key == b"k"
    [reminder] = handled.delayed
    assert (reminder.broker, reminder.due_ms) == ("audit", START_MS + 86_400_000)
    assert client.published == [invoice]
    await client.advance(86_399_999)
    assert client.published == [invoice]
    await client.advance(1)
    assert client.published == [invoice, reminder]


async def test_output_ids_derive_from_the_source_message_and_the_index() -> None:
    client = TestClient(orders_app(), outputs=["audit"])
    first = await client.send({"id": 1, "amount": 1}, headers={"type": "order"}, message_id="m1")
    again = await client.send({"id": 1, "amount": 1}, headers={"type": "order"}, message_id="m1")

    ids = [o.payload.id for o in first.outputs + first.delayed]
    assert ids == ["test:test:m1#0", "test:test:m1#1"]
    assert [o.payload.id for o in again.outputs + again.delayed] == ids  # a re-run: the same
    assert first.outputs[0].payload.properties.message_id == "test:test:m1#0"


async def test_exactly_one_handler_must_match() -> None:
    app = Application()

    @app.handler(has_header("a"))
    async def first(body: dict) -> None:  # type: ignore[type-arg]
        return None

    @app.handler(has_header("b"))
    async def second(body: dict) -> None:  # type: ignore[type-arg]
        return None

    client = TestClient(app)
    none = await client.send({}, headers={})
    both = await client.send({}, headers={"a": 1, "b": 2})
    one = await client.send({}, headers={"a": 1})

    assert none.dead_letter == "no handler matched"
    assert both.dead_letter == "ambiguous: first, second"
    assert reason_class(none.dead_letter) == reason_class(both.dead_letter) == "unmatched"
    assert one.dead_letter is None and one.handler == "first"
    assert len(client.dead_letters) == 2
    assert client.retries == []  # never retried

    @app.fallback()
    async def rest(body: dict) -> None:  # type: ignore[type-arg]
        return None

    assert (await client.send({}, headers={})).handler == "rest"
    assert (
        await client.send({}, headers={"a": 1, "b": 2})
    ).dead_letter == "ambiguous: first, second"


async def test_matchers_compose() -> None:
    app = Application()
    seen: list[str] = []

    @app.handler(content_type("application/json") & field("kind", "a") & ~has_header("skip"))
    async def kind_a(body: dict) -> None:  # type: ignore[type-arg]
        seen.append("a")

    @app.handler(header("kind", "b") | field("meta.kind", "b"))
    async def kind_b(body: dict) -> None:  # type: ignore[type-arg]
        seen.append("b")

    @app.handler(lambda m: m.headers.get("n", 0) > 5)
    async def big(body: dict) -> None:  # type: ignore[type-arg]
        seen.append("big")

    client = TestClient(app)
    await client.send({"kind": "a"})
    await client.send({"kind": "a"}, headers={"skip": True})  # no handler
    await client.send({"meta": {"kind": "b"}})
    await client.send(b"{}", headers={"kind": b"b"})  # Kafka headers are bytes
    await client.send({}, headers={"n": 9})
    await client.send({}, headers={"n": "not a number"})  # the lambda raises: no match

    assert seen == ["a", "b", "b", "big"]
    assert [r for _, r in client.dead_letters] == ["no handler matched"] * 2
    assert str(app.handlers[0].matcher) == (
        "((content_type('application/json') & field('kind', 'a')) & ~has_header('skip'))"
    )


async def test_undecodable_and_invalid_messages_are_dead_lettered_never_retried() -> None:
    app = Application()

    @app.handler()
    async def take(order: Order) -> None:
        return None

    client = TestClient(app)
    broken = await client.send(b"{not json", content_type="application/json")
    invalid = await client.send({"id": "seven", "amount": 1})
    unknown = await client.send(b"\x00", content_type="application/x-unknown")

    assert broken.dead_letter is not None and broken.dead_letter.startswith("cannot be decoded")
    assert reason_class(broken.dead_letter) == "undecodable"
    assert invalid.dead_letter is not None
    assert invalid.dead_letter.startswith("does not validate as Order: id:")
    assert reason_class(invalid.dead_letter) == "invalid"
    assert unknown.dead_letter == (
        "cannot be decoded: no serializer for content type 'application/x-unknown'"
    )
    assert client.retries == []
    [(payload, _), *_] = client.dead_letters
    assert payload.body == b"{not json"  # the original bytes


async def test_the_parameter_type_picks_the_decoding() -> None:
    app = Application()
    got: dict[str, object] = {}

    @app.handler(header("t", "bytes"))
    async def raw(body: bytes) -> None:
        got["bytes"] = body

    @app.handler(header("t", "str"))
    async def text(body: str) -> None:
        got["str"] = body

    @app.handler(header("t", "dict"))
    async def mapping(body: dict[str, int]) -> None:
        got["dict"] = body

    @app.handler(header("t", "message"))
    async def whole(message: Message) -> None:
        got["message"] = message.headers["t"]

    @app.handler(header("t", "any"))
    async def anything(body) -> None:  # type: ignore[no-untyped-def]  # no annotation: decoded
        got["any"] = body

    client = TestClient(app)
    await client.send(b"\xff\x00", headers={"t": "bytes"})
    await client.send("héllo", headers={"t": "str"})
    await client.send(
        msgpack.packb({"a": 1}), headers={"t": "dict"}, content_type="application/msgpack"
    )
    await client.send({"x": [1]}, headers={"t": "message"})
    await client.send([1, 2], headers={"t": "any"})
    bad = await client.send(b"\xff", headers={"t": "str"})

    assert got == {"bytes": b"\xff\x00", "str": "héllo", "dict": {"a": 1}, "message": "message",
                   "any": [1, 2]}  # fmt: skip
    assert bad.dead_letter is not None and "UTF-8" in bad.dead_letter


async def test_outputs_get_the_content_type_of_their_encoding() -> None:
    app = Application(content_type="application/msgpack")

    @app.handler()
    async def fan_out(order: Order) -> list[Output | tuple[str, object]]:
        return [
            ("as-default", {"id": order.id}),  # Volley's (destination, message) pairs work too
            Output("as-json", order, content_type="application/json"),
            Output("as-text", "done"),
            Output("as-bytes", b"\x01"),
        ]

    client = TestClient(app)
    handled = await client.send(Order(id=3, amount=2))  # msgpack, the app's default
    by_queue = {o.destination: o for o in handled.outputs}
    assert msgpack.unpackb(by_queue["as-default"].body) == {"id": 3}
    assert by_queue["as-default"].content_type == "application/msgpack"
    assert by_queue["as-json"].json() == {"id": 3, "amount": 2.0}
    assert by_queue["as-text"].content_type == "text/plain; charset=utf-8"
    assert (by_queue["as-bytes"].body, by_queue["as-bytes"].content_type) == (
        b"\x01",
        "application/octet-stream",
    )


async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered() -> None:
    app = Application()
    attempts: list[int] = []

    @app.handler(retry=RetryPolicy(max_attempts=3, base_ms=1_000, max_ms=10_000, jitter=0))
    async def flaky(body: dict, ctx: Context) -> None:  # type: ignore[type-arg]
        attempts.append(ctx.attempt)
        raise ConnectionError("the API is down")

    clock = FakeClock(START_MS)
    client = TestClient(app, clock=clock)
    first = await client.send({"id": 1})
    assert first.retry_at_ms == START_MS + 1_000 and first.dead_letter is None
    assert first.error is not None and first.error.startswith("ConnectionError: the API is down")
    assert await client.advance(999) == []
    [second] = await client.advance(1)
    assert second.retry_at_ms == START_MS + 1_000 + 2_000  # doubled
    [third] = await client.advance(2_000)
    assert attempts == [1, 2, 3]
    assert third.retry_at_ms is None
    assert third.dead_letter is not None
    assert third.dead_letter.startswith(
        "gave up after 3 attempts: ConnectionError: the API is down"
    )
    assert "test_application.py:" in third.dead_letter and "in flaky" in third.dead_letter
    assert reason_class(third.dead_letter) == "max-attempts"
    assert client.retries == []


async def test_a_handler_can_ask_for_a_retry_after_a_delay_or_reject_now() -> None:
    app = Application()

    @app.handler(header("do", "later"))
    async def later(body: dict, ctx: Context) -> Output:  # type: ignore[type-arg]
        if ctx.attempt == 1:
            raise RetryLater("not yet", delay_ms=30_000)
        assert ctx.last_error is not None and "not yet" in ctx.last_error
        return Output("done", {"attempt": ctx.attempt})

    @app.handler(header("do", "reject"))
    async def refuse(body: dict) -> None:  # type: ignore[type-arg]
        raise Reject("unknown customer")

    client = TestClient(app, clock=FakeClock(START_MS))
    handled = await client.send({}, headers={"do": "later"})
    assert handled.retry_at_ms == START_MS + 30_000
    [again] = await client.advance(30_000)
    assert again.outputs[0].json() == {"attempt": 2}

    rejected = await client.send({}, headers={"do": "reject"})
    assert rejected.dead_letter == "rejected by handler 'refuse': unknown customer"
    assert reason_class(rejected.dead_letter) == "rejected"
    assert client.retries == []


async def test_plain_functions_run_in_a_thread_async_ones_on_the_loop() -> None:
    app = Application()
    threads: dict[str, int] = {}

    @app.handler(header("k", "sync"))
    def blocking(body: dict) -> None:  # type: ignore[type-arg]
        threads["sync"] = threading.get_ident()

    @app.handler(header("k", "async"))
    async def nonblocking(body: dict) -> None:  # type: ignore[type-arg]
        threads["async"] = threading.get_ident()

    client = TestClient(app)
    await client.send({}, headers={"k": "sync"})
    await client.send({}, headers={"k": "async"})
    assert threads["async"] == threading.get_ident()
    assert threads["sync"] != threading.get_ident()


async def test_due_at_and_delay_make_delayed_outputs() -> None:
    app = Application()
    at = datetime.fromtimestamp(START_MS / 1000, UTC) + timedelta(hours=1)

    @app.handler()
    async def schedule(body: dict) -> list[Output]:  # type: ignore[type-arg]
        return [Output("a", {}, due_at=at), Output("b", {}, delay_ms=5), Output("c", {})]

    client = TestClient(app, clock=FakeClock(START_MS))
    handled = await client.send({})
    assert [o.due_ms for o in handled.delayed] == [START_MS + 3_600_000, START_MS + 5]
    assert [o.destination for o in handled.outputs] == ["c"]
    with pytest.raises(ValueError, match="timezone"):
        Output("a", {}, due_at=datetime(2030, 1, 1))  # no timezone: the error under test
    with pytest.raises(ValueError, match="not both"):
        Output("a", {}, delay_ms=1, due_at=1)


async def test_a_bad_return_value_or_unknown_broker_is_a_failure_of_the_handler() -> None:
    app = Application(retry=RetryPolicy(max_attempts=1))

    @app.handler(header("r", "dict"))
    async def returns_dict(body: dict) -> dict:  # type: ignore[type-arg]
        return {"oops": True}

    @app.handler(header("r", "broker"))
    async def unknown_broker(body: dict) -> Output:  # type: ignore[type-arg]
        return Output("q", {}, broker="nowhere")

    client = TestClient(app)
    first = await client.send({}, headers={"r": "dict"})
    second = await client.send({}, headers={"r": "broker"})
    assert first.dead_letter is not None and "return None, an Output" in first.dead_letter
    assert second.dead_letter is not None and "'nowhere' is not configured" in second.dead_letter


def test_registration_errors_are_clear() -> None:
    app = Application()
    with pytest.raises(TypeError, match="neither the context"):

        @app.handler()
        async def two(body: dict, other: int) -> None:  # type: ignore[type-arg]
            return None

    with pytest.raises(ValueError, match="no serializer"):

        @app.handler(content_type="application/x-nope")
        async def nope(body: dict) -> None:  # type: ignore[type-arg]
            return None

    @app.handler()
    async def once(body: dict) -> None:  # type: ignore[type-arg]
        return None

    with pytest.raises(ValueError, match="already has a handler named 'once'"):
        app.handler(name="once")(once)


async def test_handler_metrics_and_log_lines_name_the_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Application(retry=RetryPolicy(max_attempts=2, base_ms=10, max_ms=10))

    @app.handler(header("t", "ok"))
    async def good(body: dict, ctx: Context) -> list[Output]:  # type: ignore[type-arg]
        ctx.log.info("handling the order")
        return [Output("a", {}), Output("b", {})]

    @app.handler(header("t", "bad"))
    async def bad(body: dict) -> None:  # type: ignore[type-arg]
        raise ValueError("boom")

    client = TestClient(app)
    with caplog.at_level(logging.INFO, logger="payler.handler"):
        await client.send({"secret": "body"}, headers={"t": "ok"}, message_id="m-1")
    await client.send({}, headers={"t": "bad"})
    await client.advance(1_000)
    await client.send({}, headers={"t": "none"})

    [record] = [r for r in caplog.records if r.name == "payler.handler.good"]
    assert record.getMessage() == "[message test:test:m-1] handling the order"
    assert record.ids == ["test:test:m-1"]  # type: ignore[attr-defined]
    assert "secret" not in caplog.text
    counts = client.metrics.handler_counts
    assert (counts[("good", "handled")], counts[("good", "outputs")]) == (1, 2)
    assert (counts[("bad", "failed")], counts[("bad", "retried")]) == (2, 1)
    assert client.metrics.handler_reasons[("bad", "max-attempts")] == 1
    assert client.metrics.handler_reasons[("(none)", "unmatched")] == 1
    assert client.metrics.handler_durations["good"].count == 1


async def test_a_batch_handler_gets_the_messages_and_its_failure_retries_each() -> None:
    app = Application(retry=RetryPolicy(max_attempts=2, base_ms=100, max_ms=100, jitter=0))
    batches: list[list[int]] = []

    @app.batch_handler(max_size=10)
    async def total(orders: list[Order], ctx: Context) -> Output:
        batches.append([o.id for o in orders])
        if any(o.amount < 0 for o in orders):
            raise ValueError("negative amount")
        return Output("totals", {"sum": sum(o.amount for o in orders)})

    client = TestClient(app)
    handled = await client.send({"id": 1, "amount": 5})
    assert handled.outputs[0].json() == {"sum": 5.0}
    assert batches == [[1]]
