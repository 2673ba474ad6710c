"""What the gateway tests share: the running stack, tenants, requests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapters_store.store import AdapterStore
from services.demo_adapters import write_synthetic_adapter
from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2, gateway_pb2_grpc
from services.router.server import RouterThread
from services.worker.deployment import ReplicaStats
from services.worker.settings import WorkerSettings
from tests.gateway.tiny_model import BASE_MODEL_ID

_names = itertools.count()


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key: str
    ref: str  # its current adapter version ("" on the base model)


@dataclass
class Stack:
    router: RouterThread
    store: AdapterStore
    worker: WorkerSettings
    model_dir: Path
    workdir: Path

    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(self.router.address))

    def replica_stats(self, reset_peaks: bool = False) -> ReplicaStats:
        from ray import serve

        return serve.get_app_handle(self.worker.app_name).stats.remote(reset_peaks).result()

    def upload(self, tenant: str, path: Path) -> str:
        """Upload an adapter file or PEFT directory as the store's upload does; returns the tenant's
        API key if this created the tenant."""
        result = self.store.upload(self.store.prepare(path), tenant)
        return result.api_key

    def new_tenant(self, kind: AdapterKind | None, rank: int = 1, modules: tuple[str, ...] = ("attn.c_attn",), seed: int = 0) -> Tenant:
        """A fresh tenant with a synthetic adapter (kind None: on the base model)."""
        name = f"t{next(_names)}-{kind.value if kind else 'base'}"
        if kind is None:
            return Tenant(name, self.store.create_tenant(name), "")
        path = write_synthetic_adapter(self.workdir / f"{name}.safetensors", kind, rank, modules, self.model_dir, BASE_MODEL_ID, seed)
        key = self.upload(name, path)
        return Tenant(name, key, str(self.store.registry.tenant(name).alias))


def call_metadata(tenant: Tenant) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tenant.api_key}"),)


def request(tenant: Tenant | str, prompt: str = "def fibonacci(n):", max_new_tokens: int = 12, **sampling) -> gateway_pb2.GenerateRequest:
    name = tenant.name if isinstance(tenant, Tenant) else tenant
    params = gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=sampling.pop("temperature", 0.0), **sampling)
    return gateway_pb2.GenerateRequest(tenant_id=name, prompt=prompt, sampling=params)


