"""GPTBigCode (StarCoder): multi-query attention, learned absolute positions, fused c_attn.

Same math as transformers' modeling_gpt_bigcode.py, rewritten for the engine's
flat ragged batch (nanoGPT-sized): tokens of all sequences are rows of one [T, d]
tensor, attention goes through the paged KV cache (`attention.paged_attention`).

    x = wte[ids] + wpe[positions]                      # [T, d]
    per block:  x += c_proj(attn(ln_1(x)));  x += mlp(ln_2(x))
    logits = ln_f(x) @ wteᵀ                            # lm_head tied to wte (the StarCoder default)

The fused c_attn output [T, d + 2·kv_dim] is split by views, never copied:
  multi_query   [ q (H·D) | k (D) | v (D) ]                 kv_heads = 1
  multi-head    [ q_0 k_0 v_0 | q_1 k_1 v_1 | ... ]         per-head interleaved (HF layout), kv_heads = H
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.engine.adapter_slots import SlotLayout
from services.engine.attention import paged_attention
from services.engine.context import get_attention_batch
from services.engine.layers import MultiAdapterLinear
from services.engine.model_shapes import ModelConfigError, read_bool, read_float, read_int
from services.engine.models import (
    ACTIVATIONS,
    BuildSpec,
    CausalLMBase,
    require_cache,
)

ADAPTER_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class GPTBigCodeConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    multi_query: bool
    activation_function: str
    layer_norm_epsilon: float
    scale_attn_weights: bool
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ModelConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise ModelConfigError(f"activation_function {self.activation_function!r} is not supported (supported: {sorted(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @staticmethod
    def from_hf(config: Mapping[str, Any]) -> "GPTBigCodeConfig":
        """From a Hugging Face config.json dict; defaults are transformers' GPTBigCodeConfig defaults."""
        d = read_int(config, "n_embd")
        if config.get("add_cross_attention"):
            raise ModelConfigError("GPTBigCode with cross-attention (add_cross_attention) is not supported")
        return GPTBigCodeConfig(
            vocab_size=read_int(config, "vocab_size"),
            n_positions=read_int(config, "n_positions"),
            n_embd=d,
            n_layer=read_int(config, "n_layer"),
            n_head=read_int(config, "n_head"),
            n_inner=read_int(config, "n_inner", default=4 * d),
            multi_query=read_bool(config, "multi_query", True),
            activation_function=config.get("activation_function", "gelu_pytorch_tanh"),
            layer_norm_epsilon=read_float(config, "layer_norm_epsilon", 1e-5),
            scale_attn_weights=read_bool(config, "scale_attn_weights", True),
            tie_word_embeddings=read_bool(config, "tie_word_embeddings", True),
        )


class Attention(nn.Module):
    def __init__(self, c: GPTBigCodeConfig, spec: BuildSpec):
        super().__init__()
        self.n_head, self.head_dim, self.kv_heads, self.multi_query = c.n_head, c.head_dim, c.kv_heads, c.multi_query
        self.scale = c.head_dim**-0.5 if c.scale_attn_weights else 1.0
        self.c_attn = spec.linear("attn.c_attn", c.n_embd, c.n_embd + 2 * c.kv_heads * c.head_dim, bias=True)
        self.c_proj = spec.linear("attn.c_proj", c.n_embd, c.n_embd, bias=True)
        self.k_cache: torch.Tensor | None = None  # [slots, kv_heads, head_dim], a view of the engine's cache
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d]"""
        q, k, v = self._split(self.c_attn(x))  # [T, H, D], [T, kvH, D], [T, kvH, D]
        y = paged_attention(q, k, v, require_cache(self.k_cache), self.v_cache, get_attention_batch(), self.scale)  # [T, H, D]
        return self.c_proj(y.flatten(1))

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [T, d + 2·kvH·D] -> views q [T, H, D], k [T, kvH, D], v [T, kvH, D]."""
        if self.multi_query:
            d = self.n_head * self.head_dim
            q, k, v = qkv.split((d, self.head_dim, self.head_dim), dim=1)
            return q.unflatten(1, (self.n_head, self.head_dim)), k.unsqueeze(1), v.unsqueeze(1)
        return qkv.unflatten(1, (self.n_head, 3, self.head_dim)).unbind(2)  # per head: q | k | v


class MLP(nn.Module):
    def __init__(self, c: GPTBigCodeConfig, spec: BuildSpec):
        super().__init__()
        self.c_fc = spec.linear("mlp.c_fc", c.n_embd, c.n_inner, bias=True)
        self.c_proj = spec.linear("mlp.c_proj", c.n_inner, c.n_embd, bias=True)
        self.act = ACTIVATIONS[c.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d]"""
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTBigCodeConfig, spec: BuildSpec):
        super().__init__()
        self.ln_1 = spec.layer_norm(c.n_embd, c.layer_norm_epsilon)
        self.attn = Attention(c, spec)
        self.ln_2 = spec.layer_norm(c.n_embd, c.layer_norm_epsilon)
        self.mlp = MLP(c, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTBigCodeModel(nn.Module):
    def __init__(self, c: GPTBigCodeConfig, spec: BuildSpec):
        super().__init__()
        self.wte = spec.embedding(c.vocab_size, c.n_embd)
        self.wpe = spec.embedding(c.n_positions, c.n_embd)
        self.h = nn.ModuleList(Block(c, spec) for _ in range(c.n_layer))
        self.ln_f = spec.layer_norm(c.n_embd, c.layer_norm_epsilon)


class GPTBigCodeForCausalLM(CausalLMBase):
    """Implements models.CausalLM. Parameter names are the HF checkpoint's."""

    def __init__(
        self,
        config: GPTBigCodeConfig,
        adapter_modules: Sequence[str],
        layout: SlotLayout,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        spec = BuildSpec.create(adapter_modules, ADAPTER_MODULES, layout, dtype, device)
        super().__init__(spec, config.tie_word_embeddings, config.n_embd, config.vocab_size)
        self.config = config
        self.num_layers, self.num_kv_heads, self.head_dim = config.n_layer, config.kv_heads, config.head_dim
        self.max_positions = config.n_positions
        self.transformer = GPTBigCodeModel(config, spec)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, d] (after ln_f)."""
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)  # [T, d]
        for block in t.h:
            x = block(x)
        return t.ln_f(x)

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def attention_layers(self) -> list[nn.Module]:
        return [block.attn for block in self.transformer.h]
