"""Per-step adapter metadata: built once per batch, read by every adapted layer.

Rows are ordered so that every pool's rows, and within a pool every adapter's
rows, are contiguous:

    [ no adapter | lora / ia3 pools ... | flora pools ... ]
    \\_______ base GEMM rows ________/   \\_ own matmuls _/

so the layers work on slices instead of scattered indices. The engine can hand
rows over already in this order (then `order` is None and nothing is permuted);
any other order is sorted once here and restored by the layer. FLoRA rows come
last because they never go through the plain base GEMM: their output is
Σ_r a_r ∘ ((x ∘ b_r) W0ᵀ), computed by their own kernel.

The kernel path of each pool group is chosen here, once per batch, by a cost
model (`cost_model.py`), never by branches inside the layers.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import NO_ADAPTER, SlotLayout


class KernelPath(enum.Enum):
    FLORA = "flora"  # per-row b/a gathered, r base matmuls stacked (paper eq. 6)
    FLORA_SEGMENT = "flora_segment"  # per adapter: W0 ∘ (B A)ᵀ merged, one GEMM per segment
    LORA_BMM = "lora_bmm"  # paper appendix A.2: per-row A/B gathered, two torch.bmm
    LORA_BGMV = "lora_bgmv"  # BGMV: per row, its A/B read in place by a fused C++ kernel
    LORA_SEGMENT = "lora_segment"  # SGMV-style: one (x A) B pair of GEMMs per adapter segment
    LORA_STACKED = "lora_stacked"  # the group's U adapters stacked: two GEMMs of U·R columns and a mask
    IA3 = "ia3"  # per-row scaling vectors


PATHS_BY_KIND: dict[AdapterKind, tuple[KernelPath, ...]] = {
    AdapterKind.FLORA: (KernelPath.FLORA, KernelPath.FLORA_SEGMENT),
    AdapterKind.LORA: (KernelPath.LORA_BMM, KernelPath.LORA_BGMV, KernelPath.LORA_SEGMENT, KernelPath.LORA_STACKED),
    AdapterKind.IA3: (KernelPath.IA3,),
}


@dataclass(frozen=True)
class GroupShape:
    """What a cost model needs to know about one pool's rows in one batch."""

    kind: AdapterKind
    rows: int  # n: rows using this pool
    adapters: int  # U: distinct adapters among them
    rank: int  # R: the pool's rank capacity (the rank it is computed at)
    d_in: int
    d_out: int


class PathChooser(Protocol):
    def choose(self, shape: GroupShape) -> KernelPath: ...


@dataclass(frozen=True)
class Segment:
    slot: int  # local slot in the pool
    start: int  # rows [start, end) of the sorted batch use this adapter
    end: int


