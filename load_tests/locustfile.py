"""Locust scenario: GenerateStream against a running gateway at a fixed total rate, tenants drawn Zipf-like.

    .venv/bin/locust -f load_tests/locustfile.py --headless --users 32 --spawn-rate 8 --run-time 2m \\
        --rate 8 --tenants-file .cache/load/tenants.json \\
        --csv .cache/load/load --csv-full-history --html .cache/load/load.html

(`make load` runs this against the `make run` stack; load_tests/README.md explains the numbers.)

Every call is two entries in Locust's statistics, request type "grpc":
  GenerateStream ttft  time to the first token, ms; response length 0
  GenerateStream e2e   the whole stream, ms; response length = the tokens generated,
                       so tokens/s = the e2e entry's requests/s x its average size
A call that fails (any gRPC status) is a failure of "e2e", and of "ttft" too when it failed
before its first token; the failure's message starts with the status name (`UNAVAILABLE: ...`).

The rate: each user paces itself with `constant_throughput(rate / users)`, so the users
together start --rate calls a second as long as one call takes less than users / rate seconds
(beyond that the users fall behind and a warning says so at the end: add users). Tenant i
(1-based, in the tenants file's order) is drawn with weight 1 / i^s (Zipf, s = --zipf-s).
Prompts are code prefixes of 76-159 SmolLM2 tokens, drawn at random from PROMPTS.

This file runs in Locust's process only: nothing in the gateway imports locust.
"""

# First, before anything else touches grpc: Locust runs each user as a gevent greenlet on one
# OS thread. gRPC's C core otherwise waits for network events in blocking calls of its own,
# which gevent cannot switch away from, so one user's stream read would stall every other user
# (calls run one at a time and the latencies measure the queue). init_gevent() makes grpc poll
# through gevent's event loop; it must run before the first channel exists, hence here, at the top.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import argparse  # noqa: E402 - after init_gevent(), on purpose (see above)
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

import gevent  # noqa: E402
import grpc  # noqa: E402
from locust import User, constant_throughput, events, task  # noqa: E402
from locust import stats as locust_stats  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from services.env import cache_root  # noqa: E402
from services.protos import gateway_pb2, gateway_pb2_grpc  # noqa: E402

PROG = "load_tests/locustfile.py"
REQUEST_TYPE = "grpc"
TTFT = "GenerateStream ttft"
E2E = "GenerateStream e2e"
DEFAULT_TENANTS_FILE = cache_root() / "load" / "tenants.json"  # where load_tests/tenants.py writes by default
DEFAULT_GATEWAY = "127.0.0.1:50051"  # the router's default listen address (FLORA_ROUTER_LISTEN)

# What an editor sends a code-completion gateway: the code before the cursor, cut mid-body.
PROMPTS = (
    # Python: a small utility, cursor in the body (78 tokens).
    '''import hashlib
from pathlib import Path


def file_digest(path: Path, chunk_size: int = 1 << 16) -> str:
    """The sha256 of a file, read in chunks so large files never sit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
''',
    # Python: a dataclass method to finish (111 tokens).
    '''from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class Invoice:
    number: str
    issued: datetime
    lines: list[tuple[str, int, float]] = field(default_factory=list)  # (item, quantity, unit price)
    tax_rate: float = 0.2

    def subtotal(self) -> float:
        return sum(quantity * price for _, quantity, price in self.lines)

    def total(self) -> float:
''',
    # Python: an async HTTP helper with retries (159 tokens).
    '''import asyncio
import logging

import aiohttp

log = logging.getLogger(__name__)


async def fetch_json(session: aiohttp.ClientSession, url: str, attempts: int = 3, backoff_s: float = 0.5) -> dict:
    """GET `url` and decode its JSON body, retrying server errors with exponential backoff."""
    for attempt in range(attempts):
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status >= 500:
                    raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
''',
    # Python: a test to write (76 tokens).
    '''import pytest

from inventory.stock import Stock, OutOfStock


@pytest.fixture
def stock() -> Stock:
    s = Stock()
    s.add("apple", 3)
    s.add("pear", 1)
    return s


def test_remove_more_than_available_raises(stock: Stock):
''',
    # TypeScript: a React hook (125 tokens).
    '''import { useEffect, useState } from "react";

export interface User {
  id: number;
  name: string;
  email: string;
}

export function useUser(id: number): { user: User | null; loading: boolean; error: string | null } {
  const [user, setUser] = useState<User | null>(null);
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
''',
    # Go: an HTTP handler (149 tokens).
    '''package api

import (
	"encoding/json"
	"net/http"
	"strconv"
)

type Todo struct {
	ID    int    `json:"id"`
	Title string `json:"title"`
	Done  bool   `json:"done"`
}

func (s *Server) getTodo(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.Atoi(r.PathValue("id"))
	if err != nil {
		http.Error(w, "bad id", http.StatusBadRequest)
		return
	}
''',
    # SQL: a report query (142 tokens).
    '''-- Monthly revenue per customer segment, last 12 months, with the month-over-month change.
WITH monthly AS (
    SELECT
        date_trunc('month', o.created_at) AS month,
        c.segment,
        sum(oi.quantity * oi.unit_price) AS revenue
    FROM orders o
    JOIN customers c ON c.id = o.customer_id
    JOIN order_items oi ON oi.order_id = o.id
    WHERE o.created_at >= date_trunc('month', now()) - interval '12 months'
    GROUP BY 1, 2
)
SELECT
''',
    # Rust: a small parser (102 tokens).
    '''use std::collections::HashMap;

/// Parses `key=value` pairs separated by `;`, e.g. "host=db;port=5432".
pub fn parse_pairs(input: &str) -> Result<HashMap<String, String>, String> {
    let mut pairs = HashMap::new();
    for part in input.split(';').filter(|p| !p.trim().is_empty()) {
''',
)


