"""Both blob store backends against the same contract; S3 through moto's real HTTP API."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from adapters_store.blobstore import BlobStore, LocalBlobStore, S3BlobStore, open_blob_store
from adapters_store.errors import BlobStoreUnavailable, IntegrityError, NotFoundError, UsageError
from adapters_store.settings import MiB, S3Settings, Settings
from tests.adapters_store.conftest import BUCKET
from tests.adapters_store.helpers import free_port


def _blob(size: int = 3000) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["s3", "local"])
def blobs(request, store_env, tmp_path) -> BlobStore:
    return open_blob_store(store_env.settings) if request.param == "s3" else LocalBlobStore(tmp_path / "blobs")


def _corrupt(blobs: BlobStore, sha: str, store_env) -> None:
    """Overwrite a stored blob behind the store's back (bit rot, tampering)."""
    if isinstance(blobs, S3BlobStore):
        store_env.s3.client().put_object(Bucket=BUCKET, Key=f"{store_env.prefix}/sha256/{sha[:2]}/{sha}", Body=b"evil")
    else:
        path = blobs.root / "sha256" / sha[:2] / sha
        path.chmod(0o644)
        path.write_bytes(b"evil")


def test_put_then_read_is_content_addressed_and_deduplicated(blobs):
    data, sha = _blob()
    first = blobs.put(data, sha)
    assert (first.sha256, first.size, first.reused) == (sha, len(data), False)
    assert first.uri.endswith(f"/sha256/{sha[:2]}/{sha}") and first.uri == blobs.uri(sha)
    assert blobs.exists(sha) and blobs.read(sha) == data
    assert blobs.put(data, sha).reused  # same bytes: nothing sent again


def test_download_is_verified_and_reports_progress(blobs, tmp_path):
    data, sha = _blob(2 * MiB + 5)
    blobs.put(data, sha)
    moved = []
    assert blobs.download(sha, tmp_path / "out.bin", moved.append) == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data and sum(moved) == len(data)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


def test_corrupt_blob_is_detected_on_read(blobs, store_env, tmp_path):
    data, sha = _blob()
    blobs.put(data, sha)
    _corrupt(blobs, sha, store_env)
    bad = hashlib.sha256(b"evil").hexdigest()
    with pytest.raises(IntegrityError, match=f"blob {blobs.uri(sha)} is corrupt: its content hashes to {bad}"):
        blobs.read(sha)
    with pytest.raises(IntegrityError):
        blobs.download(sha, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()  # a failed check writes nothing


def test_missing_blob_and_idempotent_delete(blobs):
    data, sha = _blob()
    with pytest.raises(NotFoundError, match=f"blob {blobs.uri(sha)} is missing"):
        blobs.read(sha)
    blobs.put(data, sha)
    blobs.delete(sha)
    blobs.delete(sha)  # deleting a missing blob is fine
    assert not blobs.exists(sha)


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABC", "ab" * 31])
def test_keys_must_be_sha256_digests(blobs, key):
    with pytest.raises(UsageError, match="is not a sha256 hex digest"):
        blobs.read(key)


def test_local_blobs_are_written_atomically_and_read_only(tmp_path):
    blobs, (data, sha) = LocalBlobStore(tmp_path), _blob()
    blobs.put(data, sha)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [tmp_path / "sha256" / sha[:2] / sha]
    assert files[0].stat().st_mode & 0o777 == 0o444


def test_s3_uses_multipart_above_the_threshold(store_env):
    # S3 parts are at least 5 MiB; 11 MiB in 5 MiB parts is three parts.
    settings = replace(store_env.settings, s3=replace(store_env.settings.s3, multipart_threshold=5 * MiB, multipart_chunk=5 * MiB))
    blobs, (data, sha) = open_blob_store(settings), _blob(11 * MiB)
    moved = []
    blobs.put(data, sha, moved.append)
    head = store_env.s3.client().head_object(Bucket=BUCKET, Key=f"{store_env.prefix}/sha256/{sha[:2]}/{sha}")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part multipart upload
    assert head["Metadata"] == {"sha256": sha} and sum(moved) == len(data)
    assert blobs.read(sha) == data


def test_s3_retries_with_backoff_then_reports_the_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    blobs = S3BlobStore(BUCKET, "p", S3Settings(endpoint_url=endpoint, max_attempts=3, connect_timeout_s=1,
                                                access_key_id="x", secret_access_key="y"))  # fmt: skip
    attempts = []
    blobs._client.meta.events.register("before-send.s3.*", lambda **kw: attempts.append(1))
    data, sha = _blob()
    with pytest.raises(BlobStoreUnavailable, match=f"cannot look up p/sha256/{sha[:2]}/{sha} in bucket 'flora-test' at {endpoint}"):
        blobs.put(data, sha)
    assert len(attempts) == 3


def test_s3_missing_bucket_is_named(store_env):
    settings = replace(store_env.settings, blob_url="s3://no-such-bucket/x")
    data, sha = _blob()
    with pytest.raises(BlobStoreUnavailable, match=r"cannot upload x/sha256/.*: bucket 'no-such-bucket' at http://127.0.0.1:\d+ does not exist"):
        open_blob_store(settings).put(data, sha)


def test_blob_urls_choose_the_backend(tmp_path):
    s3 = open_blob_store(Settings(blob_url="s3://bucket/some/prefix"))
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert open_blob_store(Settings(blob_url=f"file://{tmp_path}")).root == tmp_path
    assert open_blob_store(Settings(blob_url=str(tmp_path / "d"))).root == tmp_path / "d"
    with pytest.raises(UsageError, match="use s3://BUCKET"):
        open_blob_store(Settings(blob_url="gs://bucket"))
    with pytest.raises(UsageError, match="names no bucket"):
        open_blob_store(Settings(blob_url="s3:///prefix"))


def test_default_blob_store_is_a_local_directory(tmp_path):
    settings = Settings.from_env({"XDG_DATA_HOME": str(tmp_path)})
    assert open_blob_store(settings).root == Path(tmp_path) / "flora-gateway" / "blobs"
