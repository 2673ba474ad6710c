"""Preallocated, stacked adapter storage for one linear layer.

Adapters live in fixed "pools", one per (kind, rank capacity): loading an adapter
copies into a slot of an existing tensor and never reallocates. Grouping by rank
capacity is what keeps a rank-1 row from paying for a rank-16 neighbour: each pool
is computed at its own rank (see `adapter_batch`). An adapter of rank r < capacity R
is zero-padded, which adds exactly nothing:

  flora  Σ over the padded r-terms of a[r] ∘ ((x ∘ b[r]) W0ᵀ) with a[r] = 0
  lora   (x aᵀ) bᵀ with the padded rows of a and b zero

Global slot ids number the pools' slots one after another, in layout order; -1
means "no adapter".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from services.engine.adapter_format import AdapterKind
from services.engine.adapter_weights import FloraWeights, Ia3Weights, LayerAdapter, LoraWeights
from services.engine.base_weights import quantize_last_dim

NO_ADAPTER = -1


@dataclass(frozen=True)
class SlotPool:
    kind: AdapterKind
    max_rank: int  # adapters of rank <= max_rank live here, zero-padded (IA3: 1)
    num_slots: int

    def __post_init__(self) -> None:
        if self.max_rank < 1 or self.num_slots < 1:
            raise ValueError(f"a slot pool needs max_rank >= 1 and num_slots >= 1, got {self}")
        if self.kind is AdapterKind.IA3 and self.max_rank != 1:
            raise ValueError(f"an ia3 pool has max_rank 1, got {self.max_rank}")


@dataclass(frozen=True)
class SlotLayout:
    """Which pools exist; maps global slot ids to (pool, local slot)."""

    pools: tuple[SlotPool, ...]
    # LoRA pools' storage dtype, None: the layer's own. bf16 or int8 under fp32 layers halves or
    # quarters the bytes a decode step streams when every row reads its own adapter
    # (EngineConfig.lora_dtype).
    lora_dtype: torch.dtype | None = None

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """offsets[p] is pool p's first global slot; offsets[-1] the total."""
        starts = [0]
        for pool in self.pools:
            starts.append(starts[-1] + pool.num_slots)
        return tuple(starts)

    @property
    def num_slots(self) -> int:
        return self.offsets[-1]

    def locate(self, slot: int) -> tuple[int, int]:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is out of range [0, {self.num_slots})")
        pool = next(p for p in range(len(self.pools)) if slot < self.offsets[p + 1])
        return pool, slot - self.offsets[pool]

    def pool_for(self, kind: AdapterKind, rank: int) -> int:
        """The smallest-capacity pool that holds a `kind` adapter of `rank`."""
        fits = [p for p, pool in enumerate(self.pools) if pool.kind is kind and pool.max_rank >= rank]
        if not fits:
            capacities = [pool.max_rank for pool in self.pools if pool.kind is kind]
            raise ValueError(f"no {kind.value} pool holds rank {rank} (capacities: {capacities or 'none'})")
        return min(fits, key=lambda p: self.pools[p].max_rank)


class FloraPool:
    """b [R, S, d_in], a [R, S, d_out]: rank-major, so one rank's rows gather contiguously."""

    def __init__(self, pool: SlotPool, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device):
        shape = (pool.max_rank, pool.num_slots)
        self.b = torch.zeros(*shape, d_in, dtype=dtype, device=device)
        self.a = torch.zeros(*shape, d_out, dtype=dtype, device=device)

    def load(self, local: int, w: FloraWeights) -> None:
        _check_shape("flora_B", w.b, (self.b.shape[2], w.rank))
        _check_shape("flora_A", w.a, (w.rank, self.a.shape[2]))
        self.clear(local)
        self.b[: w.rank, local].copy_(w.b.T)
        self.a[: w.rank, local].copy_(w.a)

    def clear(self, local: int) -> None:
        self.b[:, local].zero_()
        self.a[:, local].zero_()


