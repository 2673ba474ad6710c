"""A replica's Prometheus series: the engine and the adapter cache (docs/metrics.md lists them).

Histograms are observed as events happen: each engine step (on the step loop's thread, through
`LLMEngine.step_listeners`) and each adapter load. Everything else (request and KV gauges,
counters the engine and the cache already keep) is read when Prometheus scrapes, so the hot
path pays for nothing it does not already do.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.engine.async_engine import AsyncEngine
from services.engine.engine import StepRecord
from services.worker.adapter_cache import AdapterCache, LoadFailure, Tier

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STEP_TOKENS_BUCKETS = tuple(2**i for i in range(14))  # 1 ... 8192
STEP_SEQUENCES_BUCKETS = tuple(2**i for i in range(9))  # 1 ... 256
LOAD_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CACHED_TIERS = (Tier.RAM, Tier.DISK)  # tiers this replica holds (and evicts from); BLOB is the store


class ReplicaMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.step_seconds = Histogram("flora_engine_step_seconds", "One engine step: the batch's forward pass and sampling",
                                      buckets=STEP_SECONDS_BUCKETS, registry=r)  # fmt: skip
        self.step_tokens = Histogram("flora_engine_step_tokens", "Tokens per step (prompt chunks + decodes): the batch size",
                                     buckets=STEP_TOKENS_BUCKETS, registry=r)  # fmt: skip
        self.step_sequences = Histogram("flora_engine_step_sequences", "Sequences per step", buckets=STEP_SEQUENCES_BUCKETS, registry=r)
        self.load_seconds = Histogram("flora_adapter_load_seconds", "Fetch, decode and register of a cold adapter, by source",
                                      ["source"], buckets=LOAD_SECONDS_BUCKETS, registry=r)  # fmt: skip
        for source in (Tier.DISK, Tier.BLOB):
            self.load_seconds.labels(source.value)  # both series exist from the start (at 0)

    def observe_step(self, step: StepRecord) -> None:
        self.step_seconds.observe(step.seconds)
        self.step_tokens.observe(step.tokens)
        self.step_sequences.observe(step.sequences)

    def observe_load(self, source: Tier, seconds: float) -> None:
        self.load_seconds.labels(source.value).observe(seconds)

    def watch(self, engine: AsyncEngine, cache: AdapterCache) -> None:
        """Observe the engine's steps; read its state and the cache's at every scrape. (The cache
        reports its loads to `observe_load`.)"""
        engine.engine.step_listeners.append(self.observe_step)
        self.registry.register(_StateCollector(engine, cache))


class _StateCollector(Collector):
    def __init__(self, engine: AsyncEngine, cache: AdapterCache):
        self.engine, self.cache = engine, cache

    def collect(self) -> Iterator[Metric]:
        load, steps, stats = self.engine.load(), self.engine.step_stats(), self.cache.stats
        yield _gauge("flora_engine_running_requests", "Sequences in the running batch", load.running)
        yield _gauge("flora_engine_waiting_requests", "Requests waiting for a batch slot, KV blocks or an adapter slot", load.waiting)
        yield _gauge("flora_engine_kv_cache_blocks_used", "KV cache blocks held by sequences", load.kv_blocks_used)
        yield _gauge("flora_engine_kv_cache_blocks_capacity", "KV cache blocks the engine allocated", load.kv_blocks_total)
        yield CounterMetricFamily("flora_engine_preemptions", "Sequences preempted for KV blocks", steps.preemptions)
        yield CounterMetricFamily("flora_engine_generated_tokens", "Tokens sampled by the engine", steps.generated_tokens)
        yield _by_tier(CounterMetricFamily("flora_adapter_cache_hits", "Adapter requests served from a tier", labels=["tier"]),
                       {tier: stats.hits[tier] for tier in Tier})  # fmt: skip
        yield _by_tier(CounterMetricFamily("flora_adapter_cache_misses", "Adapter requests a tier could not serve", labels=["tier"]),
                       {tier: stats.misses[tier] for tier in CACHED_TIERS})  # fmt: skip
        yield _by_tier(CounterMetricFamily("flora_adapter_cache_evictions", "Adapters evicted under a tier's byte budget", labels=["tier"]),
                       {Tier.RAM: stats.evictions[Tier.RAM], Tier.DISK: self.cache.disk.evictions})  # fmt: skip
        yield _by_tier(GaugeMetricFamily("flora_adapter_cache_resident_bytes", "Bytes held by a tier", labels=["tier"]),
                       {Tier.RAM: self.cache.ram_bytes, Tier.DISK: self.cache.disk.used_bytes})  # fmt: skip
        failures = CounterMetricFamily("flora_adapter_load_failures", "Adapter loads that failed, by reason", labels=["reason"])
        for reason in LoadFailure:
            failures.add_metric([reason.value], stats.load_failures[reason])
        yield failures


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _by_tier(family: CounterMetricFamily | GaugeMetricFamily, values: dict[Tier, float]) -> Metric:
    for tier, value in values.items():
        family.add_metric([tier.value], value)
    return family
