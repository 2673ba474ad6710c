"""The replica's adapter tiers (AdapterCache) over a real engine and a real S3 API (moto).

A cold adapter comes from the blob store once, then from disk, then from RAM, and the
counters say which tier served it; the RAM budget holds once leases end; an adapter that is
leased, or that the engine still has an unfinished request for, survives pressure that evicts
the others; concurrent requests for one cold adapter share one fetch; a blob store outage
leaves nothing half-registered behind; and a cold adapter loads off the event loop and the
engine's step loop, so another request's tokens keep coming while it loads from a slow S3.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from adapters_store.blobstore import S3BlobStore
from adapters_store.errors import AdapterValidationError, BlobStoreUnavailable
from adapters_store.settings import S3Settings
from services.engine.sampling import SamplingParams
from services.worker.adapter_cache import Tier
from tests.adapters_store.helpers import BUCKET, free_port
from tests.slow_link import SlowLink
from tests.worker.helpers import CREDENTIALS, make_cache, registered, unique_prefix


def test_cold_adapter_comes_from_the_blob_store_then_disk_then_ram(engine, blobs, adapters, tmp_path):
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=1)
    (a, a_sha), (b, b_sha) = adapters.upload(1), adapters.upload(2)

    async def scenario() -> None:
        await cache.acquire(a, a_sha)  # cold: RAM and disk miss, the blob store serves it
        assert (cache.stats.misses[Tier.RAM], cache.stats.misses[Tier.DISK], cache.stats.hits[Tier.BLOB]) == (1, 1, 1)
        assert registered(engine, a) and cache.disk.path(a_sha).is_file()
        cache.release(a)
        async with cache.lease(b, b_sha):  # room for one adapter in RAM: A makes way
            pass
        assert not registered(engine, a) and cache.stats.evictions[Tier.RAM] == 1

        await cache.acquire(a, a_sha)  # out of RAM, still on disk
        assert (cache.stats.hits[Tier.DISK], cache.stats.hits[Tier.BLOB]) == (1, 2)  # the second BLOB hit was B's
        await cache.acquire(a, a_sha)  # still in RAM
        assert (cache.stats.hits[Tier.RAM], cache.stats.hits[Tier.DISK], cache.stats.hits[Tier.BLOB]) == (1, 1, 2)
        assert (cache.stats.misses[Tier.RAM], cache.stats.misses[Tier.DISK]) == (3, 2)

    asyncio.run(scenario())
    loads = cache.stats.load_seconds
    assert len(loads[Tier.BLOB]) == 2 and len(loads[Tier.DISK]) == 1  # a RAM hit loads nothing
    assert all(0 < s < 30 for s in loads[Tier.BLOB] + loads[Tier.DISK])


def test_ram_budget_holds_once_leases_end(engine, blobs, adapters, tmp_path):
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=2.5)
    refs = [adapters.upload(seed) for seed in range(6)]

    async def scenario() -> None:
        for ref, sha in refs[:3]:  # three leases at once: in use beats the budget
            await cache.acquire(ref, sha)
        assert cache.snapshot().resident_bytes[Tier.RAM] == 3 * adapters.decoded_bytes > cache.ram_budget
        for ref, _ in refs[:3]:
            cache.release(ref)
        for ref, sha in refs[3:]:
            async with cache.lease(ref, sha):
                pass
            assert cache.snapshot().resident_bytes[Tier.RAM] <= cache.ram_budget

    asyncio.run(scenario())
    assert cache.snapshot().resident_bytes[Tier.RAM] == 2 * adapters.decoded_bytes
    assert cache.stats.evictions[Tier.RAM] == 4
    assert [registered(engine, ref) for ref, _ in refs] == [False] * 4 + [True] * 2  # the least recently used went


def test_leased_adapter_survives_pressure_that_evicts_others(engine, blobs, adapters, tmp_path):
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=1)
    held, *others = [adapters.upload(seed) for seed in range(4)]

    async def scenario() -> None:
        async with cache.lease(*held):  # the least recently used, all along
            for ref, sha in others:
                async with cache.lease(ref, sha):
                    pass
                assert registered(engine, held[0]) and not registered(engine, ref)
        async with cache.lease(*others[0]):  # the lease ended: now it goes like any other
            pass

    asyncio.run(scenario())
    assert not registered(engine, held[0]) and cache.stats.evictions[Tier.RAM] == 4


def test_adapter_with_an_unfinished_engine_request_is_not_evicted(engine, blobs, adapters, tmp_path):
    """The engine's reference counts decide, not the lease alone: a request can outlive its lease
    (a cancelled call releases the lease before the engine applies the abort). The engine's loop is
    held still (its step lock) while the lease ends, so the request is unfinished however fast the
    tiny model would have finished it."""
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=1)
    (busy, busy_sha), (other, other_sha), (later, later_sha) = [adapters.upload(seed) for seed in range(3)]
    params = SamplingParams(max_new_tokens=100, temperature=0.0, ignore_eos=True)

    async def scenario() -> int:
        await cache.acquire(busy, busy_sha)
        await cache.acquire(other, other_sha)
        stream = engine.generate("def f(x):", busy, params)
        first = asyncio.ensure_future(anext(stream))
        with engine._lock:  # no step runs until the block ends
            await asyncio.sleep(0)  # the generator hands the request over and waits for output
            engine._submit_inbox()
            assert engine.engine.load().adapter_users == 1  # the request is unfinished ...
            cache.release(busy)  # ... its lease ends: nothing but the engine's count protects it now
            assert registered(engine, busy)
        tokens = len((await first).new_token_ids)
        async for output in stream:  # the adapter still serves the request to the end
            tokens += len(output.new_token_ids)
        assert registered(engine, busy)
        cache.release(other)  # the request is done: busy goes like any other (least recently used)
        assert not registered(engine, busy) and registered(engine, other)
        async with cache.lease(later, later_sha):
            pass
        return tokens

    assert asyncio.run(scenario()) == 100
    assert not registered(engine, busy) and cache.stats.evictions[Tier.RAM] == 2


def test_concurrent_acquires_of_one_cold_adapter_fetch_once(engine, blobs, adapters, tmp_path):
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=4)
    ref, sha = adapters.upload(7)

    async def scenario() -> None:
        await asyncio.gather(*(cache.acquire(ref, sha) for _ in range(5)))
        for _ in range(5):
            cache.release(ref)

    asyncio.run(scenario())
    assert cache.stats.hits[Tier.BLOB] == 1 and cache.stats.misses[Tier.RAM] == 5
    assert len(cache.stats.load_seconds[Tier.BLOB]) == 1 and registered(engine, ref)


def test_adapter_landing_while_another_lease_ends_is_not_evicted_before_its_requests_lease_it(engine, blobs, adapters, tmp_path):
    """Between the fetch finishing and its waiting requests resuming, another request may end and
    make room: the adapter they are waiting for must not be what goes."""
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=1.5)
    (first, first_sha), (second, second_sha), (cold, cold_sha) = [adapters.upload(seed) for seed in range(3)]

    async def release_first_when_cold_lands() -> None:
        while cold not in cache.ram:  # every turn of the loop: this runs before the waiting acquire resumes
            await asyncio.sleep(0)
        cache.release(first)

    async def scenario() -> None:
        await cache.acquire(first, first_sha)
        await cache.acquire(second, second_sha)  # two leased: over budget, in use
        await asyncio.wait_for(asyncio.gather(cache.acquire(cold, cold_sha), release_first_when_cold_lands()), 30)
        assert registered(engine, cold) and registered(engine, second) and not registered(engine, first)

    asyncio.run(scenario())


def test_blob_store_outage_leaves_nothing_half_registered(engine, adapters, tmp_path, s3_server):
    """S3 is down (nothing listens on its port), then comes back on the same endpoint."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    down = S3BlobStore(BUCKET, unique_prefix(), S3Settings(endpoint_url=endpoint, max_attempts=1, connect_timeout_s=0.5, **CREDENTIALS))
    cache = make_cache(engine, down, adapters, tmp_path, ram_adapters=2)
    data = adapters.data(5)
    ref, sha = "tenant5/default@1", hashlib.sha256(data).hexdigest()

    with pytest.raises(BlobStoreUnavailable, match=f"127.0.0.1:{port}"):
        asyncio.run(cache.acquire(ref, sha))
    assert ref not in cache.ram and not registered(engine, ref) and cache.disk.used_bytes == 0
    assert cache.stats.hits[Tier.BLOB] == 0

    with moto_server(port):
        down.put(data, sha)  # the same store object: S3 is back
        asyncio.run(cache.acquire(ref, sha))
    assert registered(engine, ref) and cache.stats.hits[Tier.BLOB] == 1