# ---- flags ------------------------------------------------------------------------------------------


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def host_port(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


@events.init_command_line_parser.add_listener
def add_flags(parser) -> None:
    """Locust's own flags stay as they are (--users, --run-time, --csv, ...); these are the scenario's.
    A bad value is argparse's one-line error naming the flag."""
    group = parser.add_argument_group("flora-gateway scenario")
    group.add_argument("--rate", type=positive_float, default=8.0, help="total calls started per second, shared by the users (default 8)")
    group.add_argument("--tenants-file", default=DEFAULT_TENANTS_FILE,
                       help=f"the tenants and their API keys, written by load_tests/tenants.py (default {DEFAULT_TENANTS_FILE})")
    group.add_argument("--num-tenants", type=non_negative_int, default=0, help="use the file's first N tenants (default 0: all)")
    group.add_argument("--gateway", type=host_port, default=None,
                       help=f"the router, HOST:PORT (default: the tenants file's address, else {DEFAULT_GATEWAY})")
    group.add_argument("--zipf-s", type=non_negative_float, default=1.1,
                       help="tenant i is drawn with weight 1/i^s; 0 is uniform (default 1.1)")
    group.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per call at most (default 32)")
    # Greedy by default, as the gateway is: code completion samples greedily or nearly so. Top-p
    # below 1 costs this engine a vocabulary sort per row and step (load_tests/README.md).
    group.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature (default 0: greedy)")
    group.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling (default 1: off)")
    group.add_argument("--ignore-eos", action="store_true",
                       help="generate exactly --max-new-tokens: a load that does not depend on the text")
    group.add_argument("--max-prompt-chars", type=non_negative_int, default=0,
                       help="keep only the prompts' last N characters, for a model with a short context (default 0: whole)")
    group.add_argument("--timeout", type=positive_float, default=60.0, help="each call's deadline, seconds (default 60)")


# ---- the workload, read once at start ---------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    name: str
    metadata: tuple[tuple[str, str], ...]  # the API key, as the gateway takes it


@dataclass(frozen=True)
class Workload:
    gateway: str
    tenants: tuple[Tenant, ...]
    cum_weights: tuple[float, ...]  # Zipf, for random.choices
    prompts: tuple[str, ...]
    sampling: gateway_pb2.SamplingParams
    rate: float
    timeout_s: float

    def draw_tenant(self) -> Tenant:
        return random.choices(self.tenants, cum_weights=self.cum_weights)[0]

    def request(self, tenant: Tenant) -> gateway_pb2.GenerateRequest:
        return gateway_pb2.GenerateRequest(tenant_id=tenant.name, prompt=random.choice(self.prompts), sampling=self.sampling)


WORKLOAD: Workload | None = None  # set by the init event, before any user starts


def fail(message: str) -> NoReturn:
    """One line on stderr and exit status 1: a bad tenants file or setting, before any load runs."""
    sys.exit(f"{PROG}: error: {message}")


def read_tenants_file(path: Path) -> tuple[str, list[Tenant]]:
    """(its gateway address or "", its tenants in file order); the format load_tests/tenants.py and
    `make run`'s demo-tenants.json share: {"address": ..., "tenants": {name: {"api_key": ...}, ...}}."""
    try:
        document = json.loads(path.read_text())
        tenants = [Tenant(name, (("authorization", f"Bearer {entry['api_key']}"),)) for name, entry in document["tenants"].items()]
        return str(document.get("address", "")), tenants
    except FileNotFoundError:
        fail(f"--tenants-file {path}: no such file; write it with `.venv/bin/python load_tests/tenants.py` (or `make load`)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        fail(f"--tenants-file {path}: not a tenants file ({type(error).__name__}: {error})")


def zipf_cum_weights(count: int, s: float) -> tuple[float, ...]:
    return tuple(itertools.accumulate(1 / rank**s for rank in range(1, count + 1)))


def trimmed_prompts(max_chars: int) -> tuple[str, ...]:
    """The prompts' ends: what comes right before the cursor is what a completion needs most."""
    return PROMPTS if max_chars == 0 else tuple(p[-max_chars:] for p in PROMPTS)


def build_workload(options) -> Workload:
    address, tenants = read_tenants_file(Path(options.tenants_file))
    if not tenants:
        fail(f"--tenants-file {options.tenants_file}: no tenants in it")
    if options.num_tenants > len(tenants):
        fail(f"--num-tenants {options.num_tenants}: {options.tenants_file} has only {len(tenants)} tenants")
    tenants = tenants[: options.num_tenants or len(tenants)]
    sampling = gateway_pb2.SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                          top_p=options.top_p, ignore_eos=options.ignore_eos)  # fmt: skip
    return Workload(options.gateway or address or DEFAULT_GATEWAY, tuple(tenants), zipf_cum_weights(len(tenants), options.zipf_s),
                    trimmed_prompts(options.max_prompt_chars), sampling, options.rate, options.timeout)  # fmt: skip


@events.init.add_listener
def load_workload(environment, **_kwargs) -> None:
    global WORKLOAD
    if isinstance(environment.runner, (MasterRunner, WorkerRunner)):
        # Each worker would read the same --rate and start it all: the total would be rate x workers.
        fail("runs in one process (--rate is the total of this process's users); drop --master / --worker")
    WORKLOAD = build_workload(environment.parsed_options)
    first_share = WORKLOAD.cum_weights[0] / WORKLOAD.cum_weights[-1]
    logging.info("%s: %d tenants (the first draws %.0f%% of calls), gateway %s, %.3g calls/s", PROG, len(WORKLOAD.tenants),
                 100 * first_share, WORKLOAD.gateway, WORKLOAD.rate)  # fmt: skip


@events.test_stop.add_listener
def warn_if_behind(environment, **_kwargs) -> None:
    """constant_throughput cannot start a call while the user's previous one runs: too few users
    for the calls' duration lower the rate without any error, so say so."""
    e2e = environment.stats.get(E2E, REQUEST_TYPE)
    if WORKLOAD and e2e.num_requests and e2e.total_rps < 0.9 * WORKLOAD.rate:
        logging.warning("%s: %.2f calls/s, below --rate %.3g: each user starts a call only once its last one ends; add users "
                        "(--users) so that users / rate exceeds a call's duration", PROG, e2e.total_rps, WORKLOAD.rate)  # fmt: skip


@events.test_stop.add_listener
def write_final_csv(environment, **_kwargs) -> None:
    """Locust's CSV writer rewrites the files once a second and stops when the process quits, right
    after this event: without one more turn the CSV misses the calls of the last second (a call
    in its ttft row but not in its e2e row). Every user has stopped by now, so its next turn
    writes the final totals."""
    if environment.parsed_options and environment.parsed_options.csv_prefix:
        gevent.sleep(locust_stats.CSV_STATS_INTERVAL_SEC + 0.5)


# ---- the user ---------------------------------------------------------------------------------------


class GrpcStatusError(Exception):
    """A failed call, as Locust reports it: `STATUS_NAME: details`."""


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class GatewayUser(User):
    """One client with its own channel (its own HTTP/2 connection, as a separate editor would have)."""

    def on_start(self) -> None:
        # The share of --rate: the target count, not the users spawned so far, so ramp-up does not change it.
        users = max(1, self.environment.runner.target_user_count)
        self.pace = constant_throughput(WORKLOAD.rate / users)
        self.channel = grpc.insecure_channel(WORKLOAD.gateway)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def wait_time(self) -> float:
        return self.pace(self)

    @task
    def generate_stream(self) -> None:
        tenant = WORKLOAD.draw_tenant()
        start = time.perf_counter()
        call = self.stub.GenerateStream(WORKLOAD.request(tenant), metadata=tenant.metadata, timeout=WORKLOAD.timeout_s)
        tokens, first_token, finished = 0, False, False
        try:
            for chunk in call:
                if chunk.token_ids and not first_token:
                    first_token = True
                    self.record(TTFT, elapsed_ms(start), 0, tenant)
                tokens += len(chunk.token_ids)
                finished = chunk.finish_reason != gateway_pb2.FINISH_REASON_UNSPECIFIED
        except grpc.RpcError as error:
            self.record_failure(start, first_token, tenant, f"{error.code().name}: {error.details()}")
            return
        finally:
            call.cancel()  # a no-op once the stream ended; else (the user stopped mid-call) it frees the engine's slot
        if not finished:
            self.record_failure(start, first_token, tenant, "INCOMPLETE: the stream ended without its last chunk")
            return
        self.record(E2E, elapsed_ms(start), tokens, tenant)

    def record(self, name: str, ms: float, length: int, tenant: Tenant, error: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type=REQUEST_TYPE, name=name, response_time=ms, response_length=length,
                                             exception=error, context={"tenant": tenant.name})  # fmt: skip

    def record_failure(self, start: float, first_token: bool, tenant: Tenant, message: str) -> None:
        error = GrpcStatusError(message)
        if not first_token:  # no time to first token to report: that entry failed too
            self.record(TTFT, elapsed_ms(start), 0, tenant, error)
        self.record(E2E, elapsed_ms(start), 0, tenant, error)
