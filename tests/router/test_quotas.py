"""The router's quota arithmetic (services/router/quotas.py) on an injected clock: the
requests-per-minute bucket (burst, refill, retry time), max_concurrent, and the
generated-tokens-per-minute debt that a request incurs when it ends. The same limits
through the running gateway are in tests/gateway/test_auth.py."""

from __future__ import annotations

import grpc
import pytest

from adapters_store.registry import Quota
from services.router.errors import QuotaExceeded
from services.router.quotas import BURST_S, Quotas


# what the message names -> the metrics' `limit` label (docs/metrics.md)
LIMITS = {"requests per minute": "requests_per_minute", "generated tokens per minute": "tokens_per_minute",
          "concurrent requests": "concurrent_requests"}  # fmt: skip


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def quotas(clock: Clock) -> Quotas:
    return Quotas(clock)


def admit_once(quotas: Quotas, quota: Quota, tenant: str = "a", tokens: int = 0) -> None:
    """One whole request: admitted, `tokens` generated, ended."""
    with quotas.admit(tenant, quota) as admission:
        admission.completion_tokens = tokens


def refusal(quotas: Quotas, quota: Quota, tenant: str = "a") -> str:
    with pytest.raises(QuotaExceeded) as caught:
        admit_once(quotas, quota, tenant)
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.limit == next(label for words, label in LIMITS.items() if words in caught.value.message)
    return caught.value.message


def test_requests_bucket_lets_a_burst_of_ten_seconds_through_then_refuses_with_the_limit_and_retry_time(quotas: Quotas):
    rpm = Quota(requests_per_minute=60)  # 1 per second, a burst of BURST_S
    for _ in range(int(BURST_S)):
        admit_once(quotas, rpm)
    assert refusal(quotas, rpm) == "tenant a is over its quota of 60 requests per minute; retry in 1.0 s"


def test_requests_bucket_refills_at_its_rate_and_never_above_its_burst(quotas: Quotas, clock: Clock):
    rpm = Quota(requests_per_minute=60)
    for _ in range(10):
        admit_once(quotas, rpm)
    clock.advance(0.5)
    assert refusal(quotas, rpm).endswith("retry in 0.5 s")  # half of the next request's second still to wait
    clock.advance(0.5)
    admit_once(quotas, rpm)  # exactly one request's worth has come back
    refusal(quotas, rpm)
    clock.advance(3600)  # an idle hour refills the burst, not an hour's worth
    for _ in range(10):
        admit_once(quotas, rpm)
    refusal(quotas, rpm)


def test_a_refused_request_costs_nothing(quotas: Quotas, clock: Clock):
    rpm = Quota(requests_per_minute=60)
    for _ in range(10):
        admit_once(quotas, rpm)
    for _ in range(5):
        refusal(quotas, rpm)
    clock.advance(1.0)
    admit_once(quotas, rpm)  # the five refusals did not push the bucket into debt


def test_a_limit_under_six_per_minute_still_admits_one_request_then_waits_a_whole_interval(quotas: Quotas, clock: Clock):
    rpm = Quota(requests_per_minute=2)  # BURST_S of it is a third of a request: the bucket holds one
    admit_once(quotas, rpm)
    assert refusal(quotas, rpm) == "tenant a is over its quota of 2 requests per minute; retry in 30.0 s"
    clock.advance(29.9)
    refusal(quotas, rpm)
    clock.advance(0.1)
    admit_once(quotas, rpm)


def test_zero_means_unlimited(quotas: Quotas):
    for _ in range(1000):
        admit_once(quotas, Quota(), tokens=10_000)


def test_tenants_have_separate_buckets(quotas: Quotas):
    rpm = Quota(requests_per_minute=6)
    admit_once(quotas, rpm, "a")
    refusal(quotas, rpm, "a")
    admit_once(quotas, rpm, "b")


def test_lowering_the_rate_shrinks_the_burst_at_once_and_lifting_it_admits_at_once(quotas: Quotas, clock: Clock):
    admit_once(quotas, Quota(requests_per_minute=600))  # a full bucket of 100
    admit_once(quotas, Quota(requests_per_minute=60))  # clipped to a burst of 10, one spent
    for _ in range(9):
        admit_once(quotas, Quota(requests_per_minute=60))
    refusal(quotas, Quota(requests_per_minute=60))
    for _ in range(50):
        admit_once(quotas, Quota())  # lifted: no bucket any more
    for _ in range(10):  # set again: a new, full bucket
        admit_once(quotas, Quota(requests_per_minute=60))
    refusal(quotas, Quota(requests_per_minute=60))


def test_max_concurrent_refuses_while_the_tenant_has_that_many_in_flight(quotas: Quotas):
    one = Quota(max_concurrent=1)
    with quotas.admit("a", one):
        assert refusal(quotas, one) == "tenant a is over its quota of 1 concurrent requests; retry when one finishes"
        admit_once(quotas, one, "b")  # another tenant's requests do not count
    admit_once(quotas, one)  # the place is free again
    assert quotas.in_flight["a"] == quotas.in_flight["b"] == 0


def test_a_request_that_fails_still_frees_its_place_and_pays_for_its_tokens(quotas: Quotas):
    quota = Quota(max_concurrent=1, tokens_per_minute=60)
    with pytest.raises(RuntimeError):
        with quotas.admit("a", quota) as admission:
            admission.completion_tokens = 11  # generated before the worker failed
            raise RuntimeError("worker died")
    assert quotas.in_flight["a"] == 0
    assert "retry in 1.0 s" in refusal(quotas, quota)  # 10 in the bucket, 11 spent


def test_tokens_are_charged_when_the_request_ends_and_new_ones_wait_out_the_debt(quotas: Quotas, clock: Clock):
    tpm = Quota(tokens_per_minute=60)  # 1 token per second, a bucket of 10
    admit_once(quotas, tpm, tokens=25)  # its length was unknown at admission: admitted on a full bucket
    message = refusal(quotas, tpm)
    assert message == "tenant a is over its quota of 60 generated tokens per minute; retry in 15.0 s"
    clock.advance(14.9)
    refusal(quotas, tpm)
    clock.advance(0.1)
    admit_once(quotas, tpm, tokens=1)  # out of debt: admitted, and this one's token makes it owe again
    assert refusal(quotas, tpm).endswith("retry in 1.0 s")


def test_requests_admitted_together_all_pay_when_they_end(quotas: Quotas, clock: Clock):
    tpm = Quota(tokens_per_minute=60)
    with quotas.admit("a", tpm) as first, quotas.admit("a", tpm) as second:
        first.completion_tokens, second.completion_tokens = 8, 7  # admitted before either was charged
    assert refusal(quotas, tpm).endswith("retry in 5.0 s")  # 10 - 15 = -5 tokens
    clock.advance(5.0)
    admit_once(quotas, tpm)


def test_both_buckets_hold_a_request_back_but_only_an_admitted_one_spends_a_request(quotas: Quotas, clock: Clock):
    quota = Quota(requests_per_minute=6, tokens_per_minute=60)
    admit_once(quotas, quota, tokens=20)  # one request (the whole burst) and 10 tokens of debt
    assert "generated tokens per minute" in refusal(quotas, quota)  # the debt is checked first
    clock.advance(10.0)  # the request bucket is full again (one per 10 s) and the debt is paid
    admit_once(quotas, quota)
    assert "6 requests per minute" in refusal(quotas, quota)