def test_adapter_the_engine_cannot_take_is_refused_and_not_kept(engine, blobs, adapters, tmp_path):
    cache = make_cache(engine, blobs, adapters, tmp_path, ram_adapters=2)
    ref, sha = adapters.upload(9, modules=("attn.c_proj",))  # this engine adapts c_attn and c_fc only

    with pytest.raises(AdapterValidationError, match="attn.c_proj"):
        asyncio.run(cache.acquire(ref, sha))
    assert ref not in cache.ram and not registered(engine, ref)


class moto_server:
    """A second moto S3 endpoint on `port` (same in-process backend, so the session bucket exists)."""

    def __init__(self, port: int):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)

    def __enter__(self) -> None:
        self.server.start()

    def __exit__(self, *exc) -> None:
        self.server.stop()


def test_cold_adapter_loads_while_another_requests_tokens_keep_coming(engine, blobs, adapters, tmp_path, s3_server):
    link = SlowLink(s3_server.endpoint, delay_s=0.5)
    far = S3BlobStore(BUCKET, blobs.prefix, S3Settings(endpoint_url=link.endpoint, max_attempts=1, **CREDENTIALS))
    cache = make_cache(engine, far, adapters, tmp_path, ram_adapters=2)
    ref, sha = adapters.upload(4)  # through the near endpoint
    arrivals: list[float] = []

    async def base_model_requests(loaded: asyncio.Event) -> None:
        """Back-to-back requests on the base model until the cold adapter is in, each token timed."""
        while not loaded.is_set():
            async for _ in engine.generate("def f(x):", None, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)):
                arrivals.append(time.perf_counter())

    async def scenario() -> tuple[float, float]:
        loaded = asyncio.Event()
        other = asyncio.create_task(base_model_requests(loaded))
        while not arrivals:  # the other request is streaming
            await asyncio.sleep(0.001)
        start = time.perf_counter()
        await cache.acquire(ref, sha)
        end = time.perf_counter()
        loaded.set()
        await asyncio.wait_for(other, 30)
        return start, end

    try:
        start, end = asyncio.run(scenario())
    finally:
        link.close()
    assert cache.stats.hits[Tier.BLOB] == 1 and cache.stats.load_seconds[Tier.BLOB][0] >= link.delay_s  # it was slow
    during = [t for t in arrivals if start <= t <= end]
    gaps = [b - a for a, b in zip([start, *during], [*during, end])]
    assert len(during) >= 10, f"only {len(during)} tokens arrived during a {end - start:.2f} s load"
    assert max(gaps) < link.delay_s / 2, f"tokens stalled for {max(gaps):.2f} s during a {end - start:.2f} s load"
