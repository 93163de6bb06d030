"""The example application (examples/shop.py), as its users would test it: with the test client
and a fake clock, no broker."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from payler.testing import FakeClock, TestClient

EXAMPLES = Path(__file__).parents[2] / "examples"
ORDER = {"id": "o-1", "customer": "ada", "country": "FR", "amount": "100.00"}


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("TAX_RATES_FILE", str(tmp_path / "rates.json"))
    monkeypatch.setenv("RETRY_BASE_MS", "1000")
    spec = importlib.util.spec_from_file_location("shop_example", EXAMPLES / "shop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["shop_example"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["shop_example"]


async def test_an_order_is_invoiced_now_and_reminded_a_day_later(
    shop: ModuleType, tmp_path: Path
) -> None:
    (tmp_path / "rates.json").write_text(json.dumps({"FR": 20}))
    client = TestClient(shop.app, clock=FakeClock())

    handled = await client.send(ORDER, headers={"type": "order.created"})

    [invoice] = handled.outputs
    assert invoice.destination == "invoices"
    assert invoice.json() == {"order_id": "o-1", "customer": "ada", "net": "100.00",
                              "tax": "20.00", "total": "120.00"}  # fmt: skip
    [reminder] = handled.delayed
    await client.advance(24 * 3600 * 1000 - 1)
    assert reminder not in client.published
    await client.advance(1)
    assert client.published[-1] == reminder


async def test_an_order_waits_for_the_tax_rates_with_backoff(
    shop: ModuleType, tmp_path: Path
) -> None:
    client = TestClient(shop.app, clock=FakeClock())
    handled = await client.send(ORDER, headers={"type": "order.created"})
    assert handled.outputs == [] and handled.retry_at_ms is not None
    assert handled.error is not None and "FileNotFoundError" in handled.error

    (tmp_path / "rates.json").write_text(json.dumps({"FR": 5.5}))
    [retried] = await client.advance(2_000)  # the first retry: after about a second
    assert retried.attempt == 2
    assert retried.outputs[0].json()["total"] == "105.50"


async def test_bad_input_is_dead_lettered_with_the_reason(shop: ModuleType) -> None:
    client = TestClient(shop.app)
    await client.send({**ORDER, "amount": "-1"}, headers={"type": "order.created"})
    await client.send({"order_id": "o-1", "amount": "-5"}, headers={"type": "payment.received"})
    await client.send({}, headers={"type": "refund"})
    reasons = [reason for _, reason in client.dead_letters]
    assert reasons[0].startswith("does not validate as Order: amount:")
    assert reasons[1] == "rejected by handler 'receipt': a payment of -5 makes no sense"
    assert reasons[2] == "no handler matched"
    assert client.retries == []
