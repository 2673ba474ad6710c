"""The router's configuration: one typed object, from the environment (FLORA_ROUTER_*) or code.

The registry's address comes from the adapter store's own settings (FLORA_REDIS_URL, ...:
adapters_store/settings.py), so `adapterctl` and the router always agree on it.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RequestLimits(BaseSettings):
    """What a request may ask for; anything beyond is INVALID_ARGUMENT naming the field."""

    model_config = SettingsConfigDict(env_prefix="FLORA_ROUTER_", frozen=True, extra="ignore")

    max_prompt_chars: int = Field(32768, ge=1)
    max_new_tokens: int = Field(2048, ge=1)
    max_temperature: float = Field(2.0, gt=0)
    max_stop_strings: int = Field(4, ge=0)
    max_stop_chars: int = Field(64, ge=1)


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLORA_ROUTER_", frozen=True, extra="ignore")

    listen: str = Field("127.0.0.1:50051", description="host:port the gateway's gRPC API listens on")
    worker_address: str = Field("127.0.0.1:9000", description="Ray Serve's gRPC proxy")
    worker_app: str = Field("worker", description="the worker application's name in Ray Serve")
    default_timeout_s: float = Field(600.0, gt=0, description="a request's deadline when the client sets none")
    max_metadata_bytes: int = Field(8192, ge=1024, description="larger request metadata is refused by gRPC")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics, on the host of `listen` (0: any free port)")
    metrics_max_tenants: int = Field(100, ge=0, description="tenants with their own metrics label; later ones are counted as 'other'")
    cache_ttl_s: float = Field(60.0, gt=0, description="keys and tenants are re-read after this even without a change notice")
    limits: RequestLimits = Field(default_factory=RequestLimits)
