"""Plain-torch, one-row-at-a-time references: the oracles for every kernel path.

Each row's effective weight matrix is materialized densely from the adapter's
original tensors (not from the slot storage), so a test against these also checks
loading, rank padding and scale folding.
"""

from __future__ import annotations

import torch

from services.engine.adapter_weights import FloraWeights, Ia3Weights, LayerAdapter, LoraWeights


def reference_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapter: LayerAdapter | None) -> torch.Tensor:
    """y [d_out] for one row x [d_in] under `adapter` (None: the base layer)."""
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    match adapter:
        case None:
            return weight @ x + b
        case FloraWeights(b=fb, a=fa):
            return (weight * (fb @ fa).T) @ x + b
        case LoraWeights(a=la, b=lb, scale=s):
            return (weight + s * (lb @ la)) @ x + b
        case Ia3Weights(scale=l, on_input=True):
            return weight @ (x * l) + b
        case Ia3Weights(scale=l, on_input=False):
            return (weight @ x + b) * l
    raise TypeError(f"unknown adapter type {type(adapter).__name__}")


def reference_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, adapters: list[LayerAdapter | None]
) -> torch.Tensor:
    """y [T, d_out] for x [T, d_in], row t under adapters[t]."""
    return torch.stack([reference_row(x[t], weight, bias, adapters[t]) for t in range(x.shape[0])])