@dataclass(frozen=True)
class PoolGroup:
    pool: int  # index into SlotLayout.pools
    path: KernelPath
    start: int  # rows [start, end) of the sorted batch use this pool
    end: int
    slots: torch.Tensor  # [end - start] int64, local slot of each row (ascending)
    segments: tuple[Segment, ...]  # one per distinct adapter, covering [start, end)
    slot_range: tuple[int, int] | None  # (lo, hi) when row i uses slot lo + i: gathers become slices

    def gather_adapters(self, stacked: torch.Tensor) -> torch.Tensor:
        """stacked[u] for the group's U distinct slots, in row order: a view when they are consecutive."""
        first, last = self.segments[0].slot, self.segments[-1].slot
        if last - first == len(self.segments) - 1:
            return stacked[first : last + 1]
        return stacked.index_select(0, torch.tensor([seg.slot for seg in self.segments], device=stacked.device))

    @functools.cached_property
    def adapter_mask(self) -> torch.Tensor:
        """[n, U] bool: row i uses the group's u-th distinct adapter."""
        sizes = torch.tensor([seg.end - seg.start for seg in self.segments])
        owner = torch.arange(len(self.segments)).repeat_interleave(sizes)  # [n]
        return torch.nn.functional.one_hot(owner, len(self.segments)).bool().to(self.slots.device)

    def gather(self, stacked: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """stacked[..., slots[i], ...] along `dim` for every row: a view when the slots are consecutive."""
        if self.slot_range is not None:
            return stacked.narrow(dim, self.slot_range[0], self.slot_range[1] - self.slot_range[0])
        return stacked.index_select(dim, self.slots)


@dataclass(frozen=True)
class AdapterBatch:
    num_rows: int  # T
    order: torch.Tensor | None  # [T] int64: sorted position -> original row; None if already sorted
    restore: torch.Tensor | None  # [T] int64: original row -> sorted position
    num_base_rows: int  # sorted rows [0, num_base_rows) go through the base GEMM (all but FLoRA)
    groups: tuple[PoolGroup, ...]  # in row order
    input_scaled: tuple[PoolGroup, ...]  # the IA3 groups: their GEMM input is scaled first

    @staticmethod
    def build(
        slot_ids: torch.Tensor | Sequence[int],
        layout: SlotLayout,
        chooser: PathChooser,
        d_in: int,
        d_out: int,
        device: torch.device | str = "cpu",
    ) -> "AdapterBatch":
        """Plan one batch. slot_ids [T]: global slot per row, -1 for no adapter."""
        slot_ids = _checked_slot_ids(slot_ids, layout)
        keys = _sort_keys(layout)[slot_ids + 1]  # [T]; index 0 of the table is "no adapter"
        order, restore = _ordering(keys, device)
        sorted_ids = slot_ids if order is None else slot_ids[order.cpu()]
        groups = _pool_groups(sorted_ids, layout, chooser, d_in, d_out, torch.device(device))
        flora_rows = sum(g.end - g.start for g in groups if layout.pools[g.pool].kind is AdapterKind.FLORA)
        return AdapterBatch(
            num_rows=len(slot_ids),
            order=order,
            restore=restore,
            num_base_rows=len(slot_ids) - flora_rows,
            groups=groups,
            input_scaled=tuple(g for g in groups if g.path is KernelPath.IA3),
        )


def _checked_slot_ids(slot_ids: torch.Tensor | Sequence[int], layout: SlotLayout) -> torch.Tensor:
    ids = torch.as_tensor(slot_ids).cpu()
    if ids.dim() != 1:
        raise ValueError(f"slot_ids must be 1-D (one slot per row), got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype is torch.bool:
        raise TypeError(f"slot_ids must be integers, got {ids.dtype}")
    ids = ids.long()
    bad = ((ids < NO_ADAPTER) | (ids >= layout.num_slots)).nonzero()
    if len(bad):
        row = int(bad[0])
        raise IndexError(
            f"slot_ids[{row}] = {int(ids[row])} is out of range: valid slots are -1 (no adapter) .. {layout.num_slots - 1}"
        )
    return ids


def slot_sort_key(layout: SlotLayout, slot: int) -> int:
    """Where rows of `slot` go in a batch's row order (see the module docstring)."""
    return int(_sort_keys(layout)[slot + 1])


@functools.cache
def _sort_keys(layout: SlotLayout) -> torch.Tensor:
    """[1 + num_slots] int64 sort key per slot id + 1: no adapter, then non-FLoRA pools, then FLoRA pools."""
    pool_rank = sorted(range(len(layout.pools)), key=lambda p: layout.pools[p].kind is AdapterKind.FLORA)
    keys = [torch.tensor([-1])]
    for p in range(len(layout.pools)):
        base = pool_rank.index(p) * layout.num_slots
        keys.append(torch.arange(layout.pools[p].num_slots) + base)
    return torch.cat(keys)


def _ordering(keys: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if bool((keys[1:] >= keys[:-1]).all()):
        return None, None
    order = torch.sort(keys, stable=True).indices
    restore = torch.empty_like(order)
    restore[order] = torch.arange(len(order))
    return order.to(device), restore.to(device)


def _pool_groups(
    sorted_ids: torch.Tensor, layout: SlotLayout, chooser: PathChooser, d_in: int, d_out: int, device: torch.device
) -> tuple[PoolGroup, ...]:
    unique, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    segments_by_pool: dict[int, list[Segment]] = {}
    start = 0
    for slot, count in zip(unique.tolist(), counts.tolist()):
        if slot != NO_ADAPTER:
            pool, local = layout.locate(slot)
            segments_by_pool.setdefault(pool, []).append(Segment(local, start, start + count))
        start += count
    return tuple(_group(pool, segs, sorted_ids, layout, chooser, d_in, d_out, device) for pool, segs in segments_by_pool.items())


def _group(pool, segments, sorted_ids, layout, chooser, d_in, d_out, device) -> PoolGroup:
    spec = layout.pools[pool]
    start, end = segments[0].start, segments[-1].end
    shape = GroupShape(spec.kind, end - start, len(segments), spec.max_rank, d_in, d_out)
    path = chooser.choose(shape)
    if path not in PATHS_BY_KIND[spec.kind]:
        raise ValueError(f"path {path.value} cannot run {spec.kind.value} adapters")
    local = sorted_ids[start:end] - layout.offsets[pool]
    consecutive = len(segments) == end - start and segments[-1].slot - segments[0].slot == end - start - 1
    slot_range = (segments[0].slot, segments[-1].slot + 1) if consecutive else None
    return PoolGroup(pool, path, start, end, local.to(device), tuple(segments), slot_range)
