"""PNG charts of a benchmark run (matplotlib): what the tables say, for those who would rather look.

- ``lateness-cdf.png``: the steady rows' lateness, one curve per row (each run of a repeated row),
  as a cumulative distribution: how many messages arrived within x ms of their due time.
- ``throughput.png``: in+out msg/s of each throughput row, the relay's rate (the ceiling, per
  event loop) drawn across.
- ``claim-latency.png``: ``claim_due`` latency (p50, p99) against the number of entries pending,
  from the pending mode.

``python benchmarks/charts.py benchmarks/results/<run>`` draws them again from a run's
``results.json``. matplotlib is in the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: Small files for the README: 100 dpi, a few inches wide.
DPI = 100


def draw(result: dict[str, Any], folder: Path) -> list[Path]:
    """Write the charts of ``result`` (a results.json's content) into ``folder``; their paths."""
    import matplotlib  # noqa: PLC0415  (an optional dependency: only charts need it)

    matplotlib.use("Agg")
    rows = result["rows"]
    written = []
    for name, chart in (
        ("lateness-cdf.png", _lateness_cdf),
        ("throughput.png", _throughput),
        ("claim-latency.png", _claim_latency),
    ):
        figure = chart(rows, result)
        if figure is not None:
            path = folder / name
            figure.savefig(path, dpi=DPI, bbox_inches="tight")
            written.append(path)
            import matplotlib.pyplot as plt  # noqa: PLC0415

            plt.close(figure)
    return written


def _subtitle(result: dict[str, Any]) -> str:
    machine = result.get("machine", {})
    return f"{result.get('started', '')}, {machine.get('cores', '?')} cores, payler " + str(
        machine.get("payler_commit", "?")
    )


def _lateness_cdf(rows: list[dict[str, Any]], result: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steady = [r for r in rows if r["mode"] == "steady" and r["extra"].get("lateness_ms_sorted")]
    if not steady:
        return None
    loops = sorted({r.get("loop", "") for r in steady}, key=lambda loop: loop != "uvloop")
    figure, panels = plt.subplots(
        1, len(loops), figsize=(5.5 * len(loops), 4), sharey=True, squeeze=False
    )
    colours = {"relay": "black", "sqlite": "tab:blue", "redis": "tab:red", "postgres": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for axes, loop in zip(panels[0], loops, strict=True):
        runs: dict[str, int] = {}
        for row in (r for r in steady if r.get("loop", "") == loop):
            values = row["extra"]["lateness_ms_sorted"]
            shares = [(i + 1) / len(values) for i in range(len(values))]
            run = runs[row["key"]] = runs.get(row["key"], -1) + 1
            label = row["title"].replace(f" · {loop}", "")
            axes.plot(
                [max(v, 0.1) for v in values], shares, styles[run % len(styles)], linewidth=1,
                color=colours.get(row["key"], "grey"), label=label, alpha=0.85,
            )  # fmt: skip
        axes.set_xscale("log")
        axes.set_xlabel("lateness, ms (log scale)")
        axes.set_title(loop or "—", fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=6, loc="upper left")
    panels[0][0].set_ylabel("share of messages")
    rate, _seconds, delay = result["settings"]["steady"]
    figure.suptitle(
        f"Steady {rate:,.0f} msg/s, x-delay {delay} ms: arrival − publish − delay "
        f"(relay: bare transit)\n{_subtitle(result)}",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def _throughput(rows: list[dict[str, Any]], result: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    bars = [
        r for r in rows if r["mode"] == "throughput" and r["status"] == "ok" and r.get("busy_s")
    ]
    if not bars:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    rates = [r["count"] / r["busy_s"] for r in bars]
    colours = ["grey" if r["key"] == "relay" else "tab:blue" for r in bars]
    axes.barh([r["title"] for r in bars], rates, color=colours)
    for index, value in enumerate(rates):
        axes.text(value, index, f" {value:,.0f}", va="center", fontsize=7)
    ceilings = {r.get("loop", ""): r["count"] / r["busy_s"] for r in bars if r["key"] == "relay"}
    for index, row in enumerate(bars):  # each bar against the relay on its own loop
        ceiling = ceilings.get(row.get("loop", ""))
        if ceiling is not None:
            span = [index - 0.45, index + 0.45]
            axes.plot([ceiling] * 2, span, color="black", linestyle=":", linewidth=1.2)
            axes.plot([0.9 * ceiling] * 2, span, color="tab:red", linestyle=":", linewidth=1.2)
    axes.invert_yaxis()
    axes.set_xlabel("in+out msg/s (dotted: the relay's rate on the same loop, and 90 % of it)")
    axes.set_title(f"Throughput, each message both ways\n{_subtitle(result)}", fontsize=9)
    axes.tick_params(axis="y", labelsize=7)
    return figure


def _claim_latency(rows: list[dict[str, Any]], result: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    levels = [r for r in rows if r["mode"] == "pending" and r["extra"].get("claim_ms")]
    if not levels:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5))
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in levels:
        by_key.setdefault(row["key"], []).append(row)
    for key, found in by_key.items():
        found.sort(key=lambda r: r["count"])
        counts = [r["count"] for r in found]
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            values = [r["extra"]["claim_ms"][stat] for r in found]
            axes.plot(counts, values, style, label=f"{key} {stat}")
    axes.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    axes.set_xticks(sorted({r["count"] for r in levels}))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_ylim(bottom=0)
    axes.set_xlabel("entries pending (log scale)")
    axes.set_ylabel("claim_due latency, ms")
    axes.set_title(f"Claim latency against the backlog\n{_subtitle(result)}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/charts.py benchmarks/results/<run>", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    result = json.loads((folder / "results.json").read_text())
    for path in draw(result, folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
