"""Per-tenant quotas (set with `adapterctl tenant set-quota`, read with the tenant), enforced here.

- requests_per_minute: a token bucket refilled at rpm/60 per second, holding up to
  BURST_S seconds' worth (at least one request), so short bursts pass and a steady
  excess is refused;
- max_concurrent: requests of the tenant in flight at once;
- tokens_per_minute: generated tokens, the same kind of bucket; a request is charged
  when it ends (its length is unknown before), and new ones wait while the bucket is
  in debt.
A refusal is RESOURCE_EXHAUSTED with the limit and when to retry. Limits hold per router
process: with N routers behind a balancer a tenant gets up to N times its quota.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from adapters_store.registry import Quota
from services.router.errors import QuotaExceeded

BURST_S = 10.0


@dataclass
class _Bucket:
    per_minute: int
    level: float
    updated: float

    def refill(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self.level = min(self.capacity, self.level + (now - self.updated) * per_minute / 60)
        self.updated = now

    @property
    def capacity(self) -> float:
        return max(1.0, self.per_minute / 60 * BURST_S)

    def wait_s(self, need: float) -> float:
        return (need - self.level) * 60 / self.per_minute


@dataclass
class Admission:
    tenant: str
    completion_tokens: int = 0


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.in_flight: Counter[str] = Counter()
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    @contextmanager
    def admit(self, tenant: str, quota: Quota) -> Iterator[Admission]:
        """Refuse (RESOURCE_EXHAUSTED) or hold a place for the request while the block runs."""
        now = self.clock()
        self._check_concurrency(tenant, quota.max_concurrent)
        tokens = self._bucket(self._tokens, tenant, quota.tokens_per_minute, now)
        if tokens is not None and tokens.level < 0:
            raise _exhausted(tenant, "tokens_per_minute", f"{quota.tokens_per_minute} generated tokens per minute", tokens.wait_s(0))
        requests = self._bucket(self._requests, tenant, quota.requests_per_minute, now)
        if requests is not None:
            if requests.level < 1:
                raise _exhausted(tenant, "requests_per_minute", f"{quota.requests_per_minute} requests per minute", requests.wait_s(1))
            requests.level -= 1
        admission = Admission(tenant)
        self.in_flight[tenant] += 1
        try:
            yield admission
        finally:
            self.in_flight[tenant] -= 1
            if tokens is not None:
                tokens.level -= admission.completion_tokens

    def _check_concurrency(self, tenant: str, limit: int) -> None:
        if limit and self.in_flight[tenant] >= limit:
            raise QuotaExceeded("concurrent_requests", f"tenant {tenant} is over its quota of {limit} concurrent requests; retry when one finishes")

    def _bucket(self, buckets: dict[str, _Bucket], tenant: str, per_minute: int, now: float) -> _Bucket | None:
        """The tenant's bucket, refilled to now; None when the limit is off (0)."""
        if per_minute == 0:
            buckets.pop(tenant, None)
            return None
        bucket = buckets.setdefault(tenant, _Bucket(per_minute, max(1.0, per_minute / 60 * BURST_S), now))
        bucket.refill(per_minute, now)
        return bucket


def _exhausted(tenant: str, limit: str, quota: str, retry_s: float) -> QuotaExceeded:
    return QuotaExceeded(limit, f"tenant {tenant} is over its quota of {quota}; retry in {max(retry_s, 0.1):.1f} s")
