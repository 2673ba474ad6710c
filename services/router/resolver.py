"""Tenant -> its current adapter version and quota, cached; change notices drop a tenant's entry.

The version is resolved once per request and sent with it, so a request that started on
version N finishes on N even if the tenant's alias moves meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from adapters_store.errors import NotFoundError
from adapters_store.registry import Quota, Registry, VersionRecord
from services.router.cache import RegistryCache
from services.router.errors import GatewayError


@dataclass(frozen=True)
class TenantView:
    tenant: str
    adapter: VersionRecord | None  # None: the base model
    quota: Quota


class Resolver:
    def __init__(self, registry: Registry, ttl_s: float):
        self.registry = registry
        self.views: RegistryCache[str, TenantView] = RegistryCache(ttl_s)

    async def resolve(self, tenant: str) -> TenantView:
        try:
            return await self.views.get(tenant, lambda: self._read(tenant))
        except NotFoundError:
            raise GatewayError(grpc.StatusCode.NOT_FOUND, f"tenant {tenant} does not exist") from None

    def _read(self, tenant: str) -> TenantView:
        record = self.registry.tenant(tenant)
        adapter = None if record.alias is None else self.registry.resolve(record.alias)
        return TenantView(tenant, adapter, record.quota)

    def forget(self, tenant: str) -> None:
        self.views.drop(lambda t, view: t == tenant)
