"""The public Gateway gRPC service: proto in, delegate to Gateway, proto out, errors as statuses;
each request tracked by RouterMetrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.protos import gateway_pb2, gateway_pb2_grpc
from services.router.errors import GatewayError
from services.router.gateway import Gateway
from services.router.metrics import RouterMetrics
from services.router.translate import adapter_version, response, stream_chunk


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, gateway: Gateway, metrics: RouterMetrics):
        self.gateway, self.metrics = gateway, metrics

    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.GenerateResponse:
        with self.metrics.track("Generate") as tracked:
            try:
                view = await self.gateway.authorize(request, context.invocation_metadata())
                tracked.authorized(view.tenant)
                chunks = []
                async for chunk in self.gateway.forward(request, view, context.time_remaining()):
                    tracked.chunk(chunk)
                    chunks.append(chunk)
                return response(chunks, adapter_version(view.adapter))
            except GatewayError as e:
                tracked.failed(e)
                await context.abort(e.code, e.message)

    async def GenerateStream(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        with self.metrics.track("GenerateStream") as tracked:
            try:
                view = await self.gateway.authorize(request, context.invocation_metadata())
                tracked.authorized(view.tenant)
                adapter = adapter_version(view.adapter)
                async for chunk in self.gateway.forward(request, view, context.time_remaining()):
                    tracked.chunk(chunk)
                    yield stream_chunk(chunk, adapter)
                    adapter = None  # on the first chunk only
            except GatewayError as e:
                tracked.failed(e)
                await context.abort(e.code, e.message)
