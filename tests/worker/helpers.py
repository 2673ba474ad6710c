"""Adapters in a real S3 API (moto) and an AdapterCache over a real engine, for the worker's tests."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from adapters_store.blobstore import S3BlobStore
from adapters_store.format import encode_adapter, load_layer_adapters
from services.demo_adapters import synthetic_adapter
from services.engine.adapter_format import AdapterKind
from services.engine.async_engine import AsyncEngine
from services.worker.adapter_cache import AdapterCache
from services.worker.disk_cache import DiskTier

CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


def unique_prefix() -> str:
    return f"worker-{uuid.uuid4().hex[:12]}"


class Adapters:
    """Adapter files uploaded to a blob store: FLoRA rank 1 on c_attn, one per seed, all the same size."""

    def __init__(self, model_dir: Path, blobs: S3BlobStore):
        self.model_dir, self.blobs = model_dir, blobs

    def data(self, seed: int, modules: tuple[str, ...] = ("attn.c_attn",)) -> bytes:
        return encode_adapter(*synthetic_adapter(AdapterKind.FLORA, 1, modules, self.model_dir, "tiny", seed))

    def upload(self, seed: int, modules: tuple[str, ...] = ("attn.c_attn",)) -> tuple[str, str]:
        """(ref, sha256) of adapter `seed`, now in the blob store."""
        data = self.data(seed, modules)
        sha256 = hashlib.sha256(data).hexdigest()
        self.blobs.put(data, sha256)
        return f"tenant{seed}/default@1", sha256

    @property
    def decoded_bytes(self) -> int:
        """What one adapter weighs in RAM: its decoded tensors' bytes (the RAM budget's unit)."""
        _, weights = load_layer_adapters(self.data(0))
        return sum(t.numel() * t.element_size() for w in weights.values() for t in (w.a, w.b))


def make_cache(engine: AsyncEngine, blobs, adapters: Adapters, tmp_path: Path, ram_adapters: float,
               on_load=lambda source, seconds: None) -> AdapterCache:  # fmt: skip
    """A cache whose RAM holds `ram_adapters` adapters; the disk holds plenty."""
    return AdapterCache(engine, blobs, DiskTier(tmp_path / "disk", 1 << 20), int(ram_adapters * adapters.decoded_bytes), on_load)


def registered(engine: AsyncEngine, ref: str) -> bool:
    return engine.engine.adapters.is_registered(ref)
