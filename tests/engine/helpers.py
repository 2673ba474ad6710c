"""Random adapters and layouts shared by the engine tests."""

from __future__ import annotations

import torch

from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotLayout
from services.engine.adapter_weights import FloraWeights, Ia3Weights, LayerAdapter, LoraWeights


def random_adapter(kind: AdapterKind, rank: int, d_in: int, d_out: int, dtype: torch.dtype, gen: torch.Generator) -> LayerAdapter:
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, generator=gen)

    match kind:
        case AdapterKind.FLORA:
            # Near 1, like a trained multiplicative adapter: B A ≈ 1 + noise.
            return FloraWeights(1 + 0.3 * rnd(d_in, rank), (1 + 0.3 * rnd(rank, d_out)) / rank)
        case AdapterKind.LORA:
            return LoraWeights(rnd(rank, d_in) / d_in**0.5, rnd(d_out, rank), scale=2.0 / rank)
        case AdapterKind.IA3:
            on_input = bool(torch.randint(2, (1,), generator=gen))
            return Ia3Weights(1 + 0.5 * rnd(d_in if on_input else d_out), on_input=on_input)


def fill_slots(layout: SlotLayout, d_in: int, d_out: int, dtype: torch.dtype, gen: torch.Generator) -> dict[int, LayerAdapter]:
    """One random adapter per global slot, of a random rank that fits the slot's pool."""
    adapters = {}
    for slot in range(layout.num_slots):
        pool = layout.pools[layout.locate(slot)[0]]
        rank = int(torch.randint(1, pool.max_rank + 1, (1,), generator=gen))
        adapters[slot] = random_adapter(pool.kind, rank, d_in, d_out, dtype, gen)
    return adapters


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|: the relative error of the whole output."""
    return float((y - ref).abs().max() / ref.abs().max())
