"""Operations that span the registry and the blob store, ordered so they stay consistent.

Upload is all-or-nothing: validate everything first, check Redis is reachable,
store the blob (content-addressed, so a retry or a duplicate costs nothing),
then record the version and move the alias in one registry script. A failure
before that script leaves the registry exactly as it was (at worst an
unreferenced blob, which the same bytes will reuse later); a failure in it
records nothing. The registry never points at a blob that is not completely stored.

Delete goes the other way: the registry first (it refuses while a version is
referenced), the blob last and only when no live version uses it any more.
Deleting a tenant is one registry step for all of its versions, then the same
blob clean-up for each blob they leave unused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from adapters_store.api_keys import new_api_key
from adapters_store.blobstore import BlobRef, BlobStore, Progress, open_blob_store
from adapters_store.errors import BackendUnavailable, ConflictError, NotFoundError, UsageError
from adapters_store.names import AdapterRef, check_name
from adapters_store.peft_import import is_peft_dir, normalize_peft_dir
from adapters_store.registry import BlobBusy, Quota, Registration, Registry, VersionRecord
from adapters_store.settings import Limits, Settings
from adapters_store.validation import BaseModel, ValidatedAdapter, validate_bytes, validate_file

SUFFIX = ".safetensors"
_BLOB_BUSY_ATTEMPTS = 4


def prepare(source: Path, base: BaseModel, limits: Limits, base_model: str | None = None) -> ValidatedAdapter:
    """A file or PEFT directory, normalized and validated; nothing is stored."""
    if is_peft_dir(source):
        return validate_bytes(normalize_peft_dir(source, limits, base_model), str(source), base, limits)
    if source.is_dir():
        raise UsageError(f"{source} is a directory without adapter_config.json, not a PEFT adapter directory")
    if base_model is not None:
        raise UsageError("--base-model applies to PEFT directories; a .safetensors adapter names its base model in its header")
    return validate_file(source, base, limits)


def default_tenant(source: Path) -> str:
    """`user42.safetensors` -> `user42`; a PEFT directory -> its name."""
    stem = source.name.removesuffix(SUFFIX) if source.name.endswith(SUFFIX) else source.stem
    try:
        return check_name(stem)
    except UsageError as e:
        raise UsageError(f"the tenant defaults to the file name's stem, but {e}; pass --tenant") from None


@dataclass(frozen=True)
class UploadResult:
    registration: Registration
    blob_reused: bool  # the bytes were already in the blob store
    api_key: str | None  # set when this upload created the tenant: shown once, stored only as a hash


@dataclass(frozen=True)
class DeleteResult:
    version: AdapterRef
    blob_deleted: bool
    warning: str | None = None  # the version is deleted but its blob could not be removed


class AdapterStore:
    def __init__(self, registry: Registry, blobs: BlobStore, settings: Settings):
        self.registry, self.blobs, self.settings = registry, blobs, settings

    @staticmethod
    def open(settings: Settings) -> "AdapterStore":
        return AdapterStore(Registry.connect(settings), open_blob_store(settings), settings)

    def base_model(self) -> BaseModel:
        return BaseModel.from_config(self.settings.base_model, self.settings.base_model_config)

    def prepare(self, source: Path, base_model: str | None = None) -> ValidatedAdapter:
        return prepare(source, self.base_model(), self.settings.limits, base_model)

    def upload(self, adapter: ValidatedAdapter, tenant: str, name: str = "default", assign: bool = True,
               progress: Progress | None = None) -> UploadResult:  # fmt: skip
        """Store a validated adapter as a new version of tenant/name (creating the tenant if needed)."""
        check_name(tenant)
        check_name(name, "adapter")
        self.registry.ping()  # fail before storing anything if the registry is down
        token, key_hash = new_api_key()
        blob, registration = self._store_and_register(adapter, tenant, name, assign, key_hash, progress)
        if not self.blobs.exists(adapter.sha256):
            # A delete of identical bytes finished between our put and our registration: store them once more.
            self.blobs.put(adapter.data, adapter.sha256)
        return UploadResult(registration, blob.reused, token if registration.tenant_created else None)

    def _store_and_register(self, adapter: ValidatedAdapter, tenant: str, name: str, assign: bool, key_hash: str,
                            progress: Progress | None) -> tuple[BlobRef, Registration]:  # fmt: skip
        for attempt in range(_BLOB_BUSY_ATTEMPTS - 1):
            try:
                return self._put_and_register(adapter, tenant, name, assign, key_hash, progress)
            except BlobBusy:
                # A delete of identical bytes is in flight; once it is done, the next put stores them again.
                time.sleep(0.2 * 2**attempt)
        return self._put_and_register(adapter, tenant, name, assign, key_hash, progress)

    def _put_and_register(self, adapter: ValidatedAdapter, tenant: str, name: str, assign: bool, key_hash: str,
                          progress: Progress | None) -> tuple[BlobRef, Registration]:  # fmt: skip
        blob = self.blobs.put(adapter.data, adapter.sha256, progress)
        spec, sha, size = adapter.spec, adapter.sha256, adapter.size
        return blob, self.registry.register(tenant, name, spec, sha, size, blob.uri, assign, key_hash)

    def resolve(self, ref: AdapterRef) -> VersionRecord:
        record = self.registry.resolve(ref)
        if record.status != "ready":
            raise NotFoundError(f"version {record.ref} was deleted")
        if record.blob_uri != self.blobs.uri(record.sha256):
            raise UsageError(f"{record.ref} is stored at {record.blob_uri}, but this store's blobs are at "
                             f"{self.blobs.uri(record.sha256)}: check --blob-url / FLORA_BLOB_URL")  # fmt: skip
        return record

    def download(self, record: VersionRecord, dest: Path, progress: Progress | None = None) -> int:
        """Write the version's bytes to `dest` after checking their sha256."""
        return self.blobs.download(record.sha256, dest, progress)

    def read(self, ref: AdapterRef) -> tuple[VersionRecord, bytes]:
        """A version's bytes, sha256-checked (what a worker loads with format.load_layer_adapters)."""
        record = self.resolve(ref)
        return record, self.blobs.read(record.sha256)

    def delete(self, ref: AdapterRef, force: bool = False) -> list[DeleteResult]:
        """One version, or every live version of an adapter; refused while referenced."""
        if ref.name is None:
            raise UsageError(f"delete needs TENANT/ADAPTER or TENANT/ADAPTER@VERSION, got {ref}")
        versions = [ref.version] if ref.version is not None else self._live_versions(ref)
        alias = self.registry.tenant(ref.tenant).alias
        if alias is not None and alias.name == ref.name and alias.version in versions:
            raise ConflictError(f"{alias} is the current adapter of tenant {ref.tenant}: "
                                "assign another version or roll back first")  # fmt: skip
        return [self._delete_version(AdapterRef(ref.tenant, ref.name, v), force) for v in versions]

    def _live_versions(self, ref: AdapterRef) -> list[int]:
        versions = [r.version for r in self.registry.versions(ref.tenant, ref.name) if r.status == "ready"]
        if not versions:
            raise NotFoundError(f"adapter {ref} has no live versions")
        return versions

    def _delete_version(self, ref: AdapterRef, force: bool) -> DeleteResult:
        sha, orphaned = self.registry.delete_version(ref.tenant, ref.name, ref.version, force)
        return self._finish_delete(ref, sha, orphaned)

    def _finish_delete(self, ref: AdapterRef, sha: str, orphaned: bool) -> DeleteResult:
        """After the registry deleted `ref`: delete its blob if no live version uses it any more
        (`orphaned`; the registry has flagged the blob as being deleted until we finish)."""
        if not orphaned:
            return DeleteResult(ref, blob_deleted=False)
        try:
            self.blobs.delete(sha)
        except BackendUnavailable as e:
            # The version is gone from the registry; an unreferenced blob is only wasted space.
            return DeleteResult(ref, blob_deleted=False, warning=f"blob {sha} was kept: {e}")
        finally:
            self.registry.finish_blob_delete(sha)
        return DeleteResult(ref, blob_deleted=True)

    # ---- tenants ----

    def create_tenant(self, tenant: str, quota: Quota = Quota()) -> str:
        """Create a tenant; returns its API key (the only time it is shown)."""
        token, key_hash = new_api_key()
        self.registry.create_tenant(check_name(tenant), key_hash, quota)
        return token

    def rotate_key(self, tenant: str) -> str:
        token, key_hash = new_api_key()
        self.registry.rotate_key(check_name(tenant), key_hash)
        return token

    def delete_tenant(self, tenant: str, force: bool = False) -> list[DeleteResult]:
        """Delete a tenant and its API key; refused while it has live versions unless `force`, which
        deletes them too (one result each) and then every blob no live version uses any more."""
        deleted = self.registry.delete_tenant(check_name(tenant), force)
        return [self._finish_delete(ref, sha, orphaned) for ref, sha, orphaned in deleted]
