"""Follow the registry's change notices (Redis pub/sub) and drop what they make stale.

A thread blocks on the subscription and hands each notice's tenant to the event loop.
If Redis goes away the thread retries with backoff; once subscribed again it clears
every cache, because notices published meanwhile were lost. While Redis is away the
caches serve what they have (stale entries included), and tenants not cached get
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable

import redis

from adapters_store.errors import RegistryUnavailable
from adapters_store.registry import Registry

log = logging.getLogger(__name__)

BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0)


class ChangeListener:
    def __init__(self, registry: Registry, on_tenant: Callable[[str], None], on_resync: Callable[[], None]):
        self.registry, self.on_tenant, self.on_resync = registry, on_tenant, on_resync
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="registry-changes", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._listen()
            except (RegistryUnavailable, redis.RedisError, OSError) as e:
                failures = 0 if self.connected.is_set() else failures + 1
                self.connected.clear()
                if failures <= 1:
                    log.warning("registry change notices interrupted (%s); serving cached tenants until Redis is back", e)
            self._stop.wait(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])

    def _listen(self) -> None:
        pubsub = self.registry.subscribe()
        try:
            self._call(self.on_resync)  # whatever changed while we were not listening
            self.connected.set()
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._notice(message["data"])
        finally:
            pubsub.close()

    def _notice(self, data: str) -> None:
        """One notice: drop its tenant's entries. One we cannot read (another publisher on the
        channel, a newer format) drops everything rather than ending the subscription."""
        try:
            tenant = json.loads(data)["tenant"]
        except (ValueError, KeyError, TypeError, IndexError):
            log.warning("unreadable registry notice %.200r; dropping every cached tenant", data)
            self._call(self.on_resync)
            return
        self._call(self.on_tenant, str(tenant))

    def _call(self, fn: Callable, *args) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)
