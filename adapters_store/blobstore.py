"""Adapter blobs: content-addressed, immutable, verified on read.

A blob's key is its sha256 (`sha256/ab/abcdef...`), so identical bytes are
stored once, a key never changes meaning, and a reader can check what it got.
Two backends behind one interface:

  S3BlobStore     s3://BUCKET[/PREFIX], any S3 API (AWS, MinIO, moto) via a configurable endpoint;
                  multipart above a size threshold, per-request retries with exponential backoff
                  (botocore "standard" mode: connection errors, throttling, 5xx).
  LocalBlobStore  a directory (the embedded default for a laptop run); writes are
                  temp file + fsync + rename, so a crash never leaves a partial blob.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from adapters_store.errors import BlobStoreUnavailable, IntegrityError, NotFoundError, UsageError
from adapters_store.settings import S3Settings, Settings

Progress = Callable[[int], None]  # called with the number of bytes moved since the last call
CHUNK = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int
    uri: str
    reused: bool  # the blob was already stored: nothing was uploaded


def blob_key(sha256: str) -> str:
    if _SHA256.fullmatch(sha256) is None:
        raise UsageError(f"{sha256!r} is not a sha256 hex digest")
    return f"sha256/{sha256[:2]}/{sha256}"


class BlobStore(ABC):
    @abstractmethod
    def put(self, data: bytes, sha256: str, progress: Progress | None = None) -> BlobRef:
        """Store `data` under its sha256 unless it is already there (then nothing is sent)."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove a blob; removing a missing one is not an error."""

    @abstractmethod
    def uri(self, sha256: str) -> str: ...

    @abstractmethod
    def _chunks(self, sha256: str) -> Iterator[bytes]:
        """The stored bytes, unverified, in pieces."""

    def read(self, sha256: str, progress: Progress | None = None) -> bytes:
        return b"".join(self._verified(sha256, progress))

    def download(self, sha256: str, dest: Path, progress: Progress | None = None) -> int:
        """Write the blob to `dest` (atomically, only once verified); returns its size."""
        partial = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        size = 0
        try:
            with open(partial, "wb") as out:
                for chunk in self._verified(sha256, progress):
                    out.write(chunk)
                    size += len(chunk)
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)
        return size

    def _verified(self, sha256: str, progress: Progress | None) -> Iterator[bytes]:
        digest = hashlib.sha256()
        for chunk in self._chunks(sha256):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
            yield chunk
        if digest.hexdigest() != sha256:
            raise IntegrityError(f"blob {self.uri(sha256)} is corrupt: its content hashes to {digest.hexdigest()}")


def open_blob_store(settings: Settings) -> BlobStore:
    """The backend `settings.blob_url` names: s3://BUCKET[/PREFIX], file:///DIR or a directory path."""
    url = urlparse(settings.blob_url)
    if url.scheme == "s3":
        if not url.netloc:
            raise UsageError(f"blob URL {settings.blob_url!r} names no bucket (s3://BUCKET[/PREFIX])")
        return S3BlobStore(url.netloc, url.path.strip("/"), settings.s3)
    if url.scheme == "file":
        return LocalBlobStore(Path(unquote(url.path)))
    if url.scheme == "" and settings.blob_url:
        return LocalBlobStore(Path(settings.blob_url))
    raise UsageError(f"blob URL {settings.blob_url!r}: use s3://BUCKET[/PREFIX], file:///DIR or a directory path")


