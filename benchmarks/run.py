"""payler's benchmark: payler against a bare aio-pika relay and the original Payler, side by side.

Each row runs the daemon under test as its own process, as users run it, on a RabbitMQ virtual
host of its own (deleted afterwards), and measures from outside: a publisher and a collector in
this process, numbered messages, arrival times. See benchmarks/README.md for what each figure
means. Quick check that it works (under a minute):

    python benchmarks/run.py --count 500 --rows relay,sqlite --modes throughput
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import rows as bench
from infra import rabbitmqctl, require_local
from rows import Row, Settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ROWS = ("relay", "sqlite", "redis", "postgres", "payler-0.2")
MODES = ("throughput", "steady", "pending")
LOOPS = ("uvloop", "asyncio")
DEFAULT_PENDING = 1_000_000
DEFAULT_VENV = HERE / ".venv-payler-0.2"

#: Load from outside the benchmark (% of one core) above which a row is noisy, and re-run.
NOISY_OTHERS_PCT = 25

#: The targets, printed next to the figures.
TARGET_RATIO = 0.90  # in+out (each message both ways), as a share of the relay's in the same run
TARGET_P99_OVER_RELAY_MS = 10.0  # steady lateness p99 ≤ the relay's transit p99 + this
TARGET_P50_OVER_RELAY_MS = 3.0  # steady lateness p50 ≤ the relay's transit p50 + this
TARGET_CPU_RATIO = 1.3  # daemon CPU per delivered message, against the relay's
TARGET_RSS_MB = 100.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=20_000, help="messages per throughput row")
    parser.add_argument("--size", type=int, default=512, help="body bytes per message")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated, among {', '.join(ROWS)}"
    )
    parser.add_argument(
        "--modes",
        default="throughput,steady",
        help=f"comma-separated, among {', '.join(MODES)} (--pending adds pending)",
    )
    parser.add_argument(
        "--due-after",
        type=float,
        default=None,
        help="seconds from the first publish to T, when every message is due "
        "(default: 5 s + count / 1,000 msg/s; for Payler 0.2.0 count / 100 msg/s)",
    )
    parser.add_argument(
        "--payler02-count",
        type=int,
        default=2_000,
        help="messages for the original Payler's row (SecantusDB slows down past ~10k writes)",
    )
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        help=f"event loops to run payler and the relay on, each a row variant, among "
        f"{', '.join(LOOPS)} (Payler 0.2.0 and the pending mode run once)",
    )
    parser.add_argument("--steady-rate", type=float, default=1_000.0, help="msg/s, steady mode")
    parser.add_argument("--steady-seconds", type=float, default=10.0, help="steady traffic, s")
    parser.add_argument(
        "--steady-delay-ms", type=int, default=2_000, help="x-delay of the steady messages"
    )
    parser.add_argument(
        "--steady-repeat",
        type=int,
        default=1,
        help="steady runs per row (each reported; the target is judged on their median p99)",
    )
    parser.add_argument(
        "--pending",
        type=int,
        default=None,
        help="also fill a Redis and a SQLite spool (those in --rows) with this many entries and "
        "measure claim latency and payler's RSS on it, against 10,000 "
        f"(mode pending; default {DEFAULT_PENDING:,})",
    )
    parser.add_argument("--pending-claims", type=int, default=200, help="claims timed per level")
    parser.add_argument("--pending-claim-size", type=int, default=100, help="entries per claim")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the SQLite throughput row (results/<run>/profile-*.txt); "
        "its figures are then slower than unprofiled ones",
    )
    parser.add_argument(
        "--transient",
        action="store_true",
        help="publish non-persistent messages (default: persistent, delivery mode 2)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="bound of every wait in a row, seconds"
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=2,
        help=f"re-run a throughput or steady row whose window saw more than {NOISY_OTHERS_PCT} %% "
        "of a core used by processes outside the benchmark; the least disturbed attempt is kept",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        help="RabbitMQ (rows get virtual hosts of their own); 127.0.0.1 only",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379"),
        help="Redis server (database 0, keys under a prefix of the run's own); 127.0.0.1 only",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL database (tables in a schema of the run's own, dropped afterwards); "
        "127.0.0.1 only",
    )
    parser.add_argument(
        "--payler02-venv", type=Path, default=DEFAULT_VENV, help="the original Payler's venv"
    )
    parser.add_argument(
        "--setup-payler02",
        action="store_true",
        help="create the original Payler's virtualenv (payler==0.2.0) and exit",
    )
    parser.add_argument(
        "--results", type=Path, default=HERE / "results", help="where runs write their files"
    )
    args = parser.parse_args(argv)
    args.rows = _choices(parser, "--rows", args.rows, ROWS)
    args.modes = _choices(parser, "--modes", args.modes, MODES)
    args.loops = _choices(parser, "--loops", args.loops, LOOPS)
    if args.pending is not None and "pending" not in args.modes:
        args.modes.append("pending")
    if args.pending is None:
        args.pending = DEFAULT_PENDING
    require_local(args.amqp_url)
    require_local(args.redis_url)
    require_local(args.postgres_url)
    if args.count <= 0 or args.payler02_count <= 0 or args.size < 16:
        parser.error("--count and --payler02-count must be positive, --size at least 16")
    return args


def outside_load(row: Row) -> int:
    """The most CPU that processes outside the benchmark used in any window of ``row``."""
    windows = [v for k, v in row.extra.items() if k.startswith("cpu") and v]
    return max((w.get("others", 0) for w in windows), default=0)


def _choices(
    parser: argparse.ArgumentParser, flag: str, text: str, known: tuple[str, ...]
) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(unknown)}; expected among {', '.join(known)}")
    return chosen


# -- the original Payler's virtualenv ----------------------------------------------------------


def setup_payler02(venv: Path) -> int:
    """Create ``venv`` with payler==0.2.0 in it; the exit status.

    Payler 0.2.0 declares Python 3.7–3.9 and pins PyYAML<6 and motor<3. PyYAML 5.4.1 has wheels
    up to 3.9 only (later Pythons build it from source, which needs Cython<3), and motor 2.x
    imports ``asyncio.coroutine``, gone in Python 3.11: so it *runs* on 3.10 at most. This
    takes a Python 3.9 (else 3.8, 3.10, 3.7) from PATH or pyenv; without one it installs into
    this Python with ``PIP_CONSTRAINT`` holding ``cython<3`` — which installs, but on 3.11+
    Payler 0.2.0 then fails at import (the benchmark row reports it).
    """
    python = _old_python()
    env = dict(os.environ)
    if python is None:
        python = sys.executable
        constraint = venv.parent / f"{venv.name}-constraints.txt"
        constraint.write_text("cython<3\n")
        env["PIP_CONSTRAINT"] = str(constraint)
        print(f"no Python 3.7–3.10 found: using {python} with PIP_CONSTRAINT=cython<3")
    print(f"creating {venv} with {python}")
    subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    return subprocess.run([*pip, "payler==0.2.0"], env=env, check=False).returncode


def _old_python() -> str | None:
    """A Python that Payler 0.2.0 runs on, from pyenv or PATH; 3.9 first (it declares 3.7–3.9)."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for version in ("3.9", "3.8", "3.10", "3.7"):
        candidates = [
            str(folder / "bin" / "python")
            for folder in sorted((pyenv_root / "versions").glob(f"{version}.*"), reverse=True)
        ]
        candidates.append(shutil.which(f"python{version}") or "")
        for candidate in filter(None, candidates):
            # A pyenv shim exists for every installed version but fails unless selected.
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                if subprocess.run([candidate, "-c", ""], timeout=30, check=False).returncode == 0:
                    return candidate
    return None


