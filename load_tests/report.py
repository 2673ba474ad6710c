"""Plot a Locust run of load_tests/locustfile.py: latency, requests/s and tokens/s over time, one PNG.

    .venv/bin/python load_tests/report.py .cache/load/load_stats_history.csv [--out report.png]

Reads the `<prefix>_stats_history.csv` Locust writes with `--csv <prefix> --csv-full-history`
(one row per request name per second) and draws four panels against seconds since the start:
  time to first token  p50 and p95 of "GenerateStream ttft", ms
  end to end           p50 and p95 of "GenerateStream e2e", ms
  requests/s           calls completed and failed, from the e2e entry's running counts
  tokens/s             tokens streamed back: the e2e entry's running count x average size
The percentiles are Locust's own moving ones (over its last ~10 s); the rates are taken over the
same window, from the running totals, so tokens/s = completed calls/s x tokens per call exactly.
The PNG goes next to the CSV unless --out says where.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROG = "load_tests/report.py"
TTFT = "GenerateStream ttft"
E2E = "GenerateStream e2e"
WINDOW_S = 10  # Locust's window for its current percentiles and requests/s
COLUMNS = ("Timestamp", "Name", "50%", "95%", "Total Request Count", "Total Failure Count", "Total Average Content Size")


@dataclass
class Series:
    """One request name on the run's timeline (a point per second of the CSV)."""

    p50: list[float] = field(default_factory=list)  # ms; nan where Locust had none yet
    p95: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)  # cumulative, failures included
    failures: list[float] = field(default_factory=list)  # cumulative
    sizes: list[float] = field(default_factory=list)  # cumulative response lengths: tokens, for e2e


def number(text: str) -> float:
    """Locust writes N/A before a name's first request."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def latency(text: str) -> float:
    """A percentile in ms; Locust writes 0 while its window holds no call yet, and no call takes 0 ms."""
    value = number(text)
    return math.nan if value == 0 else value


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: not a Locust stats history, no column {missing[0]!r} "
                             "(locust --csv PREFIX --csv-full-history writes one)")  # fmt: skip
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows yet (did the run last a few seconds?)")
    return rows


def timeline(rows: list[dict[str, str]]) -> list[int]:
    """Every second the CSV has a row for, from 0. A name's rows start with its first request, so
    the names are put on this common timeline (their counts 0 before that)."""
    return sorted({int(r["Timestamp"]) for r in rows})


def series(rows: list[dict[str, str]], seconds: list[int], name: str) -> Series:
    by_second = {int(r["Timestamp"]): r for r in rows if r["Name"] == name}  # the last row of a second wins
    s, calls, failures, size = Series(), 0.0, 0.0, 0.0
    for t in seconds:
        row = by_second.get(t)
        if row is not None:
            calls, failures = float(row["Total Request Count"]), float(row["Total Failure Count"])
            size = calls * number(row["Total Average Content Size"]) if calls else 0.0
        s.p50.append(latency(row["50%"]) if row else math.nan)
        s.p95.append(latency(row["95%"]) if row else math.nan)
        s.calls.append(calls)
        s.failures.append(failures)
        s.sizes.append(size)
    return s


def per_second(seconds: list[int], cumulative: list[float]) -> list[float]:
    """A cumulative count's rate over the last WINDOW_S seconds (less at the start)."""
    rates = []
    for i, t in enumerate(seconds):
        j = bisect.bisect_left(seconds, t - WINDOW_S)
        rates.append((cumulative[i] - cumulative[j]) / (t - seconds[j]) if t > seconds[j] else math.nan)
    return rates


def plot(seconds: list[int], ttft: Series, e2e: Series, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    x = [t - seconds[0] for t in seconds]
    completed = [n - f for n, f in zip(e2e.calls, e2e.failures)]
    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    for ax, s, what in ((axes[0], ttft, "time to first token"), (axes[1], e2e, "end to end")):
        ax.plot(x, s.p50, label="p50")
        ax.plot(x, s.p95, label="p95")
        ax.set_ylabel("ms")
        ax.set_title(what)
        ax.legend(loc="upper left")
    axes[2].plot(x, per_second(seconds, completed), label="completed")
    axes[2].plot(x, per_second(seconds, e2e.failures), label="failed", color="tab:red")
    axes[2].set_ylabel("calls/s")
    axes[2].set_title("requests/s")
    axes[2].legend(loc="upper left")
    axes[3].plot(x, per_second(seconds, e2e.sizes), color="tab:green")
    axes[3].set_ylabel("tokens/s")
    axes[3].set_title("tokens/s (generated and streamed back)")
    axes[3].set_xlabel("seconds since the start")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def default_out(history: Path) -> Path:
    """`<prefix>_stats_history.csv` -> `<prefix>_report.png`."""
    return history.with_name(history.name.removesuffix("_stats_history.csv").removesuffix(".csv") + "_report.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("history", type=Path, help="Locust's <prefix>_stats_history.csv (from --csv PREFIX --csv-full-history)")
    p.add_argument("--out", type=Path, help="the PNG (default: <prefix>_report.png next to the CSV)")
    p.add_argument("--title", default="flora-gateway load test: GenerateStream", help="the figure's title")
    args = p.parse_args(argv)
    out = args.out or default_out(args.history)
    try:
        rows = read_rows(args.history)
        missing = [name for name in (TTFT, E2E) if name not in {r["Name"] for r in rows}]
        if missing:
            raise ValueError(f"{args.history}: no rows for {', '.join(missing)} (was it written by load_tests/locustfile.py "
                             "with --csv-full-history?)")  # fmt: skip
        seconds = timeline(rows)
        plot(seconds, series(rows, seconds, TTFT), series(rows, seconds, E2E), out, args.title)
    except (OSError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
