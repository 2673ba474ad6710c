"""What an adapter is, independent of where it is stored or how it is run.

Pure Python (no torch): the adapter store validates files against it and the
engine loads tensors by it. Orientation follows torch's `nn.Linear`
(`weight [d_out, d_in]`, `y = x @ weight.T + bias`) and PEFT's tensor names.

Per target module (a linear layer named like `transformer.h.0.attn.c_attn`) a file
holds, by kind:

  flora  `{module}.flora_B [d_in, r]`, `{module}.flora_A [r, d_out]`
         W_i = W0 ∘ (B A)ᵀ          (paper eq. 3-5; B = 1, A = 1/r is the identity)
  lora   `{module}.lora_A [r, d_in]`, `{module}.lora_B [d_out, r]`
         W_i = W0 + (alpha / r) B A  (PEFT's LoRA)
  ia3    `{module}.ia3_out [d_out]`   y = (x W0ᵀ + b) ∘ l   (PEFT IA3, ordinary layer)
         `{module}.ia3_in [d_in]`     y = (x ∘ l) W0ᵀ + b   (PEFT IA3, feed-forward layer)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

FORMAT_VERSION = 1


class AdapterKind(enum.Enum):
    FLORA = "flora"
    LORA = "lora"
    IA3 = "ia3"


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter's header: everything but the tensors."""

    kind: AdapterKind
    rank: int  # 1 for IA3 (a vector: "rank 0.5 FLoRA" in the paper)
    targets: tuple[str, ...]  # module names, e.g. ("transformer.h.0.attn.c_attn", ...)
    base_model: str
    alpha: float | None = None  # LoRA only; scale is alpha / rank

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AdapterKind):
            raise ValueError(f"kind must be an AdapterKind, got {self.kind!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.kind is AdapterKind.IA3 and self.rank != 1:
            raise ValueError(f"an ia3 adapter has rank 1, got {self.rank}")
        if not self.targets:
            raise ValueError("an adapter must target at least one module")
        if (self.kind is AdapterKind.LORA) != (self.alpha is not None):
            raise ValueError(f"alpha is required for lora and only for lora (kind={self.kind.value}, alpha={self.alpha})")

    @property
    def lora_scale(self) -> float:
        if self.alpha is None:
            raise ValueError(f"lora_scale is defined for lora adapters only, this one is {self.kind.value}")
        return self.alpha / self.rank


def tensor_names(kind: AdapterKind, module: str) -> tuple[str, ...]:
    """The tensor names a `kind` adapter holds for one target module (IA3: either one)."""
    suffixes = {
        AdapterKind.FLORA: ("flora_B", "flora_A"),
        AdapterKind.LORA: ("lora_A", "lora_B"),
        AdapterKind.IA3: ("ia3_out", "ia3_in"),
    }[kind]
    return tuple(f"{module}.{s}" for s in suffixes)