# -- running ---------------------------------------------------------------------------------


Step = tuple[str, Callable[[], Awaitable[Row | list[Row]]], str, str]


def plan(args: argparse.Namespace, base: Settings) -> list[Step]:
    """The rows to run, in order: (name, how to run it, a suffix for its title, its loop)."""
    steps: list[Step] = []
    for loop in args.loops if "throughput" in args.modes else ():
        settings = dataclasses.replace(base, loop=loop)
        if "relay" in args.rows:
            steps.append(
                ("relay throughput", functools.partial(bench.throughput_relay, settings), "", loop)
            )
        for key in ("sqlite", "redis", "postgres"):
            if key in args.rows:
                make = functools.partial(bench.throughput_payler, settings, key)
                steps.append((f"{key} throughput", make, "", loop))
    if "throughput" in args.modes and "payler-0.2" in args.rows:
        steps.append(("payler-0.2 throughput", lambda: bench.throughput_payler02(base), "", ""))
    if "steady" in args.modes:
        for number in range(1, args.steady_repeat + 1):
            suffix = f" (run {number}/{args.steady_repeat})" if args.steady_repeat > 1 else ""
            for loop in args.loops:
                settings = dataclasses.replace(base, loop=loop)
                if "relay" in args.rows:
                    make = functools.partial(bench.steady, settings, "relay")
                    steps.append(("relay steady", make, suffix, loop))
                for key in ("sqlite", "redis", "postgres"):
                    if key in args.rows:
                        make = functools.partial(bench.steady_payler, settings, key)
                        steps.append((f"{key} steady", make, suffix, loop))
    return steps + _pending_steps(args, base)


