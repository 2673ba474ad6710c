"""Random adapters for benchmarks: plausible magnitudes, one per request."""

from __future__ import annotations

import torch

from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.adapter_manager import Adapter
from services.engine.adapter_weights import FloraWeights, LayerAdapter, LoraWeights
from services.engine.layers import MultiAdapterLinear


def random_adapter(adapter_id: str, kind: AdapterKind, rank: int, layers: dict[str, MultiAdapterLinear], module_types: tuple[str, ...], seed: int) -> Adapter:
    """An adapter on every layer whose name ends with one of module_types."""
    gen = torch.Generator().manual_seed(seed)
    targets = {name: layer for name, layer in layers.items() if name.endswith(tuple("." + t for t in module_types))}
    weights = {name: _layer_adapter(kind, rank, layer, gen) for name, layer in targets.items()}
    alpha = 2.0 * rank if kind is AdapterKind.LORA else None
    return Adapter(adapter_id, AdapterSpec(kind, rank, tuple(targets), "benchmark", alpha), weights)


def _layer_adapter(kind: AdapterKind, rank: int, layer: MultiAdapterLinear, gen: torch.Generator) -> LayerAdapter:
    d_in, d_out = layer.d_in, layer.d_out
    if kind is AdapterKind.FLORA:  # B A close to 1: a trained multiplicative adapter stays near the base
        return FloraWeights(1 + 0.05 * torch.randn(d_in, rank, generator=gen), (1 + 0.05 * torch.randn(rank, d_out, generator=gen)) / rank)
    return LoraWeights(torch.randn(rank, d_in, generator=gen) / d_in**0.5, 0.01 * torch.randn(d_out, rank, generator=gen), 2.0)
