"""Backend faults: a clear error and exit code, and the registry never left half-changed."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from adapters_store.blobstore import S3BlobStore
from adapters_store.names import AdapterRef
from adapters_store.registry import Registry
from adapters_store.store import AdapterStore
from tests.adapters_store.conftest import BUCKET
from tests.adapters_store.helpers import free_port, run_cli, start_redis, stop_redis, write_adapter


def _snapshot(store_env) -> dict[str, bytes]:
    client = store_env.redis.client()
    return {key: client.dump(key) for key in client.keys("*")}


@pytest.fixture
def v1(store_env, tmp_path):
    """Tenant user42 on user42/default@1; returns the file of a different, valid version 2."""
    assert run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=1)).code == 0
    (tmp_path / "next").mkdir()
    return write_adapter(tmp_path / "next" / "user42.safetensors", seed=2)


def test_s3_unreachable_during_upload(store_env, v1, monkeypatch):
    before, objects = _snapshot(store_env), store_env.s3_keys()
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("FLORA_S3_ENDPOINT_URL", dead)
    result = run_cli("upload", v1)
    assert result.code == 6
    assert f"in bucket '{BUCKET}' at {dead}: Could not connect to the endpoint URL" in result.err
    assert _snapshot(store_env) == before and store_env.s3_keys() == objects


def test_s3_refusing_the_upload(store_env, v1, monkeypatch):
    before = _snapshot(store_env)
    monkeypatch.setenv("FLORA_BLOB_URL", "s3://no-such-bucket/x")
    result = run_cli("upload", v1)
    assert result.code == 6 and "bucket 'no-such-bucket' at http://127.0.0.1:" in result.err and "does not exist" in result.err
    assert _snapshot(store_env) == before


def test_redis_unreachable(store_env, tmp_path, monkeypatch):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("FLORA_REDIS_URL", dead)
    result = run_cli("upload", write_adapter(tmp_path / "user42.safetensors"))
    assert result.code == 6 and f"adapterctl: error: cannot reach Redis at {dead}: " in result.err
    assert store_env.s3_keys() == []  # checked before anything was stored
    listing = run_cli("list", "--json")
    assert listing.code == 6 and listing.json["error"]["type"] == "RegistryUnavailable"


def test_redis_dies_between_blob_and_registration(store_env, tmp_path, monkeypatch):
    """The worst moment: the blob is stored, then Redis goes away. The upload fails clearly; after
    Redis restarts (with its data: this server persists every write) the tenant is still on its old
    version and nothing points at the new blob. Retrying the upload then succeeds, reusing the blob."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = start_redis(workdir, "--appendonly", "yes", "--appendfsync", "always", "--save", "")
    try:
        monkeypatch.setenv("FLORA_REDIS_URL", server.url)
        assert run_cli("upload", write_adapter(tmp_path / "user42.safetensors", seed=1)).code == 0
        new = write_adapter(tmp_path / "new.safetensors", seed=2)

        put = S3BlobStore.put

        def put_then_kill_redis(self, *args, **kwargs):
            ref = put(self, *args, **kwargs)
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            return ref

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(S3BlobStore, "put", put_then_kill_redis)
            result = run_cli("upload", new, "--tenant", "user42")
        assert result.code == 6 and f"cannot reach Redis at {server.url}" in result.err

        server = start_redis(workdir, "--appendonly", "yes", "--appendfsync", "always", "--save", "", port=server.port)
        registry = Registry.connect(store_env.settings)
        assert registry.tenant("user42").alias == AdapterRef("user42", "default", 1)
        assert [r.version for r in registry.versions("user42", "default")] == [1]
        assert len(store_env.s3_keys()) == 2  # the orphan: unreferenced, immutable, harmless

        retry = run_cli("upload", new, "--tenant", "user42", "--json")
        assert retry.code == 0 and retry.json["blob_reused"] and retry.json["version"]["ref"] == "user42/default@2"
    finally:
        stop_redis(server)


def test_corrupt_blob_is_refused_on_download(store_env, v1, tmp_path):
    sha = run_cli("show", "user42", "--json").json["sha256"]
    store_env.s3.client().put_object(Bucket=BUCKET, Key=f"{store_env.prefix}/sha256/{sha[:2]}/{sha}", Body=b"tampered")
    result = run_cli("download", "user42", "-o", tmp_path / "out.safetensors")
    assert result.code == 7 and "is corrupt: its content hashes to" in result.err
    assert not (tmp_path / "out.safetensors").exists()


def test_delete_with_s3_down_deletes_the_version_and_keeps_the_blob(store_env, v1, monkeypatch):
    assert run_cli("upload", v1).code == 0  # user42 moves to version 2
    monkeypatch.setenv("FLORA_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    result = run_cli("delete", "user42/default@1")
    assert result.code == 0 and result.out.strip() == "deleted user42/default@1"
    assert "adapterctl: warning: blob " in result.err and " was kept: cannot delete " in result.err
    assert Registry.connect(store_env.settings).version("user42", "default", 1).status == "deleted"


def test_upload_racing_a_delete_of_the_same_bytes(store_env, tmp_path):
    """A delete of identical bytes is half done (registry says "deleting", blob still there) when an
    upload of those bytes arrives: the upload waits, stores the bytes again, and ends up readable."""
    source = write_adapter(tmp_path / "user42.safetensors")
    assert run_cli("upload", source, "--no-assign").code == 0
    store = AdapterStore.open(store_env.settings)
    sha, orphaned = store.registry.delete_version("user42", "default", 1)
    assert orphaned and store.registry.blob_deleting(sha)

    def finish_the_delete() -> None:
        time.sleep(0.3)
        store.blobs.delete(sha)
        store.registry.finish_blob_delete(sha)

    deleter = threading.Thread(target=finish_the_delete)
    deleter.start()
    result = run_cli("upload", source, "--json")
    deleter.join()
    assert result.code == 0, result.err
    assert result.json["version"]["ref"] == "user42/default@2"
    assert store.read(AdapterRef.parse("user42"))[1] == source.read_bytes()