def _pending_steps(args: argparse.Namespace, base: Settings) -> list[Step]:
    """The backlog rows (mode pending): Redis and SQLite, those of ``--rows``, on one loop."""
    if "pending" not in args.modes:
        return []
    settings = dataclasses.replace(base, loop=args.loops[0])
    make = functools.partial(bench.pending_backlog, settings)
    return [
        (f"{key} pending", functools.partial(make, key), "", settings.loop)
        for key in ("redis", "sqlite")
        if key in args.rows
    ]


async def run(args: argparse.Namespace, results_dir: Path, work_dir: Path) -> dict[str, Any]:
    settings = Settings(
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        postgres_url=args.postgres_url,
        count=args.count,
        size=args.size,
        persistent=not args.transient,
        due_after_s=args.due_after,
        timeout_s=args.timeout,
        run_id=uuid.uuid4().hex[:8],
        results_dir=results_dir,
        work_dir=work_dir,
        payler02_count=args.payler02_count,
        payler02_venv=args.payler02_venv,
        steady_rate=args.steady_rate,
        steady_seconds=args.steady_seconds,
        steady_delay_ms=args.steady_delay_ms,
        pending=args.pending,
        pending_claims=args.pending_claims,
        pending_claim_size=args.pending_claim_size,
        profile=args.profile,
    )
    started = time.time()
    results: list[Row] = []
    for name, make, suffix, loop in plan(args, settings):
        retries = 0 if name.endswith("pending") else args.noisy_retries
        kept: list[Row] = []
        discarded: list[int] = []
        for attempt in range(1 + retries):
            on = f" on {loop}" if loop else ""
            print(f"[{time.time() - started:6.1f} s] {name}{on}{suffix} ...", flush=True)
            try:
                outcome = await make()
            except Exception as exc:  # one broken row must not lose the others' figures
                key, _, mode = name.partition(" ")
                outcome = Row(key, name, mode, 0).fail(f"{type(exc).__name__}: {exc}")
            rows = outcome if isinstance(outcome, list) else [outcome]
            for row in rows:
                print(f"         {_one_line(row)}", flush=True)
            noise = max(outside_load(r) for r in rows)
            if not kept or noise < max(outside_load(r) for r in kept):
                if kept:
                    discarded.append(max(outside_load(r) for r in kept))
                kept = rows
            else:
                discarded.append(noise)
            if noise <= NOISY_OTHERS_PCT or attempt == retries:
                break
            print(f"         other load {noise} % of a core: running it again", flush=True)
        for row in kept:
            row.loop = loop
            row.title += (f" · {loop}" if loop else "") + suffix
            if discarded:
                row.extra["discarded_noisy_attempts_others_pct"] = discarded
            results.append(row)
    return {
        "run_id": settings.run_id,
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": await _machine(args),
        "settings": {
            "count": args.count,
            "size": args.size,
            "persistent": not args.transient,
            "payler02_count": args.payler02_count,
            "steady": [args.steady_rate, args.steady_seconds, args.steady_delay_ms],
            "pending": args.pending if "pending" in args.modes else None,
            "loops": args.loops,
        },
        "rows": [vars(r) for r in results],
    }


