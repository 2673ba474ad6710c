"""A tiny GPTBigCode engine and adapters in the session's moto S3, for the worker's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store.blobstore import S3BlobStore
from adapters_store.settings import S3Settings
from services.engine.async_engine import AsyncEngine
from tests.adapters_store.helpers import BUCKET
from tests.engine.engine_fixtures import make_engine, save_tiny_gpt_bigcode
from tests.worker.helpers import CREDENTIALS, Adapters, unique_prefix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt_bigcode(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def engine(model_dir) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(make_engine(model_dir))
    yield engine
    engine.shutdown()


@pytest.fixture
def blobs(s3_server) -> S3BlobStore:
    """This test's own prefix in the session's moto S3."""
    return S3BlobStore(BUCKET, unique_prefix(), S3Settings(endpoint_url=s3_server.endpoint, max_attempts=2, **CREDENTIALS))


@pytest.fixture
def adapters(model_dir, blobs) -> Adapters:
    return Adapters(model_dir, blobs)
