"""The replica's adapter tiers seen through the whole gateway.

- A fresh tenant's adapter comes from the blob store on its first request and from host RAM on
  the next: the replica's counters say which tier served it.
- A cold adapter loads off the engine's step loop: another tenant's tokens keep flowing while
  several cold adapters load. To make a load long enough to see, this runs in a world beside the
  session `stack`: a second Serve application "far" on the same Ray cluster and proxy, with the
  same Redis and bucket, whose replica reaches S3 through a real TCP relay that holds each request
  (tests/slow_link.py), and a router for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from adapters_store.settings import Settings as StoreSettings
from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2
from services.router.server import RouterThread
from services.router.settings import RouterSettings
from services.worker.adapter_cache import CacheStats, Tier
from services.worker.app import build_app, wait_routable
from tests.gateway.helpers import Stack, Tenant, call_metadata, request
from tests.slow_link import SlowLink

APP = "far"
LINK_DELAY_S = 0.6  # every S3 request of the "far" replica waits this long


def generate(stack: Stack, tenant: Tenant, max_new_tokens: int = 4) -> gateway_pb2.GenerateResponse:
    return stack.stub().Generate(request(tenant, max_new_tokens=max_new_tokens), metadata=call_metadata(tenant), timeout=60)


def delta(before: CacheStats, after: CacheStats, counter: str) -> dict[Tier, int]:
    """What changed in one of the counters (hits, misses, evictions), by tier."""
    was, now = getattr(before, counter), getattr(after, counter)
    return {tier: now[tier] - was[tier] for tier in Tier if now[tier] != was[tier]}


def new_loads(before: CacheStats, after: CacheStats, source: Tier) -> list[float]:
    return after.load_seconds.get(source, [])[len(before.load_seconds.get(source, [])) :]


def test_fresh_adapter_comes_from_the_blob_store_once_then_from_ram(stack: Stack):
    tenant = stack.new_tenant(AdapterKind.LORA, rank=2, seed=11)
    before = stack.replica_stats().cache
    first = generate(stack, tenant)
    after_first = stack.replica_stats().cache
    second = generate(stack, tenant)
    after_second = stack.replica_stats().cache

    assert first.adapter.ref == second.adapter.ref == tenant.ref
    assert list(first.token_ids) == list(second.token_ids)  # same adapter, same greedy tokens, whichever tier
    assert delta(before, after_first, "hits") == {Tier.BLOB: 1}
    assert delta(before, after_first, "misses") == {Tier.RAM: 1, Tier.DISK: 1}
    assert len(new_loads(before, after_first, Tier.BLOB)) == 1
    assert delta(after_first, after_second, "hits") == {Tier.RAM: 1}  # no BLOB (nor DISK) hit
    assert delta(after_first, after_second, "misses") == {}
    assert new_loads(after_first, after_second, Tier.BLOB) == new_loads(after_first, after_second, Tier.DISK) == []


# ---- off the step loop -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def far(stack: Stack, store_settings: StoreSettings, s3_server, tmp_path_factory) -> Iterator[Stack]:
    """The "far" world: the session's Redis and bucket, S3 reached through a SlowLink."""
    from ray import serve

    workdir = tmp_path_factory.mktemp("far")
    link = SlowLink(s3_server.endpoint, LINK_DELAY_S)
    store = replace(store_settings, s3=replace(store_settings.s3, endpoint_url=link.endpoint))
    worker = stack.worker.model_copy(update={"app_name": APP, "disk_cache_dir": workdir / "disk-cache"})  # cold: a disk of its own
    serve.run(build_app(worker, store), name=APP, route_prefix=f"/{APP}")
    wait_routable(f"127.0.0.1:{worker.grpc_port}", APP, timeout_s=60)
    router = RouterThread(RouterSettings(listen="127.0.0.1:0", metrics_port=0, worker_address=f"127.0.0.1:{worker.grpc_port}", worker_app=APP), store)
    yield Stack(router, stack.store, worker, stack.model_dir, workdir)  # tenants are uploaded as for the session stack
    router.stop()
    serve.delete(APP)
    link.close()


class TimedRequests:
    """A tenant's streaming requests back to back on a thread until `stop()`, each chunk's arrival timed."""

    def __init__(self, world: Stack, tenant: Tenant):
        self.world, self.tenant = world, tenant
        self.arrivals: list[float] = []
        self.streaming, self._stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        stub, one = self.world.stub(), request(self.tenant, max_new_tokens=40, ignore_eos=True)
        while not self._stop.is_set():
            for _ in stub.GenerateStream(one, metadata=call_metadata(self.tenant), timeout=60):
                self.arrivals.append(time.perf_counter())
                self.streaming.set()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the streaming requests did not end within 60 s"


def test_cold_adapters_load_while_another_tenants_tokens_keep_flowing(far: Stack):
    warm = far.new_tenant(AdapterKind.FLORA, rank=1, seed=21)
    generate(far, warm)  # in the far replica's RAM from now on
    cold = [far.new_tenant(AdapterKind.LORA, rank=4, modules=("attn.c_attn", "mlp.c_fc"), seed=30 + i) for i in range(3)]
    before = far.replica_stats().cache

    flowing = TimedRequests(far, warm)
    try:
        assert flowing.streaming.wait(60), "the warm tenant's stream did not start"
        start = time.perf_counter()
        replies = run_together([lambda t=t: generate(far, t, max_new_tokens=2) for t in cold])
        end = time.perf_counter()
    finally:
        flowing.stop()

    after = far.replica_stats().cache
    assert [r.adapter.ref for r in replies] == [t.ref for t in cold]
    loads = new_loads(before, after, Tier.BLOB)
    assert len(loads) == 3 and min(loads) >= LINK_DELAY_S  # three cold loads, each slow
    during = [t for t in flowing.arrivals if start <= t <= end]
    gaps = [b - a for a, b in zip([start, *during], [*during, end])]
    assert len(during) >= 10, f"only {len(during)} chunks reached the warm tenant during {end - start:.2f} s of cold loads"
    assert max(gaps) < LINK_DELAY_S / 2, f"the warm tenant's tokens stalled {max(gaps):.2f} s while cold adapters loaded ({loads})"


def run_together(calls: list) -> list:
    """Each call on its own thread, started together; their results in order."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a cold tenant's request did not end within 60 s"
    return results
