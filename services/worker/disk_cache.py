"""The local-disk tier: adapter files by sha256, least recently used first out, within a byte budget.

    <root>/sha256/ab/abcdef....safetensors

Content-addressed like the blob store, so a file never changes meaning and a read can
be checked against its name. Files are written to a temporary name and renamed, so a
crash never leaves half a file under a real name; what is on disk at start is indexed
(oldest access first) and counts against the budget. A pinned file (its adapter is in
use) is never evicted; a file that cannot fit beside the pinned ones is not kept.
Thread-safe: fetches run on worker threads, pins on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter, OrderedDict
from pathlib import Path


class DiskTier:
    def __init__(self, root: Path, budget_bytes: int):
        self.root, self.budget = root, budget_bytes
        self.files: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, least recently used first
        self.pins: Counter[str] = Counter()
        self.evictions = 0
        self._lock = threading.Lock()
        with self._lock:
            self._index()

    @property
    def used_bytes(self) -> int:
        return sum(self.files.values())

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / f"{sha256}.safetensors"

    def get(self, sha256: str) -> bytes | None:
        """The file's bytes if present and intact (a corrupt file is dropped: the caller refetches)."""
        with self._lock:
            return self._get(sha256)

    def put(self, sha256: str, data: bytes) -> bool:
        """Keep `data` (already verified against sha256); False if it cannot fit beside pinned files."""
        with self._lock:
            return self._put(sha256, data)

    def pin(self, sha256: str) -> None:
        with self._lock:
            self.pins[sha256] += 1

    def unpin(self, sha256: str) -> None:
        with self._lock:
            self.pins[sha256] -= 1
            if self.pins[sha256] <= 0:
                del self.pins[sha256]

    def _get(self, sha256: str) -> bytes | None:
        if sha256 not in self.files:
            return None
        try:
            data = self.path(sha256).read_bytes()
        except OSError:  # removed behind our back
            data = b""
        if hashlib.sha256(data).hexdigest() != sha256:
            self._drop(sha256)
            return None
        self.files.move_to_end(sha256)
        self._touch(sha256)
        return data

    def _touch(self, sha256: str) -> None:
        """Record the access on disk too, so the order survives a restart: the kernel's atime is
        not enough (relatime updates it at most once a day, noatime never)."""
        try:
            os.utime(self.path(sha256))
        except OSError:
            pass  # removed behind our back: the next get finds out

    def _put(self, sha256: str, data: bytes) -> bool:
        if sha256 in self.files:
            return True
        if not self._make_room(len(data)):
            return False
        path = self.path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.part-{os.getpid()}")
        partial.write_bytes(data)
        os.replace(partial, path)
        self.files[sha256] = len(data)
        return True

    def _make_room(self, size: int) -> bool:
        for sha in [s for s in self.files if not self.pins[s]]:  # least recently used first
            if self.used_bytes + size <= self.budget:
                break
            self._drop(sha)
            self.evictions += 1
        return self.used_bytes + size <= self.budget

    def _drop(self, sha256: str) -> None:
        self.files.pop(sha256, None)
        self.path(sha256).unlink(missing_ok=True)

    def _index(self) -> None:
        found = [(p.stat().st_atime, p.name.removesuffix(".safetensors"), p.stat().st_size)
                 for p in (self.root / "sha256").glob("*/*.safetensors")]  # fmt: skip
        for _, sha, size in sorted(found):
            self.files[sha] = size
        self._make_room(0)  # a smaller budget than last time