async def _machine(args: argparse.Namespace) -> dict[str, Any]:
    def quiet(argv: list[str]) -> str:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=30, check=False, cwd=REPO
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = _cpu_model()
    try:
        rabbit = (await rabbitmqctl("version")).strip()
    except RuntimeError:
        rabbit = "?"
    commit = quiet(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(quiet(["git", "status", "--porcelain", "--", "payler"]))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "redis": quiet(["redis-server", "--version"]).split(" v=")[-1].split()[0:1],
        "postgres": quiet(["psql", "--version"]).rpartition(" ")[2],
        "payler_commit": f"{commit}{' + uncommitted changes in payler/' if dirty else ''}",
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor()


# -- reporting ---------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _lateness(lateness: dict[str, float] | None) -> str:
    if not lateness:
        return "—"
    return " / ".join(_num(lateness[k]) for k in ("p50", "p95", "p99", "max"))


def _one_line(row: Row) -> str:
    parts = [f"{row.status}", f"N={row.count}"]
    if row.ingest_rate is not None:
        parts.append(f"ingest={row.ingest_rate:,.0f}/s")
    if row.reinject_rate is not None:
        parts.append(f"reinject={row.reinject_rate:,.0f}/s")
    if row.lateness:
        parts.append(f"lateness p50/p95/p99/max={_lateness(row.lateness)} ms")
    if row.lost is not None:
        parts.append(f"lost={row.lost} dup={row.duplicated}")
    if row.rss_mb is not None:
        parts.append(f"rss={row.rss_mb:.0f} MB")
    if row.note:
        parts.append(f"({row.note})")
    return " ".join(parts)


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def report(result: dict[str, Any]) -> str:
    """The results as Markdown tables (what README.md's Benchmarks section shows)."""
    rows = [Row(**r) for r in result["rows"]]
    relays = {
        r.loop: r for r in rows if r.key == "relay" and r.mode == "throughput" and r.status == "ok"
    }
    first_relay = next(iter(relays.values()), None)
    machine = result["machine"]
    out = [
        f"Run `{result['command']}` — {result['started']}, {result['duration_s']} s; "
        f"{machine['cores']} cores ({machine['cpu']}), Python {machine['python']}, "
        f"RabbitMQ {machine['rabbitmq']}, payler {machine['payler_commit']}.",
        "",
    ]
    throughput = [r for r in rows if r.mode == "throughput"]
    if throughput:
        out += [
            f"Throughput: {result['settings']['size']}-byte bodies, persistent="
            f"{result['settings']['persistent']}; all messages due at one instant T.",
            "",
            "| row | N | ingest msg/s (share of relay) | re-injection msg/s (share of relay) "
            "| busy s | in+out msg/s (share of relay) | lost | dup "
            "| lateness after T p50/p95/p99/max ms | daemon CPU µs/msg | peak RSS MB | note |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for r in throughput:
            relay = relays.get(r.loop, first_relay)
            passing = r.count / r.busy_s if r.busy_s else None
            relay_passing = relay.count / relay.busy_s if relay and relay.busy_s else None
            share = f" ({100 * passing / relay_passing:.0f} %)" if passing and relay_passing else ""
            out.append(
                f"| {r.title} | {r.count:,} | {_with_share(r.ingest_rate, relay, 'ingest_rate')} "
                f"| {_with_share(r.reinject_rate, relay, 'reinject_rate')} | {_num(r.busy_s, 1)} "
                f"| {_num(passing)}{share} "
                f"| {_num(r.lost)} | {_num(r.duplicated)} | {_lateness(r.lateness)} "
                f"| {_num(cpu_us_per_msg(r))} | {_num(r.rss_mb)} | {_note(r)} |"
            )
        out.append("")
    steady = [r for r in rows if r.mode == "steady"]
    if steady:
        rate_, seconds, delay = result["settings"]["steady"]
        out += [
            f"Steady rate: {rate_:,.0f} msg/s for {seconds:g} s, x-delay {delay} ms; lateness = "
            "arrival − (publish + delay), both broker hops included (relay: delay 0, so bare "
            "transit).",
            "",
            "| row | messages | lateness p50/p95/p99/max ms | payler's own claim "
            "lateness p50/p95/p99/max ms | lost | dup | daemon CPU µs/msg | peak RSS MB | note |",
            "|---|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for r in steady:
            out.append(
                f"| {r.title} | {r.count:,} | {_lateness(r.lateness)} "
                f"| {_lateness(r.extra.get('payler_own_lateness'))} | {_num(r.lost)} "
                f"| {_num(r.duplicated)} | {_num(cpu_us_per_msg(r))} | {_num(r.rss_mb)} "
                f"| {_note(r)} |"
            )
        out.append("")
    pending = [r for r in rows if r.mode == "pending"]
    if pending:
        out += [
            "Backlog (entries due a day ahead, stored through payler's storage API; "
            "claims of due entries on top of it; bytes: Redis memory, or the SQLite files):",
            "",
            "| spool | pending | store µs/entry | bytes/entry | claim_due ms p50/p99 "
            "| claim µs/entry (p50) | ack ms p50/p99 | payler peak RSS MB | steady lateness "
            "p50/p95/p99/max ms | note |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for r in pending:
            claim, ack = r.extra.get("claim_ms") or {}, r.extra.get("ack_ms") or {}
            out.append(
                f"| {r.key} | {r.count:,} | {_num(r.extra.get('store_us_per_entry'), 1)} "
                f"| {_num(r.extra.get('bytes_per_entry'))} "
                f"| {_num(claim.get('p50'), 2)} / {_num(claim.get('p99'), 2)} "
                f"| {_num(r.extra.get('claim_us_per_entry_p50'), 1)} "
                f"| {_num(ack.get('p50'), 2)} / {_num(ack.get('p99'), 2)} | {_num(r.rss_mb)} "
                f"| {_lateness(r.lateness)} | {_note(r)} |"
            )
        out.append("")
    out += _targets(rows)
    return "\n".join(out)


def _with_share(value: float | None, relay: Row | None, attr: str) -> str:
    if value is None:
        return "—"
    base = getattr(relay, attr) if relay else None
    if not base:
        return _num(value)
    return f"{_num(value)} ({100 * value / base:.0f} %)"


def _note(row: Row) -> str:
    parts = [row.status] if row.status != "ok" else []
    if outside_load(row) > NOISY_OTHERS_PCT:
        parts.append(f"noisy: other load on the machine {outside_load(row)} % of a core")
    if row.extra.get("discarded_noisy_attempts_others_pct"):
        count = len(row.extra["discarded_noisy_attempts_others_pct"])
        parts.append(f"{count} noisier attempt(s) discarded")
    if row.note:
        parts.append(row.note.replace("|", "\\|").replace("\n", " ")[:300])
    return "; ".join(parts)


def cpu_us_per_msg(row: Row) -> float | None:
    """The daemon's CPU time per message over the row's measured windows, µs."""
    windows = [row.extra.get(k) for k in ("cpu", "cpu_ingest", "cpu_reinject")]
    seconds = sum(w["daemon"] / 100 * w["window_s"] for w in windows if w and "daemon" in w)
    return 1e6 * seconds / row.count if seconds and row.count else None


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else None  # the lower median


def _steady_median(rows: list[Row], key: str, loop: str, stat: str) -> float | None:
    return _median(
        [r.lateness[stat] for r in rows if (r.key, r.loop, r.mode) == (key, loop, "steady")
         and r.lateness and r.status == "ok"]
    )  # fmt: skip


def _cpu_median(rows: list[Row], key: str, loop: str, mode: str) -> float | None:
    found = [cpu_us_per_msg(r) for r in rows if (r.key, r.loop, r.mode) == (key, loop, mode)]
    return _median([v for v in found if v is not None])


def _ratio(mine: float | None, theirs: float | None) -> str:
    return f" ({mine / theirs:.2f}×)" if mine and theirs else ""


def _targets(rows: list[Row]) -> list[str]:
    """Issue 10's targets, each payler row against the relay on the same loop in this run."""
    out = [
        "Targets of issue 10 (each against the relay on the same event loop; steady figures "
        f"are medians of the runs): in+out ≥ {TARGET_RATIO:.0%} of the relay's; steady "
        f"lateness p99 ≤ relay p99 + {TARGET_P99_OVER_RELAY_MS:g} ms and p50 ≤ relay p50 + "
        f"{TARGET_P50_OVER_RELAY_MS:g} ms; daemon CPU per message ≤ {TARGET_CPU_RATIO:g} × "
        f"the relay's (throughput / steady); peak RSS < {TARGET_RSS_MB:g} MB.",
        "",
        "| row | in+out ≥ 90 % | steady p99 ≤ relay + 10 ms | steady p50 ≤ relay + 3 ms "
        "| CPU/msg ≤ 1.3 × relay (throughput) | CPU/msg ≤ 1.3 × relay (steady) | RSS < 100 MB |",
        "|---|---|---|---|---|---|---|",
    ]
    pairs = sorted(
        {(r.key, r.loop) for r in rows if r.key != "relay" and r.mode != "pending"},
        key=lambda kl: (ROWS.index(kl[0]), kl[1]),
    )
    for key, loop in pairs:
        mine = [r for r in rows if (r.key, r.loop) == (key, loop) and r.mode != "pending"]
        tp = next((r for r in mine if r.mode == "throughput"), None)
        relay = next(
            (r for r in rows if (r.key, r.loop, r.mode, r.status) ==
             ("relay", loop, "throughput", "ok")), None,
        )  # fmt: skip
        cells = []
        if tp and tp.busy_s and relay and relay.busy_s:
            share = (tp.count / tp.busy_s) / (relay.count / relay.busy_s)
            cells.append(f"{_verdict(share >= TARGET_RATIO)} ({share:.0%})")
        else:
            cells.append("—")
        for stat, margin in (("p99", TARGET_P99_OVER_RELAY_MS), ("p50", TARGET_P50_OVER_RELAY_MS)):
            value = _steady_median(rows, key, loop, stat)
            floor = _steady_median(rows, "relay", loop, stat)
            if value is None or floor is None:
                cells.append("—")
            else:
                verdict = _verdict(value <= floor + margin)
                cells.append(f"{verdict} ({value:.0f} vs {floor:.0f} + {margin:g} ms)")
        for mode in ("throughput", "steady"):
            value = _cpu_median(rows, key, loop, mode)
            floor = _cpu_median(rows, "relay", loop, mode)
            if value is None or floor is None:
                cells.append("—")
            else:
                verdict = _verdict(value <= TARGET_CPU_RATIO * floor)
                cells.append(f"{verdict} ({value:,.0f} vs {floor:,.0f} µs{_ratio(value, floor)})")
        peaks = [r.rss_mb for r in mine if r.rss_mb is not None]
        cells.append(_verdict(max(peaks) < TARGET_RSS_MB) if peaks else "—")
        title = (tp or mine[0]).title.split(" (run")[0]
        out.append(f"| {title} | {' | '.join(cells)} |")
    for r in rows:
        if r.mode == "pending" and r.rss_mb is not None:
            verdict = _verdict(r.rss_mb < TARGET_RSS_MB)
            out.append(f"| payler on a {r.title} | — | — | — | — | — | {verdict} |")
    return out if len(out) > 4 else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup_payler02:
        return setup_payler02(args.payler02_venv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = args.results / stamp
    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="payler-bench-") as work:
        result = asyncio.run(run(args, results_dir, Path(work)))
    (results_dir / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    markdown = report(result)
    (results_dir / "results.md").write_text(markdown + "\n")
    try:
        import charts  # noqa: PLC0415  (matplotlib: the bench extra)

        for path in charts.draw(result, results_dir):
            print(f"chart: {path}")
    except ImportError as exc:
        print(f"no charts ({exc}): pip install -e '.[bench]'")
    print()
    print(markdown)
    print(f"\nfiles: {results_dir}")
    failed = any(r["status"] == "failed" for r in result["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
