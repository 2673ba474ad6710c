"""The worker's configuration: one typed object, from the environment (FLORA_WORKER_*) or code.

The driver that deploys the worker builds it (`WorkerSettings()` reads the environment,
validated at start with messages that name the variable) and hands it to the Ray Serve
deployment, so replicas never read the environment themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.env import cache_root

MiB = 1024 * 1024

# The linears each model family can carry adapters on, when `adapter_modules` is empty.
FAMILY_MODULES = {
    "gpt_bigcode": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}  # fmt: skip


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLORA_WORKER_", frozen=True, extra="forbid")

    # The engine.
    model: str = Field("smollm2", description="a Hugging Face checkpoint directory, or 'smollm2' (the packaged SmolLM2-135M)")
    adapter_modules: tuple[str, ...] = Field((), description="module types that can carry adapters; empty: every linear of the model family")
    quantization: Literal["none", "int8"] = "none"
    lora_dtype: Literal["auto", "bfloat16", "int8"] = "auto"
    threads: int = Field(2, ge=1, description="torch threads per replica (also the CPUs it asks Ray for)")
    kv_cache_mib: int = Field(256, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    slots_per_pool: int = Field(8, ge=1, description="adapters of one (kind, rank) resident in engine slots at once")
    max_rank: int = Field(16, ge=1, description="pools at ranks 1, 2, 4, ... up to this")
    stream_interval_ms: int = Field(0, ge=0, description="a stream's tokens go out at most once per interval "
                                    "(0: every engine step); first and last never wait. Fewer messages, coarser streaming")

    # Adapter cache tiers below the engine's slots.
    ram_cache_mib: int = Field(1024, ge=1, description="decoded adapters kept in host memory")
    disk_cache_mib: int = Field(4096, ge=1, description="adapter files kept on local disk")
    disk_cache_dir: Path = Field(default_factory=lambda: cache_root() / "worker-adapters")

    # Prometheus (docs/metrics.md).
    metrics_host: str = Field("127.0.0.1", description="where a replica serves /metrics (0.0.0.0 where Prometheus scrapes pods)")
    metrics_port: int = Field(9466, ge=0, le=65535, description="a replica's /metrics; replicas sharing a node take the next "
                              "free ports, up to metrics_port + num_replicas - 1 (0: any free port)")

    # Ray Serve.
    app_name: str = "worker"
    grpc_port: int = Field(9000, ge=1, le=65535, description="Ray Serve's gRPC proxy")
    http_port: int = Field(8000, ge=1, le=65535, description="Ray Serve's HTTP proxy (health and Serve's own routes, on loopback)")
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(1024, ge=1, description="high: the engine admits requests, not Ray")

    @field_validator("app_name")
    @classmethod
    def _app_name(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"must be a plain identifier, got {value!r}")
        return value

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(1 << i for i in range(self.max_rank.bit_length()) if 1 << i <= self.max_rank)
