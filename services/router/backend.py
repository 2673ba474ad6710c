"""The call to the workers: Ray Serve's gRPC proxy, the adapter version as `multiplexed_model_id`
so that Ray routes the request to a replica that already holds the adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.protos import worker_pb2, worker_pb2_grpc
from services.router.errors import GatewayError

# Worker statuses a client may see as they are; everything else is translated below.
_PASSED_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
}  # fmt: skip
# How Ray's proxy words a replica that died under a request (it answers INTERNAL).
_REPLICA_GONE = ("The actor died", "ActorDiedError", "ActorUnavailableError", "RayActorError")


class WorkerBackend:
    def __init__(self, address: str, app: str):
        self.address, self.app = address, app
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    async def generate(self, request: worker_pb2.WorkerRequest, timeout_s: float) -> AsyncIterator[worker_pb2.WorkerChunk]:
        """The worker's chunks; a failure is a GatewayError. Leaving early cancels the call, which
        cancels the request on the replica (its slot, KV blocks and adapter reference are freed)."""
        metadata = [("application", self.app)]
        if request.adapter.ref:
            metadata.append(("multiplexed_model_id", request.adapter.ref))
        call = self.stub.Generate(request, metadata=metadata, timeout=timeout_s)
        try:
            async for chunk in call:
                if chunk.token_ids or chunk.finish_reason:  # an empty chunk only carries an error status
                    yield chunk
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()  # a no-op once the call has ended

    def _error(self, e: grpc.aio.AioRpcError) -> GatewayError:
        code, details = e.code(), (e.details() or "").strip().splitlines()
        first = details[0] if details else code.name
        if code in _PASSED_THROUGH:
            return GatewayError(code, first)
        if code is grpc.StatusCode.NOT_FOUND:  # the proxy has no such application
            return GatewayError(grpc.StatusCode.UNAVAILABLE, f"the worker application {self.app!r} is not deployed at {self.address}")
        if any(word in (e.details() or "") for word in _REPLICA_GONE):
            return GatewayError(grpc.StatusCode.UNAVAILABLE, "the worker replica serving this request died; retry")
        return GatewayError(grpc.StatusCode.INTERNAL, f"worker error: {first[:300]}")

    async def close(self) -> None:
        await self.channel.close()
