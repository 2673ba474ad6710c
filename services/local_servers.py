"""Local stand-ins for the production stores, for a one-machine run and the benchmarks:
a `redis-server` subprocess on loopback, and moto's S3 server (a real S3 HTTP API)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_redis(data_dir: Path, port: int | None = None, timeout_s: float = 10.0) -> Iterator[str]:
    """A redis-server on 127.0.0.1 (append-only file in `data_dir`) -> its URL; stopped on exit."""
    import redis

    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (scripts/install-system-deps.sh installs it)")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--appendonly", "yes", "--save", ""]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_ping(redis.Redis(host="127.0.0.1", port=port), proc, timeout_s)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for_ping(client, proc: subprocess.Popen, timeout_s: float) -> None:
    import redis

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit code {proc.poll()}): is its port in use?") from None
            time.sleep(0.05)


@contextmanager
def local_s3(bucket: str) -> Iterator[str]:
    """moto's S3 server on a free loopback port with `bucket` created -> its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="local",
                     aws_secret_access_key="local").create_bucket(Bucket=bucket)  # fmt: skip
        yield endpoint
    finally:
        server.stop()
