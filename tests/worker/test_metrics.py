"""A replica's series (services/worker/metrics.py) over a real engine and a real S3 API: engine
steps and adapter loads observed as they happen, state read at scrape time, failures by reason,
and an exposition that `promtool check metrics` accepts. Through a running gateway and a real
Prometheus: tests/observability/."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from adapters_store.errors import AdapterValidationError
from services.engine.async_engine import AsyncEngine
from services.engine.sampling import SamplingParams
from services.worker.adapter_cache import AdapterCache
from services.worker.metrics import ReplicaMetrics
from tests.worker.helpers import Adapters, make_cache


def value(metrics: ReplicaMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels)


def watched(engine: AsyncEngine, blobs, adapters: Adapters, tmp_path) -> tuple[ReplicaMetrics, AdapterCache]:
    metrics = ReplicaMetrics()
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=1, on_load=metrics.observe_load)
    metrics.watch(engine, cache)
    return metrics, cache


async def generate(engine: AsyncEngine, ref: str | None, tokens: int) -> None:
    async for _ in engine.generate([1, 2, 3, 4], ref, SamplingParams(max_new_tokens=tokens, ignore_eos=True)):
        pass


def test_every_series_exists_before_any_request(engine, blobs, adapters, tmp_path):
    metrics, _ = watched(engine, blobs, adapters, tmp_path)
    assert value(metrics, "flora_engine_running_requests") == 0
    assert value(metrics, "flora_engine_kv_cache_blocks_capacity") == engine.engine.blocks.num_blocks > 0
    assert value(metrics, "flora_engine_step_seconds_count") == 0
    for tier in ("ram", "disk", "blob"):
        assert value(metrics, "flora_adapter_cache_hits_total", tier=tier) == 0
    for reason in ("unavailable", "invalid", "internal"):
        assert value(metrics, "flora_adapter_load_failures_total", reason=reason) == 0
    assert value(metrics, "flora_adapter_load_seconds_count", source="blob") == 0
    assert value(metrics, "process_resident_memory_bytes") > 0


def test_steps_tokens_and_cache_tiers_are_counted(engine, blobs, adapters, tmp_path):
    metrics, cache = watched(engine, blobs, adapters, tmp_path)
    (a, a_sha), (b, b_sha) = adapters.upload(1), adapters.upload(2)

    async def scenario() -> None:
        async with cache.lease(a, a_sha):  # cold: from the blob store
            await generate(engine, a, tokens=5)
        async with cache.lease(b, b_sha):  # RAM holds one adapter: A is evicted
            await generate(engine, b, tokens=3)
        async with cache.lease(a, a_sha):  # back from disk
            await generate(engine, None, tokens=2)

    asyncio.run(scenario())
    steps = value(metrics, "flora_engine_step_seconds_count")
    assert steps == value(metrics, "flora_engine_step_tokens_count") == value(metrics, "flora_engine_step_sequences_count") >= 10
    assert value(metrics, "flora_engine_generated_tokens_total") == 10
    assert value(metrics, "flora_engine_step_tokens_sum") == 3 * 4 + 7  # three 4-token prompts, then one token per decode step
    assert value(metrics, "flora_adapter_cache_hits_total", tier="blob") == 2
    assert value(metrics, "flora_adapter_cache_hits_total", tier="disk") == 1
    assert value(metrics, "flora_adapter_cache_misses_total", tier="ram") == 3
    assert value(metrics, "flora_adapter_cache_evictions_total", tier="ram") == 2
    assert value(metrics, "flora_adapter_load_seconds_count", source="blob") == 2
    assert value(metrics, "flora_adapter_load_seconds_count", source="disk") == 1
    assert value(metrics, "flora_adapter_cache_resident_bytes", tier="ram") == adapters.decoded_bytes
    assert value(metrics, "flora_adapter_cache_resident_bytes", tier="disk") == len(adapters.data(1)) + len(adapters.data(2))
    assert value(metrics, "flora_engine_running_requests") == value(metrics, "flora_engine_kv_cache_blocks_used") == 0


def test_a_load_failure_is_counted_by_reason(engine, blobs, adapters, tmp_path):
    metrics, cache = watched(engine, blobs, adapters, tmp_path)
    ref, sha = adapters.upload(3, modules=("attn.c_proj",))  # a module this engine does not adapt

    with pytest.raises(AdapterValidationError):
        asyncio.run(cache.acquire(ref, sha))
    assert value(metrics, "flora_adapter_load_failures_total", reason="invalid") == 1
    assert value(metrics, "flora_adapter_load_failures_total", reason="unavailable") == 0


def test_promtool_accepts_the_exposition(engine, blobs, adapters, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/install-system-deps.sh installs Debian's prometheus package"
    metrics, cache = watched(engine, blobs, adapters, tmp_path)
    ref, sha = adapters.upload(4)

    async def scenario() -> None:
        async with cache.lease(ref, sha):
            await generate(engine, ref, tokens=3)

    asyncio.run(scenario())
    checked = subprocess.run([promtool, "check", "metrics"], input=generate_latest(metrics.registry), capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
