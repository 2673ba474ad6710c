"""The worker's local-disk tier (DiskTier) on a real directory: files by sha256, checked on read,
least recently used first out within a byte budget, pinned files kept, and what is on disk at
start indexed and held to the (possibly smaller) budget."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from services.worker.disk_cache import DiskTier

SIZE = 1000  # bytes per test file: budgets below are counted in these


def blob(seed: int) -> tuple[str, bytes]:
    data = bytes([seed % 256]) * SIZE
    return hashlib.sha256(data).hexdigest(), data


A, B, C = blob(1), blob(2), blob(3)


def on_disk(root: Path) -> set[str]:
    """The sha256s of the finished files under `root` (temporary parts excluded)."""
    return {p.name.removesuffix(".safetensors") for p in (root / "sha256").glob("*/*.safetensors")}


def test_put_then_get_round_trips_under_the_content_address(tmp_path):
    disk = DiskTier(tmp_path, 10 * SIZE)
    sha, data = A
    assert disk.get(sha) is None
    assert disk.put(sha, data)
    assert disk.get(sha) == data
    assert disk.path(sha) == tmp_path / "sha256" / sha[:2] / f"{sha}.safetensors"
    assert on_disk(tmp_path) == {sha} and disk.used_bytes == SIZE
    assert not list(tmp_path.rglob(".*.part-*"))  # written under a temporary name, then renamed


def test_corrupt_file_is_detected_and_dropped(tmp_path):
    disk = DiskTier(tmp_path, 10 * SIZE)
    sha, data = A
    disk.put(sha, data)
    disk.path(sha).write_bytes(b"x" + data[1:])  # a flipped byte: the name no longer matches the content
    assert disk.get(sha) is None  # the caller refetches from the blob store
    assert not disk.path(sha).exists() and disk.used_bytes == 0
    assert disk.put(sha, data) and disk.get(sha) == data  # and the refetched copy is kept again


def test_least_recently_used_file_is_evicted_within_the_budget(tmp_path):
    disk = DiskTier(tmp_path, 2 * SIZE + SIZE // 2)  # room for two files
    disk.put(*A)
    disk.put(*B)
    assert disk.get(A[0]) == A[1]  # A is now the most recently used: B goes first
    assert disk.put(*C)
    assert on_disk(tmp_path) == {A[0], C[0]}
    assert disk.get(B[0]) is None
    assert disk.evictions == 1 and disk.used_bytes == 2 * SIZE <= disk.budget


def test_pinned_files_are_never_evicted(tmp_path):
    disk = DiskTier(tmp_path, 2 * SIZE)
    disk.put(*A)
    disk.put(*B)
    disk.pin(A[0])
    disk.pin(B[0])
    assert not disk.put(*C)  # cannot fit beside the two pinned files: not kept
    assert on_disk(tmp_path) == {A[0], B[0]} and disk.evictions == 0
    assert disk.used_bytes <= disk.budget

    disk.unpin(B[0])
    assert disk.put(*C)  # B is no longer in use: it makes room
    assert on_disk(tmp_path) == {A[0], C[0]} and disk.used_bytes <= disk.budget


def test_pins_count_users(tmp_path):
    disk = DiskTier(tmp_path, SIZE)
    disk.put(*A)
    disk.pin(A[0])
    disk.pin(A[0])  # two requests use it
    disk.unpin(A[0])
    assert not disk.put(*B)  # one user left: still pinned
    disk.unpin(A[0])
    assert disk.put(*B) and on_disk(tmp_path) == {B[0]}


def test_files_on_disk_at_start_are_indexed(tmp_path):
    first = DiskTier(tmp_path, 10 * SIZE)
    first.put(*A)
    first.put(*B)
    again = DiskTier(tmp_path, 10 * SIZE)  # a restarted replica over the same directory
    assert again.used_bytes == 2 * SIZE
    assert again.get(A[0]) == A[1] and again.get(B[0]) == B[1]


def test_a_smaller_budget_at_start_evicts_the_oldest_accessed_first(tmp_path):
    first = DiskTier(tmp_path, 10 * SIZE)
    for i, (sha, data) in enumerate([A, B, C]):
        first.put(sha, data)
        os.utime(first.path(sha), (1_000_000 + i * 10, 1_000_000 + i * 10))  # accessed in the order A, B, C
    smaller = DiskTier(tmp_path, 2 * SIZE)
    assert smaller.evictions == 1 and smaller.used_bytes == 2 * SIZE <= smaller.budget
    assert on_disk(tmp_path) == {B[0], C[0]}  # A, accessed longest ago, made room


def test_reads_before_a_restart_decide_what_a_smaller_budget_keeps(tmp_path):
    first = DiskTier(tmp_path, 10 * SIZE)
    for item in (A, B, C):
        first.put(*item)
    for sha in (A[0], B[0], C[0], A[0]):  # A read last: the least recently used is now B
        first.get(sha)
    smaller = DiskTier(tmp_path, 2 * SIZE)  # the order must survive the restart (relatime/noatime mounts)
    assert on_disk(tmp_path) == {C[0], A[0]} and smaller.evictions == 1
