"""The whole gateway on real parts, once per test session.

redis-server and moto's S3 server (tests/conftest.py), one local Ray cluster with Serve's
gRPC proxy and the worker application (a tiny GPTBigCode with a real BPE tokenizer), and
the router on its own event loop. Tenants are uploaded through the adapter store's own
upload path, the one `adapterctl upload` takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store.settings import S3Settings
from adapters_store.settings import Settings as StoreSettings
from adapters_store.store import AdapterStore
from services.router.server import RouterThread
from services.router.settings import RouterSettings
from services.worker.app import start_worker
from services.worker.settings import WorkerSettings
from tests.adapters_store.helpers import BUCKET, free_port
from tests.gateway.helpers import Stack
from tests.gateway.tiny_model import BASE_MODEL_ID, save_tiny_model

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """One local Ray cluster for the whole session (starting one costs ~5 s); yields the port of
    Ray's own metrics endpoint."""
    import ray
    from ray import serve

    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    yield metrics_port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def store_settings(redis_server, s3_server, tiny_model_dir) -> StoreSettings:
    s3 = S3Settings(endpoint_url=s3_server.endpoint, access_key_id="testing", secret_access_key="testing",
                    max_attempts=2, connect_timeout_s=1.0, read_timeout_s=5.0)  # fmt: skip
    return StoreSettings(redis_url=redis_server.url, blob_url=f"s3://{BUCKET}/gateway", s3=s3, base_model=BASE_MODEL_ID,
                         base_model_config=tiny_model_dir / "config.json", delete_grace_s=0)  # fmt: skip


@pytest.fixture(scope="session")
def stack(ray_cluster, store_settings, tiny_model_dir, tmp_path_factory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("gateway")
    worker = WorkerSettings(model=str(tiny_model_dir), threads=1, kv_cache_mib=16, max_rank=8, slots_per_pool=4,
                            disk_cache_dir=workdir / "disk-cache", grpc_port=free_port(), http_port=free_port(), metrics_port=0)  # fmt: skip
    start_worker(worker, store_settings)
    router = RouterThread(RouterSettings(listen="127.0.0.1:0", metrics_port=0, worker_address=f"127.0.0.1:{worker.grpc_port}"), store_settings)
    yield Stack(router, AdapterStore.open(store_settings), worker, tiny_model_dir, workdir)
    router.stop()
