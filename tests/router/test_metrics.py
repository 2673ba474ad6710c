"""The router's per-tenant series (services/router/metrics.py), driven request by request: what each
outcome counts, the tenant label's cap, and an exposition that `promtool check metrics` accepts.
The same series through a running gateway and a real Prometheus: tests/observability/."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import grpc
import pytest
from prometheus_client import generate_latest

from services.protos import worker_pb2
from services.router.errors import GatewayError, QuotaExceeded
from services.router.metrics import OTHER, UNAUTHORIZED, RouterMetrics, TenantLabels


def value(metrics: RouterMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def chunk(prompt_tokens: int, completion_tokens: int, new: int = 1) -> worker_pb2.WorkerChunk:
    return worker_pb2.WorkerChunk(token_ids=list(range(new)), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def serve(metrics: RouterMetrics, tenant: str, tokens: int, prompt_tokens: int = 5, pause_s: float = 0.0) -> None:
    """A successful stream of `tokens` chunks of one token each."""
    with metrics.track("GenerateStream") as request:
        request.authorized(tenant)
        for n in range(1, tokens + 1):
            time.sleep(pause_s)
            request.chunk(chunk(prompt_tokens, n))


def test_tenant_labels_name_the_first_tenants_then_fold_the_rest_into_other():
    label = TenantLabels(cap=2)
    assert [label(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    assert TenantLabels(cap=0)("a") == OTHER


def test_a_successful_stream_counts_its_tokens_latency_ttft_and_time_per_token():
    metrics = RouterMetrics(max_tenants=10)
    serve(metrics, "acme", tokens=4, prompt_tokens=7, pause_s=0.01)

    assert value(metrics, "flora_requests_total", tenant="acme", method="GenerateStream", code="OK") == 1
    assert value(metrics, "flora_prompt_tokens_total", tenant="acme") == 7
    assert value(metrics, "flora_generated_tokens_total", tenant="acme") == 4
    assert value(metrics, "flora_request_duration_seconds_count", tenant="acme", method="GenerateStream") == 1
    assert value(metrics, "flora_time_to_first_token_seconds_count", tenant="acme") == 1
    assert value(metrics, "flora_time_per_output_token_seconds_count", tenant="acme") == 1
    ttft = value(metrics, "flora_time_to_first_token_seconds_sum", tenant="acme")
    e2e = value(metrics, "flora_request_duration_seconds_sum", tenant="acme", method="GenerateStream")
    tpot = value(metrics, "flora_time_per_output_token_seconds_sum", tenant="acme")
    assert 0.01 <= ttft < e2e and 0.01 <= tpot < e2e  # three 10 ms gaps after the first token: ~10 ms per token
    assert value(metrics, "flora_requests_in_flight", tenant="acme") == 0


def test_chunks_carrying_several_tokens_count_each_token_once():
    metrics = RouterMetrics(max_tenants=10)
    with metrics.track("Generate") as request:
        request.authorized("acme")
        request.chunk(chunk(3, 1, new=1))
        request.chunk(chunk(3, 6, new=5))
        request.chunk(worker_pb2.WorkerChunk(prompt_tokens=3, completion_tokens=6))  # the final, empty chunk
    assert value(metrics, "flora_generated_tokens_total", tenant="acme") == 6
    assert value(metrics, "flora_requests_total", tenant="acme", method="Generate", code="OK") == 1


def test_refusals_before_authorization_are_unauthorized_and_never_name_the_tenant_asked_for():
    metrics = RouterMetrics(max_tenants=10)
    with pytest.raises(GatewayError), metrics.track("Generate") as request:
        error = GatewayError(grpc.StatusCode.UNAUTHENTICATED, "bad key")
        request.failed(error)
        raise error
    assert value(metrics, "flora_requests_total", tenant=UNAUTHORIZED, method="Generate", code="UNAUTHENTICATED") == 1
    assert value(metrics, "flora_request_duration_seconds_count", tenant=UNAUTHORIZED, method="Generate") == 0  # failures: no latency
    assert "made-up-tenant" not in generate_latest(metrics.registry).decode()


def test_a_quota_refusal_counts_as_rate_limited_with_its_limit():
    metrics = RouterMetrics(max_tenants=10)
    with pytest.raises(QuotaExceeded), metrics.track("GenerateStream") as request:
        request.authorized("acme")
        error = QuotaExceeded("requests_per_minute", "tenant acme is over its quota")
        request.failed(error)
        raise error
    assert value(metrics, "flora_rate_limited_requests_total", tenant="acme", limit="requests_per_minute") == 1
    assert value(metrics, "flora_requests_total", tenant="acme", method="GenerateStream", code="RESOURCE_EXHAUSTED") == 1
    assert value(metrics, "flora_requests_in_flight", tenant="acme") == 0


def test_a_cancelled_stream_is_cancelled_and_keeps_the_tokens_it_streamed():
    metrics = RouterMetrics(max_tenants=10)
    with pytest.raises(asyncio.CancelledError), metrics.track("GenerateStream") as request:
        request.authorized("acme")
        request.chunk(chunk(4, 1))
        request.chunk(chunk(4, 2))
        raise asyncio.CancelledError
    assert value(metrics, "flora_requests_total", tenant="acme", method="GenerateStream", code="CANCELLED") == 1
    assert value(metrics, "flora_generated_tokens_total", tenant="acme") == 2
    assert value(metrics, "flora_prompt_tokens_total", tenant="acme") == 0  # prompt tokens: successful requests only


def test_an_unexpected_exception_is_internal():
    metrics = RouterMetrics(max_tenants=10)
    with pytest.raises(RuntimeError), metrics.track("Generate") as request:
        request.authorized("acme")
        raise RuntimeError("bug")
    assert value(metrics, "flora_requests_total", tenant="acme", method="Generate", code="INTERNAL") == 1


def test_tenants_over_the_cap_are_counted_under_other():
    metrics = RouterMetrics(max_tenants=2)
    for tenant in ("a", "b", "c", "d"):
        serve(metrics, tenant, tokens=2)
    assert value(metrics, "flora_generated_tokens_total", tenant=OTHER) == 4  # c and d
    assert value(metrics, "flora_requests_total", tenant=OTHER, method="GenerateStream", code="OK") == 2
    assert value(metrics, "flora_generated_tokens_total", tenant="c") == 0


def test_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/install-system-deps.sh installs Debian's prometheus package"
    metrics = RouterMetrics(max_tenants=10)
    serve(metrics, "acme", tokens=3)
    with pytest.raises(QuotaExceeded), metrics.track("Generate") as request:
        request.authorized("acme")
        request.failed(error := QuotaExceeded("concurrent_requests", "busy"))
        raise error
    checked = subprocess.run([promtool, "check", "metrics"], input=generate_latest(metrics.registry), capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
