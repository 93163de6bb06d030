"""The runtime: start-up failures, restarts with backoff, and stopping within the grace period."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from payler import config
from payler.clock import FakeClock
from payler.errors import StartupError
from payler.runtime import RESTART_BACKOFF, Runtime
from tests import runtime_workflows


def load(tmp_path: Path, *callables: str, grace: float = 5.0, extra: str = "") -> config.Loaded:
    entries = "".join(
        f"  - name: {name}\n    location: tests.runtime_workflows\n    callable: {name}\n"
        f"    options: {{who: {name}}}\n"
        for name in callables
    )
    path = tmp_path / "configuration.yaml"
    path.write_text(f"workflows:\n{entries}shutdown_grace_seconds: {grace}\n{extra}")
    return config.load(path)


@pytest.fixture(autouse=True)
def fresh_calls() -> None:
    runtime_workflows.calls.clear()
    runtime_workflows.third_run = asyncio.Event()  # an Event belongs to one test's loop
    runtime_workflows.all_runs = asyncio.Event()
    runtime_workflows.outage_log.clear()


async def test_a_workflow_failing_before_ready_is_a_startup_error(tmp_path: Path) -> None:
    runtime = Runtime(load(tmp_path, "polite", "fails_before_ready"))
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(runtime.run(asyncio.Event()), 5)
    assert "fails_before_ready" in str(caught.value)
    assert "connection refused" in str(caught.value)
    # The other workflow was stopped the clean way (it returned), not cancelled.
    assert runtime_workflows.calls["polite options"] == {"who": "polite"}


async def test_transient_failures_after_ready_restart_with_backoff(tmp_path: Path) -> None:
    clock = FakeClock()
    start = clock.now_ms()
    runtime = Runtime(load(tmp_path, "flaky"), clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await asyncio.wait_for(runtime_workflows.third_run.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    [ctx] = runtime.contexts
    assert ctx.metrics.totals["restarts"] == 2
    # A backoff of 0.5 s, then 1 s (±20 % jitter), on the runtime's clock.
    assert clock.now_ms() - start >= 1_200


async def test_a_bug_after_ready_restarts_that_workflow_and_never_stops_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime_workflows.calls.clear()
    runtime_workflows.buggy_third_run.clear()
    runtime = Runtime(load(tmp_path, "buggy", "polite"), clock=FakeClock())
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    async with asyncio.timeout(5):
        await runtime_workflows.buggy_third_run.wait()
    assert "polite options" not in runtime_workflows.calls  # still running, never stopped
    stop.set()
    await asyncio.wait_for(task, 5)  # returns: no error raised from run()
    assert runtime_workflows.calls["polite options"] == {"who": "polite"}
    assert runtime.contexts[0].metrics.totals["restarts"] == 2
    bugs = [r for r in caplog.records if "ZeroDivisionError: a bug" in r.getMessage()]
    assert len(bugs) == 2
    assert all(r.levelname == "ERROR" and r.exc_info for r in bugs)  # a traceback: it is a bug


async def test_stop_lets_workflows_finish_and_cancels_the_rest_after_grace(tmp_path: Path) -> None:
    runtime = Runtime(load(tmp_path, "polite", "stubborn", grace=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    async with asyncio.timeout(5):
        await runtime.started.wait()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert runtime_workflows.calls["polite options"] == {"who": "polite"}
    assert runtime_workflows.calls["stubborn cancelled"] is True


async def test_the_original_payler_workflow_signature_gets_the_loop(tmp_path: Path) -> None:
    runtime = Runtime(load(tmp_path, "legacy", grace=0.1))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    async with asyncio.timeout(5):
        await runtime.started.wait()
    assert runtime_workflows.calls["legacy loop"] is asyncio.get_running_loop()
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_failing_to_reconnect_after_running_is_an_outage_not_a_startup_error(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    runtime = Runtime(load(tmp_path, "broker_restarting"), clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await asyncio.wait_for(runtime_workflows.third_run.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)  # no StartupError: it waited the outage out
    assert runtime.contexts[0].metrics.totals["restarts"] == 2


async def test_losing_the_broker_while_stopping_is_still_a_clean_stop(tmp_path: Path) -> None:
    runtime = Runtime(load(tmp_path, "loses_broker_while_stopping"))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await asyncio.wait_for(runtime.started.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)  # returns: no exception, the CLI exits 0


async def test_a_workflow_that_never_calls_ready_is_a_startup_error_after_the_time_limit(
    tmp_path: Path,
) -> None:
    loaded = load(tmp_path, "polite", "never_ready", extra="startup_timeout_seconds: 0.2\n")
    runtime = Runtime(loaded, clock=FakeClock())  # the limit is real time, not the runtime's
    started = asyncio.get_running_loop().time()
    with pytest.raises(StartupError) as caught:
        await asyncio.wait_for(runtime.run(asyncio.Event()), 5)
    assert asyncio.get_running_loop().time() - started >= 0.2
    assert "'never_ready' did not start within 0.2 s" in str(caught.value)
    assert "startup_timeout_seconds" in str(caught.value)
    assert "polite" not in str(caught.value)
    # Both were stopped the clean way.
    assert runtime_workflows.calls["polite options"] == {"who": "polite"}
    assert runtime_workflows.calls["never_ready stopped"] is True
    assert not runtime.started.is_set()


# The runtime's summary task sleeps on the runtime's clock too, and a fake clock's sleep moves
# time for everyone: a tiny interval keeps that to a millisecond per tick.
TICKS = "stats_interval_seconds: 0.001\n"


async def test_after_an_outage_a_workflow_is_back_within_one_capped_backoff(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    t0 = clock.now_ms()
    # A broker down for 60 s; later, after a healthy run, down for one second.
    runtime_workflows.outages[:] = [(t0 + 10_000, t0 + 70_000), (t0 + 200_000, t0 + 201_000)]
    runtime = Runtime(load(tmp_path, "outage", extra=TICKS), clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    await asyncio.wait_for(runtime_workflows.all_runs.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)

    log = runtime_workflows.outage_log
    runs = [ms for kind, ms in log if kind == "run"]
    assert len(runs) == 3
    # Back within one capped backoff (5 s, +20 % jitter) of the broker's return: never the 16 s
    # a message waited with the old backoff (30 s cap, reset after a minute).
    cap_ms = RESTART_BACKOFF.max_s * (1 + RESTART_BACKOFF.jitter) * 1000
    assert 0 <= runs[1] - (t0 + 70_000) <= cap_ms + 50
    # ...and the outage cost a bounded number of attempts, not a storm: 0.5, 1, 2, 4, 5, 5, ...
    attempts = [ms for kind, ms in log if kind == "fail" and t0 + 10_000 <= ms < runs[1]]
    assert 10 <= len(attempts) <= 20
    # The second failure follows a healthy run (130 s > HEALTHY_RUN_MS): the backoff starts over.
    second = [ms for kind, ms in log if kind == "fail" and ms >= t0 + 200_000]
    first_retry = second[1] - second[0]
    base_ms = RESTART_BACKOFF.base_s * (1 + RESTART_BACKOFF.jitter) * 1000
    assert first_retry <= base_ms + 50, log
    assert runtime.contexts[0].metrics.totals["restarts"] == len(log) - len(runs)  # one a failure
