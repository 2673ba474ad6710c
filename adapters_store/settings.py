"""The adapter store's configuration, from environment variables (read through services/env.py).

The variables below configure it; `adapterctl` has flags for the ones that
change between invocations, and flags win over the environment.

  FLORA_REDIS_URL              redis://127.0.0.1:6379/0
  FLORA_BLOB_URL               s3://BUCKET[/PREFIX] or file:///DIR or a plain directory path
                               (default: $XDG_DATA_HOME/flora-gateway/blobs, the embedded local store)
  FLORA_S3_ENDPOINT_URL        e.g. http://minio:9000 (unset: AWS)
  FLORA_S3_REGION              us-east-1
  FLORA_S3_ACCESS_KEY_ID       unset: boto3's default credential chain (AWS_* variables, profiles, roles)
  FLORA_S3_SECRET_ACCESS_KEY
  FLORA_S3_MAX_ATTEMPTS        5 (tries per request, the first included; exponential backoff between them)
  FLORA_BASE_MODEL             the deployment's base model id, e.g. bigcode/starcoderbase-1b
  FLORA_BASE_MODEL_CONFIG      its config.json (or the directory holding it)
  FLORA_MAX_RANK               64
  FLORA_MAX_ADAPTER_BYTES      268435456 (256 MiB)
  FLORA_MAX_HEADER_BYTES       1048576 (1 MiB)
  FLORA_DELETE_GRACE_S         60 (a version the alias left less than this ago may still serve requests)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.errors import UsageError
from services.env import environ

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What validation accepts; the caps bound the memory and time one upload can cost."""

    max_rank: int = 64
    max_file_bytes: int = 256 * MiB
    max_header_bytes: int = 1 * MiB
    # safetensors dtype names. Integer or 8-bit float adapters would be silently
    # wrong in the engine's float kernels, so they are refused up front.
    allowed_dtypes: tuple[str, ...] = ("F32", "F16", "BF16")

    def __post_init__(self) -> None:
        for name in ("max_rank", "max_file_bytes", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"limit {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    # S3 takes parts of at least 5 MiB; below the threshold one PUT is cheaper.
    multipart_threshold: int = 16 * MiB
    multipart_chunk: int = 8 * MiB


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    blob_url: str = ""
    s3: S3Settings = field(default_factory=S3Settings)
    base_model: str | None = None
    base_model_config: Path | None = None
    limits: Limits = field(default_factory=Limits)
    key_prefix: str = "flora"
    channel: str = "flora:changed"
    delete_grace_s: float = 60.0
    redis_timeout_s: float = 5.0

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> "Settings":
        env = environ() if env is None else env
        s3 = S3Settings(
            endpoint_url=env.get("FLORA_S3_ENDPOINT_URL") or None,
            region=env.get("FLORA_S3_REGION", "us-east-1"),
            access_key_id=env.get("FLORA_S3_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("FLORA_S3_SECRET_ACCESS_KEY") or None,
            max_attempts=_number(env, "FLORA_S3_MAX_ATTEMPTS", 5, int),
        )
        limits = Limits(
            max_rank=_number(env, "FLORA_MAX_RANK", 64, int),
            max_file_bytes=_number(env, "FLORA_MAX_ADAPTER_BYTES", 256 * MiB, int),
            max_header_bytes=_number(env, "FLORA_MAX_HEADER_BYTES", 1 * MiB, int),
        )
        config = env.get("FLORA_BASE_MODEL_CONFIG")
        return Settings(
            redis_url=env.get("FLORA_REDIS_URL", "redis://127.0.0.1:6379/0"),
            blob_url=env.get("FLORA_BLOB_URL") or _default_blob_dir(env),
            s3=s3,
            base_model=env.get("FLORA_BASE_MODEL") or None,
            base_model_config=Path(config) if config else None,
            limits=limits,
            delete_grace_s=_number(env, "FLORA_DELETE_GRACE_S", 60.0, float),
        )


def _default_blob_dir(env: Mapping[str, str]) -> str:
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(data_home) / "flora-gateway" / "blobs")


def _number(env: Mapping[str, str], name: str, default, kind):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None
    if value < 0:
        raise UsageError(f"environment variable {name}={raw!r} must not be negative")
    return value