class LoraPool:
    """a [S, R, d_in] (lora_A), b [S, R, d_out] (scale · lora_Bᵀ: the scale is folded in at load).

    Stored in the layer's dtype, in bf16, or in int8 with one fp32 scale per (slot, rank row):
    a[s, r] ≈ a[s, r] (int8) · a_scale[s, r], symmetric absmax / 127, likewise b
    (`quantize_last_dim`; a_scale and b_scale [S, R] exist for int8 only).
    """

    def __init__(self, pool: SlotPool, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device):
        shape = (pool.num_slots, pool.max_rank)
        self.a = torch.zeros(*shape, d_in, dtype=dtype, device=device)
        self.b = torch.zeros(*shape, d_out, dtype=dtype, device=device)
        quantized = dtype is torch.int8
        self.a_scale = torch.zeros(shape, device=device) if quantized else None
        self.b_scale = torch.zeros(shape, device=device) if quantized else None

    def load(self, local: int, w: LoraWeights) -> None:
        _check_shape("lora_A", w.a, (w.rank, self.a.shape[2]))
        _check_shape("lora_B", w.b, (self.b.shape[2], w.rank))
        self.clear(local)
        b = w.b.T.to(torch.promote_types(w.b.dtype, torch.float32))  # scaled in >= fp32, rounded into the slot once
        self._store(self.a, self.a_scale, local, w.a)
        self._store(self.b, self.b_scale, local, w.scale * b)

    @staticmethod
    def _store(stored: torch.Tensor, scale: torch.Tensor | None, local: int, rows: torch.Tensor) -> None:
        """rows [r, d] into slot `local`'s first r rank rows (quantized for an int8 pool)."""
        if scale is None:
            stored[local, : len(rows)].copy_(rows)
            return
        q, row_scale = quantize_last_dim(rows)
        stored[local, : len(rows)].copy_(q)
        scale[local, : len(rows)].copy_(row_scale)

    def clear(self, local: int) -> None:
        self.a[local].zero_()
        self.b[local].zero_()
        if self.a_scale is not None:
            self.a_scale[local].zero_()
            self.b_scale[local].zero_()

    def read(self, pick: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the slots `pick` selects along dim 0, in `dtype` ([..., R, d_in], [..., R, d_out]):
        dequantized from int8, converted from bf16, as stored otherwise. For the kernel paths that
        gather slices; lora_bgmv reads the pool in place instead."""
        if self.a_scale is None:
            return pick(self.a).to(dtype), pick(self.b).to(dtype)
        a = pick(self.a).to(dtype) * pick(self.a_scale).unsqueeze(-1).to(dtype)
        b = pick(self.b).to(dtype) * pick(self.b_scale).unsqueeze(-1).to(dtype)
        return a, b


class Ia3Pool:
    """scale_in [S, d_in], scale_out [S, d_out]; the side an adapter does not use stays 1."""

    def __init__(self, pool: SlotPool, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device):
        self.scale_in = torch.ones(pool.num_slots, d_in, dtype=dtype, device=device)
        self.scale_out = torch.ones(pool.num_slots, d_out, dtype=dtype, device=device)

    def load(self, local: int, w: Ia3Weights) -> None:
        target = self.scale_in if w.on_input else self.scale_out
        _check_shape("ia3_in" if w.on_input else "ia3_out", w.scale, (target.shape[1],))
        self.clear(local)
        target[local].copy_(w.scale)

    def clear(self, local: int) -> None:
        self.scale_in[local].fill_(1)
        self.scale_out[local].fill_(1)


PoolStorage = FloraPool | LoraPool | Ia3Pool
_STORAGE = {AdapterKind.FLORA: FloraPool, AdapterKind.LORA: LoraPool, AdapterKind.IA3: Ia3Pool}


class LayerSlots:
    """All pools of one linear layer `[d_out, d_in]`; load/clear happen between steps."""

    def __init__(self, layout: SlotLayout, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.layout = layout
        self.d_in, self.d_out = d_in, d_out
        self.pools: list[PoolStorage] = [
            _STORAGE[pool.kind](pool, d_in, d_out, _storage_dtype(layout, pool, dtype), torch.device(device)) for pool in layout.pools
        ]

    def load(self, slot: int, weights: LayerAdapter) -> None:
        pool, local = self.layout.locate(slot)
        spec = self.layout.pools[pool]
        if weights.kind is not spec.kind:
            raise ValueError(f"slot {slot} belongs to a {spec.kind.value} pool, cannot load a {weights.kind.value} adapter")
        if weights.rank > spec.max_rank:
            raise ValueError(f"rank {weights.rank} exceeds slot {slot}'s capacity {spec.max_rank}")
        self.pools[pool].load(local, weights)

    def clear(self, slot: int) -> None:
        pool, local = self.layout.locate(slot)
        self.pools[pool].clear(local)


def _storage_dtype(layout: SlotLayout, pool: SlotPool, layer_dtype: torch.dtype) -> torch.dtype:
    if pool.kind is AdapterKind.LORA and layout.lora_dtype is not None:
        return layout.lora_dtype
    return layer_dtype


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
