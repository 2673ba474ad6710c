"""The adapter store's view of the session's real servers (tests/conftest.py).

Each test gets an empty Redis database and its own S3 prefix, and the
environment variables `adapterctl` reads point at both (see `store_env`).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters_store.settings import Settings
from tests.adapters_store.helpers import BASE_MODEL_ID, BUCKET, S3_CREDENTIALS, RedisServer, S3Server, write_tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("tiny-gptbigcode"))


@dataclass(frozen=True)
class StoreEnv:
    """One test's view of the servers, with `adapterctl`'s environment pointing at them."""

    redis: RedisServer
    s3: S3Server
    prefix: str  # this test's S3 key prefix
    base_model_dir: Path

    @property
    def settings(self) -> Settings:
        return Settings.from_env()

    def s3_keys(self) -> list[str]:
        listing = self.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def redis_keys(self) -> list[str]:
        return sorted(self.redis.client().keys("*"))


@pytest.fixture
def store_env(monkeypatch, redis_server, s3_server, base_model_dir) -> StoreEnv:
    redis_server.client().flushdb()
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    env = {
        "FLORA_REDIS_URL": redis_server.url,
        "FLORA_BLOB_URL": f"s3://{BUCKET}/{prefix}",
        "FLORA_S3_ENDPOINT_URL": s3_server.endpoint,
        "FLORA_S3_REGION": "us-east-1",
        "FLORA_S3_MAX_ATTEMPTS": "2",
        "FLORA_BASE_MODEL": BASE_MODEL_ID,
        "FLORA_BASE_MODEL_CONFIG": str(base_model_dir / "config.json"),
        "FLORA_DELETE_GRACE_S": "0",
        **S3_CREDENTIALS,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return StoreEnv(redis_server, s3_server, prefix, base_model_dir)
