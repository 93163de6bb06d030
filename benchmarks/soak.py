"""The fault suite as a soak run: every scenario of ``tests/faults``, then their table.

    python benchmarks/soak.py           # the bounded size CI runs (a few minutes)
    python benchmarks/soak.py --full    # the full size: 20 kill -9 cycles, 20 s outages,
                                        # >= 10,000 fuzzed messages (about 15 minutes)

The scenarios are the tests themselves (run by pytest, so they are written once): each test
appends its row to a file (``--faults-table``), and this prints them as the table in the
README's "Reliability" section: scenario | sent | delivered | dead-lettered | left in source /
spool | lost | duplicated | daemon state. Scenarios that show a known defect are marked xfail
in the tests; their rows are printed all the same. Extra arguments go to pytest
(``-k kill`` to run some scenarios only). The exit status is pytest's.

It needs what the tests need: RabbitMQ and Redis on 127.0.0.1, ``rabbitmq-server`` and
``redis-server`` installed (the suite starts servers of its own on free ports), root for
``chattr`` (the read-only spool scenario).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults.harness import Row, table  # noqa: E402 - after the path is set


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full size (--full-faults)")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        command = [sys.executable, "-m", "pytest", "tests/faults", "-p", "no:cacheprovider"]
        command += ["-q", "-rxX", f"--faults-table={rows_path}", *pytest_args]
        if args.full:
            command.append("--full-faults")
        started = time.monotonic()
        code = subprocess.call(command, cwd=ROOT)
        elapsed = time.monotonic() - started
        lines = rows_path.read_text().splitlines() if rows_path.exists() else []
    rows = [Row(**json.loads(line)) for line in lines]
    size = "full" if args.full else "bounded"
    text = [f"Fault suite, {size} size: {len(rows)} scenarios in {elapsed:.0f} s", ""]
    text += [table(rows), ""]
    text += [f"- {row.scenario}: {row.notes}" for row in rows if row.notes]
    print("\n".join(text))
    if args.out:
        args.out.write_text("\n".join(text) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
