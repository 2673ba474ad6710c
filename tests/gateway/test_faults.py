"""Faults: what a client sees when a part of the gateway fails, and that the gateway recovers
by itself.

- A worker replica killed mid-stream: that client gets UNAVAILABLE (one line) at once (Ray
  reports the actor's death to the proxy, the router maps it), Ray Serve replaces the
  replica, and later requests succeed (meanwhile they wait in Serve's queue).
- S3 down while an adapter is cold: that tenant gets UNAVAILABLE naming its adapter, while
  a base-model tenant and a tenant whose adapter is warm are served at the same time; once
  S3 is back the cold tenant is served too.
- Redis restarted: the router keeps serving the tenants it has cached and says UNAVAILABLE
  ("the registry is unavailable") for the others; once Redis is back it follows change
  notices again and resolves new tenants, without a restart of its own.
- 100 clients cancelling mid-stream: afterwards the engine holds no request, KV block or
  adapter reference, and the router no in-flight count.

The destructive faults run in a world of their own beside the session `stack` (which other
test files share): a second Serve application "faults" on the same Ray cluster and gRPC
proxy, whose store is a redis-server of this module (with an append-only file, so a restart
keeps the registry) and a moto S3 server of this module, and a router for it. The
cancellations run on the session stack: they break nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc
import pytest

from adapters_store.settings import Settings as StoreSettings
from adapters_store.store import AdapterStore
from services.demo_adapters import write_synthetic_adapter
from services.engine.adapter_format import AdapterKind
from services.engine.engine import EngineLoad
from services.protos import gateway_pb2, gateway_pb2_grpc
from services.router.server import RouterThread
from services.router.settings import RouterSettings
from services.worker.app import build_app, wait_routable
from tests.adapters_store.helpers import RedisServer, S3Server, free_port, start_redis, stop_redis
from tests.gateway.helpers import Stack, Tenant, call_metadata, request
from tests.gateway.tiny_model import BASE_MODEL_ID

T = TypeVar("T")

APP = "faults"
BUCKET = "flora-faults"  # moto's state is per process: a bucket of our own, beside the session's
LONG_TTL_S = 600.0  # the faults router re-reads nothing on its own: a change it sees came as a notice
PROMPT = "def fibonacci(n):"
STREAM_TOKENS = 200
# (kind, rank, seed) of adapters whose greedy text for PROMPT on the tiny model runs past STREAM_TOKENS,
# so that a stream is still running when a test cuts it short.
LONG_TEXT = [(AdapterKind.FLORA, 1, 700), (AdapterKind.LORA, 2, 703), (AdapterKind.IA3, 1, 702), (AdapterKind.FLORA, 4, 700),
             (AdapterKind.LORA, 8, 700)]  # fmt: skip
CLIENTS = 100
REDIS_OPTIONS = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")  # every write on disk before its reply


# ---- the faults world ------------------------------------------------------------------------


class StoppableS3:
    """moto's S3 on a fixed port that can go away (connections refused) and come back. moto
    keeps its buckets in this process, so the restarted server serves the same objects."""

    def __init__(self, port: int):
        self.port, self._server = port, None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
        self._server._server.server_close()  # moto's stop() leaves the socket listening (connections would hang)


@dataclass
class Faults:
    world: Stack  # the "faults" app, its router, its store
    store_settings: StoreSettings
    redis: RedisServer
    s3: StoppableS3

    def stop_redis(self) -> None:
        stop_redis(self.redis)

    def restart_redis(self) -> None:
        """On the same port and directory: the append-only file brings the registry back."""
        self.redis = start_redis(self.redis.workdir, *REDIS_OPTIONS, port=self.redis.port)


@pytest.fixture(scope="module")
def faults(stack: Stack, store_settings: StoreSettings, tmp_path_factory) -> Iterator[Faults]:
    from ray import serve

    workdir = tmp_path_factory.mktemp("faults")
    (workdir / "redis").mkdir()
    redis = start_redis(workdir / "redis", *REDIS_OPTIONS)
    s3 = StoppableS3(free_port())
    S3Server(s3.endpoint).client().create_bucket(Bucket=BUCKET)
    # One try, a short connect timeout: an S3 outage shows at once instead of after retries.
    s3_settings = replace(store_settings.s3, endpoint_url=s3.endpoint, max_attempts=1, connect_timeout_s=0.5, read_timeout_s=5.0)
    store = replace(store_settings, redis_url=redis.url, blob_url=f"s3://{BUCKET}/{APP}", s3=s3_settings)
    # The same proxy serves every application; a disk cache of its own keeps our adapters cold.
    worker = stack.worker.model_copy(update={"app_name": APP, "disk_cache_dir": workdir / "disk-cache"})
    serve.run(build_app(worker, store), name=APP, route_prefix=f"/{APP}")
    wait_routable(f"127.0.0.1:{worker.grpc_port}", APP, timeout_s=60)
    router = RouterThread(router_settings(worker.grpc_port, LONG_TTL_S), store)
    fixture = Faults(Stack(router, AdapterStore.open(store), worker, stack.model_dir, workdir), store, redis, s3)
    yield fixture
    router.stop()
    serve.delete(APP)
    stop_redis(fixture.redis)
    s3.stop()


def router_settings(grpc_port: int, cache_ttl_s: float) -> RouterSettings:
    return RouterSettings(listen="127.0.0.1:0", metrics_port=0, worker_address=f"127.0.0.1:{grpc_port}", worker_app=APP, cache_ttl_s=cache_ttl_s)


# ---- requests and polls ----------------------------------------------------------------------


def generate(router: RouterThread, tenant: Tenant, max_new_tokens: int = 8, timeout_s: float = 30) -> gateway_pb2.GenerateResponse:
    with grpc.insecure_channel(router.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return stub.Generate(request(tenant, PROMPT, max_new_tokens), metadata=call_metadata(tenant), timeout=timeout_s)


def refused(router: RouterThread, tenant: Tenant) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        generate(router, tenant)
    return failed.value


def poll(what: str, attempt: Callable[[], T | None], deadline_s: float) -> tuple[T, float]:
    """(attempt()'s first result that is not None, seconds it took); fails after `deadline_s`."""
    start = time.monotonic()
    while (result := attempt()) is None:
        if time.monotonic() - start > deadline_s:
            pytest.fail(f"{what}: not within {deadline_s:.0f} s")
        time.sleep(0.1)
    return result, time.monotonic() - start


def served(router: RouterThread, tenant: Tenant, errors: list[str]) -> gateway_pb2.GenerateResponse | None:
    """The reply, or None (the error noted in `errors`) while the gateway is still recovering."""
    try:
        return generate(router, tenant)
    except grpc.RpcError as e:
        errors.append(f"{e.code().name}: {e.details()}")
        return None


def one_line(error: grpc.RpcError) -> str:
    details = error.details() or ""
    assert details and "\n" not in details, f"expected a one-line message, got {details!r}"
    return details


# ---- a replica killed mid-stream ---------------------------------------------------------------


def replica_actor(app: str) -> tuple[str, object]:
    """(name, handle) of the application's one live replica actor."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(names) == 1, f"expected one replica of {app!r}, found {names}"
    return names[0], ray.get_actor(names[0], namespace="serve")


def test_replica_killed_mid_stream_gives_unavailable_and_a_replacement_serves(faults: Faults):
    import ray

    world = faults.world
    kind, rank, seed = LONG_TEXT[1]  # a stream that would run on well past the kill
    tenant = world.new_tenant(kind, rank, seed=seed)
    assert generate(world.router, tenant).adapter.ref == tenant.ref  # warm, and the replica is up
    name, actor = replica_actor(APP)

    stream = world.stub().GenerateStream(request(tenant, PROMPT, STREAM_TOKENS), metadata=call_metadata(tenant), timeout=60)
    first = next(stream)
    assert first.token_ids and first.finish_reason == gateway_pb2.FINISH_REASON_UNSPECIFIED
    killed = time.monotonic()
    ray.kill(actor)
    with pytest.raises(grpc.RpcError) as failed:
        rest = list(stream)
        pytest.fail(f"the stream ended normally after the kill ({len(rest)} more chunks): it was too short")
    to_error = time.monotonic() - killed
    assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), one_line(failed.value)
    assert "replica" in one_line(failed.value)
    assert to_error < 5, f"the client waited {to_error:.1f} s for its error"

    errors: list[str] = []
    reply, to_served = poll("a request served after the kill", lambda: served(world.router, tenant, errors), deadline_s=60)
    assert reply.adapter.ref == tenant.ref and reply.token_ids
    assert replica_actor(APP)[0] != name  # a new replica, not the killed one back
    print(f"\nreplica kill: {failed.value.code().name} after {to_error:.2f} s; a replacement served after {to_served:.1f} s "
          f"({len(errors)} failed tries meanwhile: {sorted(set(errors))[:3]})")


# ---- S3 down while an adapter is cold ----------------------------------------------------------


def test_s3_down_while_an_adapter_is_cold_fails_that_tenant_only(faults: Faults):
    world = faults.world
    base, warm = world.new_tenant(None), world.new_tenant(AdapterKind.LORA, 2, seed=501)
    assert generate(world.router, warm).adapter.ref == warm.ref  # now in the replica's RAM and disk tiers
    cold = world.new_tenant(AdapterKind.FLORA, 2, seed=502)  # stored in S3, never requested

    faults.s3.stop()
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(3) as pool:  # all three at once: the failed fetch must not hold up the others
            cold_reply = pool.submit(refused, world.router, cold)
            others = [pool.submit(generate, world.router, t) for t in (base, warm)]
            error, (base_reply, warm_reply) = cold_reply.result(), [f.result() for f in others]
        elapsed = time.monotonic() - start
    finally:
        faults.s3.start()
    assert error.code() is grpc.StatusCode.UNAVAILABLE, one_line(error)
    assert f"adapter {cold.ref} cannot be fetched now" in one_line(error)
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert base_reply.token_ids and base_reply.adapter.ref == ""
    assert warm_reply.token_ids and warm_reply.adapter.ref == warm.ref

    reply = generate(world.router, cold)  # S3 is back: the failed fetch was not remembered
    assert reply.token_ids and reply.adapter.ref == cold.ref
    print(f"\nS3 down: the cold tenant got UNAVAILABLE ({error.details()}) with the others served, in {elapsed:.2f} s")


# ---- Redis restarted ---------------------------------------------------------------------------


def upload_version(world: Stack, tenant: Tenant, seed: int) -> str:
    """A new version of the tenant's adapter, made its current one; returns its ref."""
    path = write_synthetic_adapter(world.workdir / f"{tenant.name}-{seed}.safetensors", AdapterKind.LORA, 1,
                                   ("attn.c_attn",), world.model_dir, BASE_MODEL_ID, seed)  # fmt: skip
    return str(world.store.upload(world.store.prepare(path), tenant.name).registration.version.ref)


def test_redis_restart_router_serves_cached_tenants_then_follows_notices_again(faults: Faults):
    """While Redis is away the router (services/router/cache.py, changes.py):
    - serves every tenant whose key and adapter version it has cached, even entries past
      their TTL (a read that fails falls back to the cached value);
    - answers UNAVAILABLE "the registry is unavailable: ..." for keys and tenants not cached;
    - its change listener loses the subscription and retries with backoff (0.1 s up to 2 s).
    When Redis is back the listener subscribes again and drops every cached entry (notices
    published meanwhile were lost), so the next requests read the registry afresh and later
    notices are followed as before. The router itself is never restarted."""
    world = faults.world
    cached = world.new_tenant(AdapterKind.LORA, 1, seed=601)
    first_ref, second_ref = cached.ref, upload_version(world, cached, seed=602)
    unseen = world.new_tenant(None)  # exists in the registry, never asked for before the outage
    expiring = RouterThread(router_settings(world.worker.grpc_port, cache_ttl_s=0.5), faults.store_settings)
    try:
        for router in (world.router, expiring):
            assert generate(router, cached).adapter.ref == second_ref
        read_at = time.monotonic()
        listener = world.router.router.listener
        faults.stop_redis()
        try:
            assert generate(world.router, cached).adapter.ref == second_ref  # fresh cache entries
            time.sleep(max(0.0, 0.5 - (time.monotonic() - read_at)))  # the condition is time itself: the TTL passing
            assert generate(expiring, cached).adapter.ref == second_ref  # expired entries, served while Redis is away
            error = refused(world.router, unseen)
            assert error.code() is grpc.StatusCode.UNAVAILABLE and "the registry is unavailable" in one_line(error)
            _, noticed = poll("the change listener noticing Redis went away", lambda: (not listener.connected.is_set()) or None, 10)
        finally:
            faults.restart_redis()
        _, resubscribed = poll("the change listener subscribing again", lambda: listener.connected.is_set() or None, 15)
        # Caches were dropped on resubscribing: this reads the registry again, and caches the result for LONG_TTL_S.
        assert generate(world.router, cached).adapter.ref == second_ref
        world.store.registry.rollback(cached.name)  # only its notice can make the router see this
        _, followed = poll("the rollback's notice followed", lambda: generate(world.router, cached).adapter.ref == first_ref or None, 10)
        assert generate(world.router, unseen).adapter.ref == ""
        assert generate(world.router, world.new_tenant(None)).token_ids  # a tenant created after the restart
    finally:
        expiring.stop()
    print(f"\nRedis restart: an unseen tenant got UNAVAILABLE ({error.details()}); the listener saw the outage after "
          f"{noticed:.2f} s, subscribed {resubscribed:.2f} s after the restart, followed a rollback in {followed:.2f} s")


# ---- 100 clients cancelling mid-stream ---------------------------------------------------------


def long_streaming_tenants(stack: Stack) -> list[Tenant]:
    """Fresh tenants whose greedy text runs to max_new_tokens: a client cancelling after 1-3
    chunks is then mid-stream even when a busy engine packs many tokens into one chunk."""
    tenants = [stack.new_tenant(kind, rank, seed=seed) for kind, rank, seed in LONG_TEXT]
    stub = stack.stub()
    with ThreadPoolExecutor(len(tenants)) as pool:
        replies = pool.map(lambda t: stub.Generate(request(t, PROMPT, STREAM_TOKENS), metadata=call_metadata(t), timeout=60), tenants)
        for tenant, reply in zip(tenants, replies):
            assert reply.finish_reason == gateway_pb2.FINISH_REASON_LENGTH, f"{tenant.name}'s text ends early: choose another seed"
    return tenants


def stream_then_cancel(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, chunks: int, start: threading.Barrier) -> bool:
    """Read `chunks` chunks of a long stream, then cancel; True if it was cancelled mid-stream."""
    start.wait()
    call = stub.GenerateStream(request(tenant, PROMPT, STREAM_TOKENS), metadata=call_metadata(tenant), timeout=60)
    finished = False
    for _, chunk in zip(range(chunks), call):
        finished = chunk.finish_reason != gateway_pb2.FINISH_REASON_UNSPECIFIED
    call.cancel()
    return not finished


def engine_idle(stack: Stack) -> EngineLoad | None:
    load = stack.replica_stats().load
    return load if load.running == load.waiting == load.kv_blocks_used == load.adapter_refs == load.adapter_users == 0 else None


def test_hundred_clients_cancelling_mid_stream_leave_nothing_held(stack: Stack):
    tenants = long_streaming_tenants(stack)
    stack.replica_stats(reset_peaks=True)
    start = threading.Barrier(CLIENTS)
    with grpc.insecure_channel(stack.router.address) as channel, ThreadPoolExecutor(CLIENTS) as pool:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        calls = [pool.submit(stream_then_cancel, stub, tenants[i % len(tenants)], 1 + i % 3, start) for i in range(CLIENTS)]
        mid_stream = sum(c.result(timeout=120) for c in calls)
        cancelled = time.monotonic()
    assert mid_stream == CLIENTS, f"only {mid_stream} of {CLIENTS} streams were still running when cancelled"

    load, drained = poll("the engine releasing every cancelled request", lambda: engine_idle(stack), deadline_s=30)
    assert load.kv_blocks_total > 0
    peak = stack.replica_stats().steps.peak_batch_seqs
    assert peak > len(tenants), f"at most {peak} requests ran at once: the cancellations did not overlap"
    quotas = stack.router.router.gateway.quotas
    poll("the router's in-flight counts back to zero", lambda: all(quotas.in_flight[t.name] == 0 for t in tenants) or None, 10)
    reply = stack.stub().Generate(request(tenants[0], PROMPT, 8), metadata=call_metadata(tenants[0]), timeout=30)
    assert reply.token_ids and reply.adapter.ref == tenants[0].ref
    print(f"\n{CLIENTS} cancelled streams ({peak} at once in the engine): the engine was idle {drained:.2f} s after "
          f"the last cancel ({time.monotonic() - cancelled:.2f} s to all checks done)")