# ---- local directory ---------------------------------------------------------------------------


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path):
        self.root = root.expanduser().absolute()

    def _path(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    def put(self, data: bytes, sha256: str, progress: Progress | None = None) -> BlobRef:
        path = self._path(sha256)
        reused = path.is_file() and path.stat().st_size == len(data)
        if not reused:
            with _os_errors(f"write blob to {self.root}"):
                self._write(path, data, progress)
        elif progress:
            progress(len(data))
        return BlobRef(sha256, len(data), self.uri(sha256), reused)

    @staticmethod
    def _write(path: Path, data: bytes, progress: Progress | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.part-{os.getpid()}")
        try:
            with open(partial, "wb") as out:
                for start in range(0, len(data), CHUNK):
                    out.write(data[start : start + CHUNK])
                    if progress:
                        progress(len(data[start : start + CHUNK]))
                out.flush()
                os.fsync(out.fileno())
            partial.chmod(0o444)  # blobs are immutable
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        with _os_errors(f"delete blob from {self.root}"):
            self._path(sha256).unlink(missing_ok=True)

    def uri(self, sha256: str) -> str:
        return self._path(sha256).as_uri()

    def _chunks(self, sha256: str) -> Iterator[bytes]:
        try:
            handle = open(self._path(sha256), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {self.uri(sha256)} is missing from the blob store") from None
        with handle, _os_errors(f"read blob from {self.root}"):
            while chunk := handle.read(CHUNK):
                yield chunk


@contextmanager
def _os_errors(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise BlobStoreUnavailable(f"cannot {action}: {e.strerror or e}") from e


# ---- S3 ----------------------------------------------------------------------------------------


class S3BlobStore(BlobStore):
    def __init__(self, bucket: str, prefix: str, s3: S3Settings):
        import boto3  # imported here so that a local-only deployment does not need boto3 loaded
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.endpoint = bucket, prefix, s3.endpoint_url or "AWS S3"
        config = Config(
            region_name=s3.region,
            retries={"total_max_attempts": s3.max_attempts, "mode": "standard"},  # attempts, first included
            connect_timeout=s3.connect_timeout_s,
            read_timeout=s3.read_timeout_s,
            # Custom endpoints (MinIO, moto) rarely have per-bucket DNS names.
            s3={"addressing_style": "path" if s3.endpoint_url else "auto"},
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id=s3.access_key_id,
            aws_secret_access_key=s3.secret_access_key,
            config=config,
        )
        self._transfer = TransferConfig(multipart_threshold=s3.multipart_threshold, multipart_chunksize=s3.multipart_chunk)

    def _key(self, sha256: str) -> str:
        return f"{self.prefix}/{blob_key(sha256)}" if self.prefix else blob_key(sha256)

    def put(self, data: bytes, sha256: str, progress: Progress | None = None) -> BlobRef:
        reused = self._size(sha256) == len(data)
        if not reused:
            with self._errors(f"upload {self._key(sha256)}"):
                self._client.upload_fileobj(
                    io.BytesIO(data), self.bucket, self._key(sha256),
                    ExtraArgs={"Metadata": {"sha256": sha256}}, Callback=progress, Config=self._transfer,
                )  # fmt: skip
        elif progress:
            progress(len(data))
        return BlobRef(sha256, len(data), self.uri(sha256), reused)

    def _size(self, sha256: str) -> int | None:
        try:
            with self._errors(f"look up {self._key(sha256)}"):
                return self._client.head_object(Bucket=self.bucket, Key=self._key(sha256))["ContentLength"]
        except _NotThere:
            return None

    def exists(self, sha256: str) -> bool:
        return self._size(sha256) is not None

    def delete(self, sha256: str) -> None:
        with self._errors(f"delete {self._key(sha256)}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(sha256))

    def uri(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self._key(sha256)}"

    def _chunks(self, sha256: str) -> Iterator[bytes]:
        try:
            with self._errors(f"download {self._key(sha256)}"):
                body = self._client.get_object(Bucket=self.bucket, Key=self._key(sha256))["Body"]
                yield from body.iter_chunks(CHUNK)
        except _NotThere:
            raise NotFoundError(f"blob {self.uri(sha256)} is missing from the blob store") from None

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """botocore's exceptions -> the store's, with the endpoint and bucket in the message."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"bucket {self.bucket!r} at {self.endpoint}"
        try:
            yield
        except ClientError as e:
            raise self._client_error(e, action, where) from e
        except NoCredentialsError as e:
            hint = "set FLORA_S3_ACCESS_KEY_ID and FLORA_S3_SECRET_ACCESS_KEY"
            raise BlobStoreUnavailable(f"cannot {action}: no S3 credentials ({hint})") from e
        except (BotoCoreError, S3UploadFailedError) as e:
            raise BlobStoreUnavailable(f"cannot {action} in {where}: {e}") from e

    @staticmethod
    def _client_error(e, action: str, where: str) -> Exception:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return _NotThere()
        if code == "NoSuchBucket":
            return BlobStoreUnavailable(f"cannot {action}: {where} does not exist")
        message = e.response.get("Error", {}).get("Message", e)
        return BlobStoreUnavailable(f"cannot {action} in {where}: S3 refused ({code}: {message})")


class _NotThere(Exception):
    """A 404 for a key, translated by the caller (absent is normal for `exists`, an error for reads)."""
