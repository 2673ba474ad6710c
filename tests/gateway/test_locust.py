"""load_tests/ against the real gateway: tenants provisioned by load_tests/tenants.py (a FLoRA, a
LoRA and an IA3 adapter), Locust run as a user runs it (its own process, headless) at a fixed
rate for a few seconds, then its CSV read back: every call succeeded, about rate x duration
calls were made for both entries, the tokens reached the engine, and report.py plots the run.

Here at 2 calls/s from 2 users on the tests' tiny model (256 positions, about one token per
character of code): short prompts (--max-prompt-chars) and exactly --max-new-tokens tokens
(--ignore-eos), so the tokens Locust counts can be checked against the engine's.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.tenants import provision
from tests.gateway.helpers import Stack

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RATE, USERS, RUN_S, MAX_NEW_TOKENS = 2.0, 2, 15, 16
TTFT, E2E = "GenerateStream ttft", "GenerateStream e2e"


def run_locust(tenants_file: Path, prefix: Path) -> subprocess.CompletedProcess:
    command = [str(BIN / "locust"), "-f", "load_tests/locustfile.py", "--headless", "--users", str(USERS),
               "--spawn-rate", str(USERS), "--run-time", f"{RUN_S}s", "--stop-timeout", "10", "--only-summary",
               "--rate", str(RATE), "--tenants-file", str(tenants_file), "--max-new-tokens", str(MAX_NEW_TOKENS),
               "--ignore-eos", "--max-prompt-chars", "100",
               "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html"]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_S + 45)


def final_stats(prefix: Path) -> dict[str, dict[str, str]]:
    """Locust's `<prefix>_stats.csv`: one row of totals per request name."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_locust_at_a_fixed_rate_reaches_the_engine_without_failures(stack: Stack, tmp_path: Path):
    tenants_file = tmp_path / "tenants.json"
    keys = provision(stack.store, stack.model_dir, 3, max(stack.worker.ranks), tenants_file, stack.router.address)
    assert [k.describe.split()[0] for k in keys] == ["flora", "lora", "ia3"]
    before = stack.replica_stats().steps

    prefix = tmp_path / "load"
    done = run_locust(tenants_file, prefix)
    assert done.returncode == 0, done.stderr[-3000:]

    after = stack.replica_stats().steps
    stats = final_stats(prefix)
    ttft, e2e = stats[TTFT], stats[E2E]
    calls = int(e2e["Request Count"])
    expected = RATE * RUN_S
    assert 0.7 * expected <= calls <= expected + USERS, f"{calls} calls in {RUN_S} s at {RATE}/s"
    assert int(ttft["Request Count"]) == calls
    assert int(ttft["Failure Count"]) == int(e2e["Failure Count"]) == 0
    assert float(e2e["Average Content Size"]) == MAX_NEW_TOKENS  # the e2e entry's size is the tokens streamed back
    assert float(ttft["Median Response Time"]) <= float(e2e["Median Response Time"])
    assert after.steps > before.steps
    assert after.generated_tokens - before.generated_tokens >= calls * MAX_NEW_TOKENS
    assert "locust" not in sys.modules  # the gateway's process never imports it
    assert Path(f"{prefix}.html").stat().st_size > 0

    report = subprocess.run([sys.executable, "load_tests/report.py", f"{prefix}_stats_history.csv"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "load_report.png").read_bytes().startswith(b"\x89PNG")


def test_provisioning_twice_keeps_the_tenants_and_their_keys(stack: Stack, tmp_path: Path):
    """`make load` provisions on every run: the second time nothing changes, keys included."""
    tenants_file = tmp_path / "tenants.json"
    first = provision(stack.store, stack.model_dir, 4, max(stack.worker.ranks), tenants_file, stack.router.address)
    second = provision(stack.store, stack.model_dir, 4, max(stack.worker.ranks), tenants_file, stack.router.address)
    assert second == first
    assert [k.describe for k in first] == ["flora rank 1", "lora rank 8", "ia3", "flora rank 8"]  # 16, capped at the worker's 8


@pytest.mark.parametrize(("flags", "status", "message"), [
    (["--rate", "0"], 2, "locust: error: argument --rate: must be > 0, got 0"),
    (["--gateway", "nowhere"], 2, "locust: error: argument --gateway: expected HOST:PORT, got 'nowhere'"),
    (["--tenants-file", "/nonexistent/tenants.json"], 1,
     "load_tests/locustfile.py: error: --tenants-file /nonexistent/tenants.json: no such file"),
])  # fmt: skip
def test_a_bad_flag_or_tenants_file_is_one_line_before_any_load(flags: list[str], status: int, message: str):
    command = [str(BIN / "locust"), "-f", "load_tests/locustfile.py", "--headless", "--users", "1", "--run-time", "1s", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr
