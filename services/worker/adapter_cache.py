"""Where a replica's adapters come from: engine slots <- host RAM <- local disk <- blob store (S3).

    acquire(ref, sha256)   the adapter is registered in the engine (host RAM) and leased
    release(ref)           the lease ends; the adapter stays cached until pressure evicts it

The engine's own slots are the top tier (it loads a registered adapter into a slot when
a request is admitted, LRU among unused ones). This class keeps the tiers below:

- RAM: adapters registered in the engine, decoded, least recently used first out
  within a byte budget (their tensors' bytes);
- disk: the files, content-addressed (disk_cache.DiskTier);
- blob store: the store's S3 or local blobs, sha256-checked on read.

A cold adapter is fetched and decoded on a thread, off the event loop and off the
engine's step loop, so other tenants' tokens keep flowing while it loads; concurrent
requests for one cold adapter share one fetch. Nothing in use is evicted from any tier:
a leased adapter, or one the engine still has unfinished requests for (its reference
counts decide, not Ray Serve's multiplexing LRU), stays in RAM, and its file stays on disk.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from adapters_store.blobstore import BlobStore
from adapters_store.errors import AdapterValidationError
from adapters_store.format import load_layer_adapters
from services.engine.adapter_manager import Adapter
from services.worker.disk_cache import DiskTier
from services.worker.errors import status_for


class Tier(enum.Enum):
    RAM = "ram"
    DISK = "disk"
    BLOB = "blob"  # the blob store: S3 (or a local directory)


class EngineAdapters(Protocol):
    """The part of AsyncEngine the cache drives."""

    def add_adapter(self, adapter: Adapter) -> None: ...
    def remove_adapter(self, adapter_id: str) -> None: ...
    def adapter_in_use(self, adapter_id: str) -> bool: ...


class LoadFailure(enum.Enum):
    UNAVAILABLE = "unavailable"  # the blob store is down, or the blob is missing or corrupt
    INVALID = "invalid"  # the adapter does not fit this engine
    INTERNAL = "internal"

    @classmethod
    def of(cls, error: Exception, ref: str) -> LoadFailure:
        code = status_for(error, ref)[0]
        return {grpc.StatusCode.UNAVAILABLE: cls.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION: cls.INVALID}.get(code, cls.INTERNAL)


RECENT_LOADS = 256  # load times kept per source in CacheStats (every one goes to `on_load`)


def _by_tier() -> Counter[Tier]:
    return Counter({tier: 0 for tier in Tier})  # every key from the start: a reader on another thread never sees one added


@dataclass
class CacheStats:
    hits: Counter[Tier] = field(default_factory=_by_tier)  # served from this tier
    misses: Counter[Tier] = field(default_factory=_by_tier)  # not in this tier: asked the next one
    evictions: Counter[Tier] = field(default_factory=_by_tier)
    load_failures: Counter[LoadFailure] = field(default_factory=lambda: Counter({reason: 0 for reason in LoadFailure}))
    load_seconds: dict[Tier, list[float]] = field(default_factory=dict)  # fetch + decode, by source; the most recent
    resident_bytes: dict[Tier, int] = field(default_factory=dict)


@dataclass
class _InRam:
    sha256: str
    nbytes: int
    leases: int = 0


class AdapterCache:
    def __init__(self, engine: EngineAdapters, blobs: BlobStore, disk: DiskTier, ram_budget_bytes: int,
                 on_load: Callable[[Tier, float], None] = lambda source, seconds: None):  # fmt: skip
        """`on_load(source, seconds)`: every completed load (a server's metrics)."""
        self.engine, self.blobs, self.disk, self.ram_budget, self.on_load = engine, blobs, disk, ram_budget_bytes, on_load
        self.ram: OrderedDict[str, _InRam] = OrderedDict()  # adapter ref -> entry, least recently used first
        self.stats = CacheStats()
        self._loading: dict[str, asyncio.Task] = {}
        self._waiting: Counter[str] = Counter()  # adapter ref -> requests waiting for its fetch

    @property
    def ram_bytes(self) -> int:
        return sum(e.nbytes for e in tuple(self.ram.values()))  # tuple(): one step, safe while the event loop edits `ram`

    @asynccontextmanager
    async def lease(self, ref: str, sha256: str) -> AsyncIterator[None]:
        await self.acquire(ref, sha256)
        try:
            yield
        finally:
            self.release(ref)

    async def acquire(self, ref: str, sha256: str) -> None:
        """Make `ref` resident in the engine and hold it there until `release(ref)`."""
        if ref in self.ram:
            self.stats.hits[Tier.RAM] += 1
        else:
            self.stats.misses[Tier.RAM] += 1
            await self._loaded(ref, sha256)
        entry = self.ram[ref]
        entry.leases += 1
        self.disk.pin(entry.sha256)
        self.ram.move_to_end(ref)
        self._evict_ram()  # now that this one is leased, make room by others

    def release(self, ref: str) -> None:
        entry = self.ram[ref]
        entry.leases -= 1
        self.disk.unpin(entry.sha256)
        self._evict_ram()

    def snapshot(self) -> CacheStats:
        """A copy of the counters as of now (the caller may serialize it while requests go on)."""
        self.stats.resident_bytes = {Tier.RAM: self.ram_bytes, Tier.DISK: self.disk.used_bytes}
        self.stats.evictions[Tier.DISK] = self.disk.evictions
        return copy.deepcopy(self.stats)

    async def _loaded(self, ref: str, sha256: str) -> None:
        """Until `ref` is in RAM, sharing a fetch already under way. The adapter counts as in use
        meanwhile: between the fetch landing and this request resuming, another request may end
        and make room, and the adapter this one waits for must not be what goes."""
        if ref not in self._loading:
            self._loading[ref] = asyncio.create_task(self._load(ref, sha256))
        self._waiting[ref] += 1
        try:
            await asyncio.shield(self._loading[ref])  # a cancelled request does not cancel the others' fetch
        finally:
            self._waiting[ref] -= 1
            if not self._waiting[ref]:
                del self._waiting[ref]

    async def _load(self, ref: str, sha256: str) -> None:
        try:
            start = time.perf_counter()
            data, source = await self._fetch(sha256)
            spec, weights = await asyncio.to_thread(load_layer_adapters, data)
            adapter = Adapter(ref, spec, weights)
            try:  # on a thread too: the engine's lock is held for a whole step at a time
                await asyncio.to_thread(self.engine.add_adapter, adapter)
            except ValueError as e:  # targets a module this engine does not adapt, or a rank no pool holds
                raise AdapterValidationError(ref, [str(e)]) from None
            self._loaded_in(source, time.perf_counter() - start)
            self.ram[ref] = _InRam(sha256, _nbytes(adapter))
        except Exception as error:
            self.stats.load_failures[LoadFailure.of(error, ref)] += 1
            raise
        finally:
            del self._loading[ref]

    def _loaded_in(self, source: Tier, seconds: float) -> None:
        recent = self.stats.load_seconds.setdefault(source, [])
        recent.append(seconds)
        del recent[:-RECENT_LOADS]
        self.on_load(source, seconds)

    async def _fetch(self, sha256: str) -> tuple[bytes, Tier]:
        """(the adapter file, the tier it came from). Files are read on threads; the counters are
        kept here, on the event loop, because fetches of different adapters run side by side."""
        data, source = await asyncio.to_thread(self.disk.get, sha256), Tier.DISK
        if data is None:
            self.stats.misses[Tier.DISK] += 1
            data, source = await asyncio.to_thread(self._from_blobs, sha256), Tier.BLOB
        self.stats.hits[source] += 1
        return data, source

    def _from_blobs(self, sha256: str) -> bytes:
        data = self.blobs.read(sha256)  # sha256-checked
        self.disk.put(sha256, data)
        return data

    def _evict_ram(self) -> None:
        for ref in list(self.ram):  # least recently used first
            if self.ram_bytes <= self.ram_budget:
                return
            if self.ram[ref].leases == 0 and not self._waiting[ref] and not self.engine.adapter_in_use(ref):
                self.engine.remove_adapter(ref)
                del self.ram[ref]
                self.stats.evictions[Tier.RAM] += 1


def _nbytes(adapter: Adapter) -> int:
    return sum(t.numel() * t.element_size() for w in adapter.weights.values() for t in vars(w).values() if hasattr(t, "numel"))
