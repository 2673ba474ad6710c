"""Real servers shared by every test package, one of each per session.

- Redis: Debian's `redis-server` on a free loopback port, no persistence.
- S3: moto's `ThreadedMotoServer`, a real S3 HTTP API on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.adapters_store.helpers import BUCKET, RedisServer, S3Server, free_port, start_redis, stop_redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server")
    server = start_redis(tmp_path_factory.mktemp("redis"), "--save", "", "--appendonly", "no")
    yield server
    stop_redis(server)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(f"http://127.0.0.1:{port}")
    s3.client().create_bucket(Bucket=BUCKET)
    yield s3
    server.stop()


