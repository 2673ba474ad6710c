"""A request's way through the router: check, authenticate, resolve, admit, forward.

    view = await gateway.authorize(request, metadata)     # who, and on which adapter version
    async for chunk in gateway.forward(request, view, timeout_s): ...

Everything here raises GatewayError (a status code and a one-line message); the gRPC
servicer only translates messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from adapters_store.registry import Registry
from services.protos import gateway_pb2, worker_pb2
from services.router.auth import Authenticator, Metadata
from services.router.backend import WorkerBackend
from services.router.errors import GatewayError
from services.router.quotas import Quotas
from services.router.resolver import Resolver, TenantView
from services.router.settings import RouterSettings
from services.router.translate import worker_request
from services.router.validation import check_request


class Gateway:
    def __init__(self, settings: RouterSettings, registry: Registry, backend: WorkerBackend):
        self.settings, self.backend = settings, backend
        self.auth = Authenticator(registry, settings.cache_ttl_s)
        self.resolver = Resolver(registry, settings.cache_ttl_s)
        self.quotas = Quotas()

    async def authorize(self, request: gateway_pb2.GenerateRequest, metadata: Metadata) -> TenantView:
        check_request(request, self.settings.limits)
        key_owner = await self.auth.tenant_of(metadata)
        view = await self.resolver.resolve(request.tenant_id)
        if key_owner != view.tenant:
            raise GatewayError(grpc.StatusCode.PERMISSION_DENIED, f"this API key belongs to another tenant, not {view.tenant}")
        return view

    async def forward(self, request: gateway_pb2.GenerateRequest, view: TenantView, timeout_s: float | None) -> AsyncIterator[worker_pb2.WorkerChunk]:
        with self.quotas.admit(view.tenant, view.quota) as admission:
            timeout = timeout_s if timeout_s is not None else self.settings.default_timeout_s
            async for chunk in self.backend.generate(worker_request(request, view.adapter), timeout):
                admission.completion_tokens = chunk.completion_tokens
                yield chunk

    def tenant_changed(self, tenant: str) -> None:
        """A registry notice about `tenant`: its key, alias or quota may have moved."""
        self.auth.forget_tenant(tenant)
        self.resolver.forget(tenant)

    def resync(self) -> None:
        """Notices may have been missed (the subscription was down): forget everything."""
        self.auth.tenants.clear()
        self.resolver.views.clear()
