"""The load soak: the `make run` stack under Locust at a fixed rate for minutes, memory watched.

    flora-gateway bench soak [--duration-s 600] [--rate 8] [--tenants 16] [--users 32] [--warmup-s 60]
                             [--name load-soak] [--out benchmarks/results] [-- locust scenario flags]

1. starts `flora-gateway serve --quantization int8` (the serving format) on its default ports
   and waits for its `ready:` line;
2. provisions the load tenants (load_tests/tenants.py: FLoRA, LoRA and IA3 at several ranks);
3. warms up: Locust at the same rate for --warmup-s (cold adapters, allocator and caches fill);
4. reads the memory of the gateway's process tree (router + redis + Ray + worker: the serve
   process and every descendant), runs Locust for --duration-s with its CSV, full history and
   HTML report, sampling that memory every 10 s, and reads it again at the end;
5. plots latency, requests/s and tokens/s over time (load_tests/report.py) and writes
   <name>.md / <name>.json: achieved rate, failures, time to first token and end-to-end
   p50/p95/p99, tokens/s, memory at the start and the end.

Extra arguments after `--` go to the locustfile (e.g. `-- --max-new-tokens 48`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MiB = 1024 * 1024
TTFT, E2E = "GenerateStream ttft", "GenerateStream e2e"
MEMORY_EVERY_S = 10


@dataclass(frozen=True)
class Entry:
    """One of Locust's request entries over the whole run (its `<prefix>_stats.csv` row)."""

    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    average_size: float  # e2e: tokens per call


@dataclass(frozen=True)
class Result:
    cpu: str
    command: str
    duration_s: float
    target_rate: float
    achieved_rate: float  # completed calls per second
    ttft: Entry
    e2e: Entry
    tokens_per_s: float
    memory_start_mib: float
    memory_end_mib: float
    memory_growth: float  # end / start - 1
    memory_by_process_end_mib: dict[str, float]
    users: int
    tenants: int
    warmup_s: float
    locust_args: list[str]


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    bf16 = "with" if "avx512_bf16" in info else "without"
    return f"{model}, {os.cpu_count()} cores, {bf16} AVX512-BF16"


