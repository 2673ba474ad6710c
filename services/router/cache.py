"""An in-process cache of registry reads: fresh for `ttl_s`, then read again.

Reads run on a thread (the registry's client is synchronous). While the registry is
unreachable an expired entry is still served, so tenants already seen keep working
through a Redis restart; those never seen get UNAVAILABLE. Change notices drop entries
at once (`drop`), and a read that was in flight across a drop is not cached, so a notice
can never be overtaken by the older value it replaced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

from adapters_store.errors import RegistryUnavailable
from services.router.errors import GatewayError

K = TypeVar("K")
V = TypeVar("V")


class RegistryCache(Generic[K, V]):
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._entries: dict[K, tuple[V, float]] = {}  # key -> (value, when read)
        self._generation = 0  # bumped by every drop

    async def get(self, key: K, read: Callable[[], V]) -> V:
        """The cached value if fresh, else `read()` (on a thread): its exceptions pass through,
        except an unreachable registry, which falls back to a stale entry or UNAVAILABLE."""
        entry = self._entries.get(key)
        if entry is not None and self.clock() - entry[1] < self.ttl_s:
            return entry[0]
        generation = self._generation
        try:
            value = await asyncio.to_thread(read)
        except RegistryUnavailable as e:
            if entry is not None:
                return entry[0]
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"the registry is unavailable: {e}") from None
        if generation == self._generation:
            self._entries[key] = (value, self.clock())
        return value

    def drop(self, predicate: Callable[[K, V], bool]) -> None:
        self._generation += 1
        self._entries = {k: e for k, e in self._entries.items() if not predicate(k, e[0])}

    def clear(self) -> None:
        self.drop(lambda k, v: True)
