"""The Ray Serve deployment: one engine per replica behind the internal Worker gRPC service.

Ray Serve's gRPC proxy calls `Generate` with the adapter version as the request's
`multiplexed_model_id`, so requests for an adapter go to a replica that already holds it.
The replica is a thin shell: adapter in (the cache's tiers), request in (the engine admits
it at its next step), chunks out: one per engine step, or per FLORA_WORKER_STREAM_INTERVAL_MS.
Errors become a status code and a
one-line message. A client that goes away cancels this generator, which aborts the
request in the engine: its batch slot, KV blocks and adapter reference are freed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

from ray import serve

from adapters_store.blobstore import open_blob_store
from adapters_store.settings import Settings as StoreSettings
from services.engine.async_engine import AsyncEngine
from services.engine.engine import EngineLoad, StepStats
from services.metrics_server import MetricsServer
from services.protos import worker_pb2
from services.worker.adapter_cache import AdapterCache, CacheStats
from services.worker.disk_cache import DiskTier
from services.worker.engine_setup import build_engine
from services.worker.errors import status_for
from services.worker.metrics import ReplicaMetrics
from services.worker.settings import MiB, WorkerSettings
from services.worker.translate import chunk, sampling_params

ADVERTISED_ADAPTERS = 1024  # ids a replica reports to Ray's router; what it holds is the cache's business


@dataclass(frozen=True)
class ReplicaStats:
    load: EngineLoad
    steps: StepStats
    cache: CacheStats


class WorkerReplica:
    def __init__(self, settings: WorkerSettings, store: StoreSettings):
        self.engine = AsyncEngine.build(lambda: build_engine(settings))
        self.stream_interval_s = settings.stream_interval_ms / 1000
        self.metrics = ReplicaMetrics()
        disk = DiskTier(settings.disk_cache_dir, settings.disk_cache_mib * MiB)
        self.cache = AdapterCache(self.engine, open_blob_store(store), disk, settings.ram_cache_mib * MiB, self.metrics.observe_load)
        self.metrics.watch(self.engine, self.cache)
        self.metrics_server = MetricsServer.start(self.metrics.registry, settings.metrics_host, settings.metrics_port, settings.num_replicas)

    async def Generate(self, request: worker_pb2.WorkerRequest, grpc_context) -> AsyncIterator[worker_pb2.WorkerChunk]:
        ref = request.adapter.ref
        try:
            params = sampling_params(request.sampling)
            async with AsyncExitStack() as stack:
                if ref:
                    await self.advertise(ref)
                    await stack.enter_async_context(self.cache.lease(ref, request.adapter.sha256))
                async for outputs in self.engine.stream(request.prompt, ref or None, params, self.stream_interval_s):
                    yield chunk(outputs)
        except Exception as error:  # every failure becomes a status; nothing else reaches the client
            code, message = status_for(error, ref)
            grpc_context.set_code(code)
            grpc_context.set_details(message)
            # Ray's proxy drops a status set by a stream that yields nothing: send one empty chunk.
            yield worker_pb2.WorkerChunk()

    async def advertise(self, ref: str) -> None:
        """Tell Ray's router this replica holds `ref` (its multiplexing LRU never unloads anything here)."""
        await self._multiplexed(ref)

    @serve.multiplexed(max_num_models_per_replica=ADVERTISED_ADAPTERS)
    async def _multiplexed(self, ref: str) -> str:
        return ref

    async def stats(self, reset_peaks: bool = False) -> ReplicaStats:
        """On the event loop, like the cache it reads (Ray runs plain methods on a thread pool)."""
        return ReplicaStats(self.engine.load(), self.engine.step_stats(reset_peaks), self.cache.snapshot())

    async def metrics_port(self) -> int:
        return self.metrics_server.port

    def __del__(self) -> None:
        self.metrics_server.stop()
        self.engine.shutdown()
