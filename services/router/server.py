"""Assemble and run the router: the Gateway service, gRPC health checking and server reflection
(so `grpcurl` works), the registry's change notices and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters_store.registry import Registry
from adapters_store.settings import Settings as StoreSettings
from services.metrics_server import MetricsServer, host_port
from services.protos import gateway_pb2, gateway_pb2_grpc
from services.router.backend import WorkerBackend
from services.router.changes import ChangeListener
from services.router.gateway import Gateway
from services.router.metrics import RouterMetrics
from services.router.servicer import GatewayServicer
from services.router.settings import RouterSettings

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


@dataclass
class Router:
    server: grpc.aio.Server
    gateway: Gateway
    listener: ChangeListener
    port: int
    metrics_server: MetricsServer

    async def stop(self, grace_s: float = 5.0) -> None:
        self.listener.stop()
        await self.server.stop(grace_s)
        await self.gateway.backend.close()
        self.metrics_server.stop()


async def start_router(settings: RouterSettings, store: StoreSettings) -> Router:
    """Start serving on `settings.listen` (port 0: any free port; `Router.port` says which)."""
    registry = Registry.connect(store)
    gateway = Gateway(settings, registry, WorkerBackend(settings.worker_address, settings.worker_app))
    # Both limits: gRPC treats max_metadata_size alone as a soft limit (refused at random above it).
    limit = settings.max_metadata_bytes
    server = grpc.aio.server(options=[("grpc.max_metadata_size", limit), ("grpc.absolute_max_metadata_size", limit)])
    metrics = RouterMetrics(settings.metrics_max_tenants)
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(gateway, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen} (FLORA_ROUTER_LISTEN): address in use or not local")
    metrics_server = MetricsServer.start(metrics.registry, host_port(settings.listen)[0], settings.metrics_port)
    listener = ChangeListener(registry, gateway.tenant_changed, gateway.resync)
    listener.start(asyncio.get_running_loop())
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Router(server, gateway, listener, port, metrics_server)


class RouterThread:
    """The router on its own event loop in a background thread (for `make run` and tests)."""

    def __init__(self, settings: RouterSettings, store: StoreSettings):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router", daemon=True)
        self._thread.start()
        try:
            self.router: Router = asyncio.run_coroutine_threadsafe(start_router(settings, store), self.loop).result(timeout=30)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.router.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.router.stop(), self.loop).result(timeout=30)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def serve_forever(settings: RouterSettings, store: StoreSettings) -> None:
    router = await start_router(settings, store)
    try:
        await router.server.wait_for_termination()
    finally:
        await router.stop()
