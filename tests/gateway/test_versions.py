"""A tenant's adapter version moving under the running router: an upload, `assign` and
`rollback` are served within a second (the registry's pub/sub notice drops the router's
cached view), each reply names the version that served it and carries that version's
tokens, and a request in flight across a switch finishes on the version it started with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from adapters_store.names import AdapterRef
from services.demo_adapters import write_synthetic_adapter
from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2, gateway_pb2_grpc
from tests.gateway.helpers import Stack, Tenant, call_metadata, request
from tests.gateway.tiny_model import BASE_MODEL_ID

PROMPT = "def fibonacci(n):"
SHORT = 8  # tokens: enough to tell two versions apart
LONG = 230  # tokens: a stream of several hundred milliseconds (the model's context is 256)
SWITCH_DEADLINE_S = 2.0  # how long a poll waits for the router to serve a new version
SWITCH_LIMIT_S = 1.0  # how soon it must


@dataclass(frozen=True)
class Served:
    ref: str  # the adapter version the reply names
    tokens: tuple[int, ...]


@pytest.fixture
def stub(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    channel = grpc.insecure_channel(stack.router.address)
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()


def generate(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, max_new_tokens: int = SHORT) -> Served:
    reply = stub.Generate(request(tenant, PROMPT, max_new_tokens), metadata=call_metadata(tenant), timeout=30)
    return Served(reply.adapter.ref, tuple(reply.token_ids))


def stream(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, max_new_tokens: int = LONG) -> Iterator[gateway_pb2.GenerateChunk]:
    return stub.GenerateStream(request(tenant, PROMPT, max_new_tokens), metadata=call_metadata(tenant), timeout=60)


def streamed(chunks: list[gateway_pb2.GenerateChunk]) -> Served:
    assert chunks[-1].finish_reason != gateway_pb2.FINISH_REASON_UNSPECIFIED
    return Served(chunks[0].adapter.ref, tuple(t for c in chunks for t in c.token_ids))


def upload_version(stack: Stack, tenant: Tenant, kind: AdapterKind, rank: int, seed: int, assign: bool = True) -> str:
    """A new synthetic version of the tenant's adapter, as `adapterctl upload` stores it; its ref."""
    path = write_synthetic_adapter(stack.workdir / f"{tenant.name}-{seed}.safetensors", kind, rank, ("attn.c_attn",),
                                   stack.model_dir, BASE_MODEL_ID, seed)  # fmt: skip
    result = stack.store.upload(stack.store.prepare(path), tenant.name, assign=assign)
    assert result.registration.added and result.registration.alias_moved == assign
    return str(result.registration.version.ref)


def served_within_a_second(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, ref: str) -> Served:
    """Poll until the tenant's requests are served by `ref`; fail unless that took under a second."""
    start = time.monotonic()
    while (served := generate(stub, tenant)).ref != ref:
        if time.monotonic() - start > SWITCH_DEADLINE_S:
            pytest.fail(f"{tenant.name} is still served by {served.ref} {SWITCH_DEADLINE_S} s after moving to {ref}")
        time.sleep(0.01)
    took = time.monotonic() - start
    assert took < SWITCH_LIMIT_S, f"the router took {took:.2f} s to serve {ref}"
    return served


def test_an_uploaded_version_is_served_next_and_assign_and_rollback_move_back_within_a_second(stack: Stack, stub):
    tenant = stack.new_tenant(AdapterKind.FLORA, seed=21)
    v1 = generate(stub, tenant)
    assert v1.ref == tenant.ref == f"{tenant.name}/default@1"  # and the router has cached it

    v2_ref = upload_version(stack, tenant, AdapterKind.LORA, rank=2, seed=22)
    assert v2_ref == f"{tenant.name}/default@2"
    v2 = served_within_a_second(stub, tenant, v2_ref)
    assert v2.ref.endswith("@2") and v2.tokens != v1.tokens
    reply = stub.Generate(request(tenant, PROMPT, SHORT), metadata=call_metadata(tenant), timeout=30)
    assert (reply.adapter.kind, reply.adapter.rank) == ("lora", 2)  # the version's own description

    registry = stack.store.registry
    assert registry.assign(tenant.name, "default", 1) == (AdapterRef(tenant.name, "default", 1), True)
    assert served_within_a_second(stub, tenant, v1.ref) == v1
    registry.assign(tenant.name, "default", 2)
    assert served_within_a_second(stub, tenant, v2_ref) == v2
    assert str(registry.rollback(tenant.name)) == v1.ref
    assert served_within_a_second(stub, tenant, v1.ref) == v1


def test_a_stream_in_flight_across_a_switch_finishes_on_the_version_it_started_with(stack: Stack, stub):
    tenant = stack.new_tenant(AdapterKind.FLORA, seed=1)
    v2_ref = upload_version(stack, tenant, AdapterKind.FLORA, rank=1, seed=31)
    served_within_a_second(stub, tenant, v2_ref)
    v2 = streamed(list(stream(stub, tenant)))  # each version's tokens alone
    stack.store.registry.rollback(tenant.name)
    served_within_a_second(stub, tenant, tenant.ref)
    v1 = streamed(list(stream(stub, tenant)))
    assert len(v1.tokens) > 100 and v1.tokens != v2.tokens  # a long stream, and the versions differ

    stack.replica_stats()  # a first call builds Ray's handle; the one below must be quick
    call = stream(stub, tenant)
    first = next(call)
    assert first.adapter.ref == tenant.ref  # admitted on v1, before the switch
    stack.store.registry.assign(tenant.name, "default", 2)
    assert stack.replica_stats().load.running >= 1  # v1's request was still generating when the alias moved
    served_within_a_second(stub, tenant, v2_ref)
    assert generate(stub, tenant, LONG) == v2  # new requests: v2, the same tokens as alone

    finished = streamed([first, *call])
    assert finished == v1  # the old one: v1 to the end
