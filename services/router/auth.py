"""API key -> tenant. Keys travel as `authorization: Bearer <key>` and are looked up by their
sha256 (the registry never stores a key itself); a key acts only for its own tenant."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from adapters_store.api_keys import hash_api_key
from adapters_store.registry import Registry
from services.router.cache import RegistryCache
from services.router.errors import GatewayError

Metadata = Sequence[tuple[str, str | bytes]]
_HINT = "send metadata 'authorization: Bearer <api key>'"


def bearer_token(metadata: Metadata) -> str:
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, f"missing API key: {_HINT}")
    scheme, _, token = str(values[0]).partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
        raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, f"malformed authorization metadata: {_HINT}")
    return token.strip()


class Authenticator:
    def __init__(self, registry: Registry, ttl_s: float):
        self.registry = registry
        self.tenants: RegistryCache[str, str | None] = RegistryCache(ttl_s)  # key sha256 -> tenant (None: no such key)

    async def tenant_of(self, metadata: Metadata) -> str:
        digest = hash_api_key(bearer_token(metadata))
        tenant = await self.tenants.get(digest, lambda: self.registry.tenant_for_key(digest))
        if tenant is None:
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid (rotated, or its tenant deleted?)")
        return tenant

    def forget_tenant(self, tenant: str) -> None:
        """Its key changed or it is gone: drop its keys, and unknown keys (one may be its new key)."""
        self.tenants.drop(lambda digest, owner: owner in (tenant, None))
