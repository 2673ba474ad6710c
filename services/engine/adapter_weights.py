"""One adapter's tensors for one linear layer, as the engine takes them.

Shapes follow `adapter_format` (torch orientation, PEFT names). These are plain
values: where they came from (a file, S3, a test) is not the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.adapter_format import AdapterKind


@dataclass(frozen=True)
class FloraWeights:
    """W = W0 ∘ (b @ a)ᵀ, i.e. y = Σ_r a[r] ∘ ((x ∘ b[:, r]) @ W0ᵀ) + bias."""

    b: torch.Tensor  # [d_in, r]
    a: torch.Tensor  # [r, d_out]

    kind = AdapterKind.FLORA

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    @staticmethod
    def identity(d_in: int, d_out: int, rank: int, dtype: torch.dtype = torch.float32) -> "FloraWeights":
        """B = 1, A = 1/r: B A = 1 everywhere, so the adapted layer equals the base."""
        return FloraWeights(torch.ones(d_in, rank, dtype=dtype), torch.full((rank, d_out), 1.0 / rank, dtype=dtype))


@dataclass(frozen=True)
class LoraWeights:
    """W = W0 + scale · b @ a (PEFT: scale = alpha / r)."""

    a: torch.Tensor  # [r, d_in]   (PEFT lora_A.weight)
    b: torch.Tensor  # [d_out, r]  (PEFT lora_B.weight)
    scale: float

    kind = AdapterKind.LORA

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class Ia3Weights:
    """PEFT IA3: y = (x W0ᵀ + bias) ∘ l, or y = (x ∘ l) W0ᵀ + bias for feed-forward layers."""

    scale: torch.Tensor  # [d_in] if on_input else [d_out]
    on_input: bool

    kind = AdapterKind.IA3
    rank = 1


LayerAdapter = FloraWeights | LoraWeights | Ia3Weights
