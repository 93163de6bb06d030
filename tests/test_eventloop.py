"""PAYLER_EVENT_LOOP picks the daemon's event loop: uvloop where installed, else asyncio."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from payler import eventloop
from payler.errors import ConfigError
from tests.integration.conftest import Payler
from tests.test_cli import ROOT, in_memory_config


async def running_loop() -> str:
    return eventloop.describe(asyncio.get_running_loop())


def test_default_is_uvloop_where_installed() -> None:
    pytest.importorskip("uvloop")
    assert eventloop.choose({})[0] == "uvloop"
    assert eventloop.run(running_loop(), env={}).startswith("uvloop ")


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_asyncio_opts_out(value: str) -> None:
    assert eventloop.choose({eventloop.ENV: value})[0] == "asyncio"
    assert eventloop.run(running_loop(), env={eventloop.ENV: value}) == "asyncio"


def test_uvloop_asked_for_explicitly() -> None:
    pytest.importorskip("uvloop")
    assert eventloop.run(running_loop(), env={eventloop.ENV: "uvloop"}).startswith("uvloop ")


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert eventloop.choose({})[0] == "asyncio"
    assert eventloop.choose({eventloop.ENV: "auto"})[0] == "asyncio"
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        eventloop.choose({eventloop.ENV: "uvloop"})


def test_an_unknown_value_is_a_config_error_and_nothing_is_left_unawaited() -> None:
    coroutine = running_loop()
    with pytest.raises(ConfigError, match="PAYLER_EVENT_LOOP='tokio'"):
        eventloop.run(coroutine, env={eventloop.ENV: "tokio"})
    assert coroutine.cr_frame is None  # closed


@pytest.mark.parametrize("value", ["asyncio", "uvloop"])
async def test_the_daemon_runs_on_the_loop_asked_for_and_says_so(
    tmp_path: Path, value: str
) -> None:
    """``payler --config-file`` with PAYLER_EVENT_LOOP set logs the loop it runs on at start."""
    if value == "uvloop":
        pytest.importorskip("uvloop")
    config = in_memory_config(tmp_path)
    payler = await (await Payler.start(config, {eventloop.ENV: value}, ROOT)).running()
    try:
        await payler.wait_for_line(f"event loop: {value}")
        other = "uvloop" if value == "asyncio" else "asyncio"
        assert f"event loop: {other}" not in payler.log
    finally:
        assert await payler.stop() == 0, payler.log
