"""The benchmark harness does not rot: a tiny run of ``benchmarks/run.py``, every row that can
run here, as CI runs it.

Nothing is timed: the benchmark judges speed, this only checks that each row still completes
(nothing lost, nothing duplicated) and that the results files are written. A few hundred
messages, a half-second steady window and a short wait for T keep it under about a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "run.py"
PAYLER02_VENV = REPO / "benchmarks" / ".venv-payler-0.2"
#: Every row but the original Payler's (see test_payler02_row).
ROWS = ("relay", "sqlite", "redis", "postgres")
#: The bound of the whole tiny run (the harness bounds each of its waits with --timeout too).
RUN_TIMEOUT_S = 300


def tiny_run(tmp_path: Path, rows: tuple[str, ...], *extra: str) -> dict[str, Any]:
    """Run the harness on ``rows`` at a tiny size; its results.json (its exit status checked)."""
    results = tmp_path / "results"
    argv = [sys.executable, str(RUN), "--rows", ",".join(rows), "--modes", "throughput,steady"]
    argv += ["--count", "300", "--due-after", "1", "--steady-rate", "100"]
    argv += ["--steady-seconds", "0.5", "--steady-delay-ms", "200", "--noisy-retries", "0"]
    argv += ["--timeout", "60", "--loops", "uvloop", "--results", str(results), *extra]
    done = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    (run_dir,) = results.iterdir()
    assert (run_dir / "results.md").read_text().strip(), output
    result: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    result["run_dir"] = run_dir
    return result


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
def test_every_row_completes_without_loss(tmp_path: Path) -> None:
    result = tiny_run(tmp_path, ROWS)

    rows = result["rows"]
    ran = {(r["key"], r["mode"]) for r in rows}
    assert ran == {(key, mode) for key in ROWS for mode in ("throughput", "steady")}
    for row in rows:
        where = f"{row['title']} ({row['mode']}): {row['note']}"
        assert row["status"] == "ok", where
        assert row["lost"] == 0, where
        assert row["duplicated"] == 0, where
        assert row["count"] > 0, where
    # Every payler row left its queues and spool empty.
    for row in rows:
        for queue, (ready, unacked) in row["extra"].get("queues_after", {}).items():
            assert (ready, unacked) == (0, 0), f"{row['title']}: {queue} holds messages"
        if row["key"] != "relay" and row["mode"] == "throughput":
            assert row["extra"]["pending_after"] == 0, row["title"]
    # Each daemon ran on the loop asked for (payler says so at start, the relay too).
    logs = {p.name: p.read_text() for p in result["run_dir"].glob("*.log")}
    assert "relay on uvloop" in logs["relay-throughput.log"]
    assert "event loop: uvloop" in logs["sqlite-throughput.log"]
    assert "Targets of issue 10" in (result["run_dir"] / "results.md").read_text()
    for chart in ("lateness-cdf.png", "throughput.png"):  # PNG files, as matplotlib wrote them
        assert (result["run_dir"] / chart).read_bytes().startswith(b"\x89PNG"), chart


@pytest.mark.rabbitmq
@pytest.mark.skipif(
    not (PAYLER02_VENV / "bin" / "payler").exists(),
    reason="the original Payler 0.2.0's row needs a Python 3.9 virtualenv "
    f"({PAYLER02_VENV.relative_to(REPO)}, made by `benchmarks/run.py --setup-payler02`); "
    "CI has none (its code is not payler's, and it polls every 30 s)",
)
def test_payler02_row(tmp_path: Path) -> None:
    result = tiny_run(tmp_path, ("payler-0.2",), "--payler02-count", "100", "--modes", "throughput")

    (row,) = result["rows"]
    assert (row["status"], row["lost"], row["duplicated"]) == ("ok", 0, 0), row["note"]
