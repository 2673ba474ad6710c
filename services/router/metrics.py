"""The router's Prometheus series, per tenant (docs/metrics.md lists them).

    metrics = RouterMetrics(max_tenants=100)          # its own registry, process metrics included
    with metrics.track("GenerateStream") as request:   # one request, from arrival to its status
        request.authorized(view.tenant)
        request.chunk(chunk)                           # each worker chunk as it leaves
        request.failed(error)                          # a GatewayError: its code (and quota) counted

The tenant label is bounded: the first `max_tenants` tenants served get their own value and
every later one is `other`, so a million tenants cannot blow up Prometheus. A request that is
not authorized for any tenant is `unauthorized`: made-up tenant ids never become labels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

from services.protos import worker_pb2
from services.router.errors import GatewayError, QuotaExceeded

OTHER = "other"
UNAUTHORIZED = "unauthorized"

# From a cached short completion (~5 ms) to a long generation on a busy replica (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class TenantLabels:
    """tenant id -> label value: itself for the first `cap` tenants seen, `other` after."""

    def __init__(self, cap: int):
        self.cap = cap
        self.named: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self.named:
            return tenant
        if len(self.named) < self.cap:
            self.named.add(tenant)
            return tenant
        return OTHER


class RouterMetrics:
    def __init__(self, max_tenants: int):
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.label = TenantLabels(max_tenants)
        r = self.registry
        self.requests = Counter("flora_requests", "Finished requests by gRPC status code", ["tenant", "method", "code"], registry=r)
        self.rate_limited = Counter("flora_rate_limited_requests", "Requests refused by a tenant quota", ["tenant", "limit"], registry=r)
        self.in_flight = Gauge("flora_requests_in_flight", "Authorized requests not finished yet", ["tenant"], registry=r)
        self.duration = Histogram("flora_request_duration_seconds", "End-to-end latency of successful requests, at the router",
                                  ["tenant", "method"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("flora_time_to_first_token_seconds", "Arrival at the router to the first generated token leaving it",
                              ["tenant"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("flora_time_per_output_token_seconds", "(last token - first token) / (generated tokens - 1)",
                              ["tenant"], buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("flora_prompt_tokens", "Prompt tokens of successful requests", ["tenant"], registry=r)
        self.generated_tokens = Counter("flora_generated_tokens", "Generated tokens, counted as they stream", ["tenant"], registry=r)

    @contextmanager
    def track(self, method: str) -> Iterator[RequestTracker]:
        """Time one request; whatever ends it (a return, a GatewayError, the client cancelling) is counted."""
        request = RequestTracker(self, method)
        try:
            yield request
        except asyncio.CancelledError:
            request.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            if request.code == grpc.StatusCode.OK:  # not a GatewayError the servicer already turned into a status
                request.code = grpc.StatusCode.INTERNAL
            raise
        finally:
            request.finish()


class RequestTracker:
    """One request's measurements; recorded into RouterMetrics when it finishes."""

    def __init__(self, metrics: RouterMetrics, method: str):
        self.metrics, self.method = metrics, method
        self.start = time.perf_counter()
        self.tenant = UNAUTHORIZED
        self.code = grpc.StatusCode.OK
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.prompt_tokens = self.generated_tokens = 0

    def authorized(self, tenant: str) -> None:
        self.tenant = self.metrics.label(tenant)
        self.metrics.in_flight.labels(self.tenant).inc()
        self._generated = self.metrics.generated_tokens.labels(self.tenant)  # looked up once, counted per chunk

    def chunk(self, chunk: worker_pb2.WorkerChunk) -> None:
        if not chunk.token_ids:
            return
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self._generated.inc(chunk.completion_tokens - self.generated_tokens)
        self.prompt_tokens, self.generated_tokens = chunk.prompt_tokens, chunk.completion_tokens

    def failed(self, error: GatewayError) -> None:
        self.code = error.code
        if isinstance(error, QuotaExceeded):
            self.metrics.rate_limited.labels(self.tenant, error.limit).inc()

    def finish(self) -> None:
        m = self.metrics
        m.requests.labels(self.tenant, self.method, self.code.name).inc()
        if self.tenant != UNAUTHORIZED:
            m.in_flight.labels(self.tenant).dec()
        if self.code != grpc.StatusCode.OK:
            return
        m.duration.labels(self.tenant, self.method).observe(time.perf_counter() - self.start)
        m.prompt_tokens.labels(self.tenant).inc(self.prompt_tokens)
        if self.first_token_at is not None:
            m.ttft.labels(self.tenant).observe(self.first_token_at - self.start)
        if self.generated_tokens >= 2:
            m.tpot.labels(self.tenant).observe((self.last_token_at - self.first_token_at) / (self.generated_tokens - 1))