def start_gateway(log_path: Path) -> subprocess.Popen:
    """`flora-gateway serve --quantization int8`, in its own process group; returns once it is ready."""
    log = open(log_path, "w")
    serve = subprocess.Popen([str(BIN / "flora-gateway"), "serve", "--quantization", "int8"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=log, text=True, start_new_session=True)  # fmt: skip
    for line in serve.stdout:
        log.write(line)
        log.flush()
        if line.startswith("ready:"):
            threading.Thread(target=lambda: [log.write(rest) for rest in serve.stdout], daemon=True).start()
            return serve
    raise SystemExit(f"flora-gateway serve ended before it was ready (exit {serve.wait()}); its output: {log_path}")


def stop_gateway(serve: subprocess.Popen) -> None:
    os.killpg(serve.pid, signal.SIGINT)  # as Ctrl-C: it stops everything it started
    try:
        serve.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(serve.pid, signal.SIGKILL)


def tree_memory(root: int) -> dict[str, float]:
    """Resident MiB of the process and all its descendants, by process name (summed)."""
    by_name: dict[str, float] = {}
    parent = psutil.Process(root)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            name, rss = process.name(), process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        by_name[name] = by_name.get(name, 0.0) + rss / MiB
    return by_name


def locust(prefix: Path | None, seconds: float, args: argparse.Namespace) -> None:
    """One headless Locust run (`prefix` None: a warm-up, nothing kept)."""
    report = [] if prefix is None else ["--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html"]
    argv = [str(BIN / "locust"), "-f", str(REPO / "load_tests" / "locustfile.py"), "--headless", "--users", str(args.users),
            "--spawn-rate", str(args.rate), "--run-time", f"{int(seconds)}s", "--stop-timeout", "60", "--rate", str(args.rate),
            "--only-summary",
            *report, *args.locust_args]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: some requests failed (reported below); anything else: Locust itself failed
        raise SystemExit(f"locust exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")


def read_entry(stats_csv: Path, name: str) -> Entry:
    row = next(r for r in csv.DictReader(stats_csv.open()) if r["Name"] == name)
    return Entry(int(row["Request Count"]), int(row["Failure Count"]), float(row["50%"]), float(row["95%"]), float(row["99%"]),
                 float(row["Average Content Size"]))  # fmt: skip


def markdown(r: Result, name: str) -> str:
    def row(label: str, e: Entry) -> str:
        return f"| {label} | {e.requests} | {e.failures} | {e.p50_ms:.0f} | {e.p95_ms:.0f} | {e.p99_ms:.0f} |"

    processes = ", ".join(f"{n}: {mib:.0f}" for n, mib in sorted(r.memory_by_process_end_mib.items(), key=lambda kv: -kv[1]))
    return "\n".join([
        f"# Load soak: {r.target_rate:g} req/s for {r.duration_s / 60:.0f} minutes — {r.cpu}",
        "",
        f"Command: `{r.command}`",
        "",
        "The `make run` stack (`flora-gateway serve --quantization int8`: SmolLM2-135M int8, one replica with 2 threads) under",
        f"load_tests/locustfile.py ({r.users} users, each paced at rate/users): GenerateStream calls at a fixed total rate, tenants",
        f"drawn Zipf-like (s = 1.1) from {r.tenants} load tenants (FLoRA, LoRA and IA3 at ranks 1-16), code prompts, greedy;",
        f"the locustfile's flags: `{' '.join(r.locust_args) or '(defaults: whole prompts of 76-159 tokens, at most 32 new tokens)'}`.",
        f"Memory is read after a {r.warmup_s:.0f} s warm-up at the same rate, and at the end.",
        f"Locust's CSV, full history and HTML report: `{name}_*.csv`, `{name}.html`; over time: `{name}.png`.",
        "",
        f"- achieved rate: **{r.achieved_rate:.2f} req/s** (target {r.target_rate:g}), failures: **{r.e2e.failures}**",
        f"- tokens/s generated: **{r.tokens_per_s:.1f}** ({r.e2e.average_size:.1f} tokens per call)",
        f"- memory of the gateway's process tree: **{r.memory_start_mib:.0f} MiB** at the start, **{r.memory_end_mib:.0f} MiB**"
        f" at the end: **{100 * r.memory_growth:+.1f} %**",
        "",
        "| entry | calls | failures | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|",
        row("time to first token", r.ttft),
        row("end to end", r.e2e),
        "",
        f"Resident memory at the end, by process (MiB): {processes}.",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flora-gateway bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=600)
    p.add_argument("--warmup-s", type=float, default=60)
    p.add_argument("--rate", type=float, default=8.0)
    p.add_argument("--users", type=int, default=64, help="enough that a slow call never holds the rate back (each paces rate/users)")
    p.add_argument("--tenants", type=int, default=16)
    p.add_argument("--name", default="load-soak")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("locust_args", nargs="*", help="after --: the locustfile's own flags")
    args = p.parse_args(argv)
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / args.name

    serve = start_gateway(Path(tempfile.gettempdir()) / f"flora-soak-{args.name}-serve.log")  # its keys stay out of the results
    try:
        subprocess.run([sys.executable, str(REPO / "load_tests" / "tenants.py"), "--count", str(args.tenants)], cwd=REPO, check=True)
        print(f"warm-up: {args.warmup_s:.0f} s at {args.rate:g} req/s", flush=True)
        locust(None, args.warmup_s, args)
        start = tree_memory(serve.pid)
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.wait(MEMORY_EVERY_S):
                samples.append((time.monotonic() - t0, sum(tree_memory(serve.pid).values())))

        threading.Thread(target=sample, daemon=True).start()
        print(f"soak: {args.duration_s:.0f} s at {args.rate:g} req/s", flush=True)
        locust(prefix, args.duration_s, args)
        stop.set()
        end = tree_memory(serve.pid)
    finally:
        stop_gateway(serve)

    subprocess.run([sys.executable, str(REPO / "load_tests" / "report.py"), f"{prefix}_stats_history.csv", "--out", f"{prefix}.png"],
                   cwd=REPO, check=True)  # fmt: skip
    ttft, e2e = read_entry(Path(f"{prefix}_stats.csv"), TTFT), read_entry(Path(f"{prefix}_stats.csv"), E2E)
    start_mib, end_mib = sum(start.values()), sum(end.values())
    command = "flora-gateway bench soak " + " ".join(argv if argv is not None else sys.argv[1:])
    result = Result(cpu_name(), command.strip(), args.duration_s, args.rate, (e2e.requests - e2e.failures) / args.duration_s, ttft, e2e,
                    e2e.average_size * (e2e.requests - e2e.failures) / args.duration_s, start_mib, end_mib, end_mib / start_mib - 1,
                    {k: round(v, 1) for k, v in end.items()}, args.users, args.tenants, args.warmup_s, args.locust_args)  # fmt: skip
    (out / f"{args.name}.json").write_text(json.dumps({**asdict(result), "memory_samples_mib": samples}, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result, args.name))
    print(markdown(result, args.name))
    return 0 if e2e.failures == 0 else 1
