"""Llama (SmolLM2): grouped-query attention, rotary positions, RMSNorm, SwiGLU MLP.

Same math as transformers' modeling_llama.py, rewritten for the engine's flat
ragged batch (gpt-fast-sized): tokens of all sequences are rows of one [T, d]
tensor, attention goes through the paged KV cache (`attention.paged_attention`).

    x = embed_tokens[ids]                                          # [T, d]
    per layer:  x += o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = input_layernorm(x)
                x += down_proj(silu(gate_proj(n)) * up_proj(n))                     n = post_attention_layernorm(x)
    logits = norm(x) @ lm_headᵀ                                     # lm_head = embed_tokens if tied

RoPE is HF's "rotate half" form. cos/sin come from a [max_positions, head_dim]
table built once, gathered by position once per forward (not per layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from services.engine import native
from services.engine.adapter_slots import SlotLayout
from services.engine.attention import paged_attention
from services.engine.context import get_attention_batch
from services.engine.layers import Projections
from services.engine.model_shapes import ModelConfigError, read_bool, read_float, read_int
from services.engine.models import (
    ACTIVATIONS,
    BuildSpec,
    CausalLMBase,
    RMSNorm,
    require_cache,
)

ADAPTER_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """transformers' `rope_parameters` (v5) / `rope_theta` + `rope_scaling` (v4), for the types we support."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 8192  # llama3

    @staticmethod
    def from_hf(config: Mapping[str, Any], max_positions: int) -> "RopeConfig":
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"rope type {rope_type!r} is not supported (supported: {list(ROPE_TYPES)})")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
        theta = read_float(params, "rope_theta", read_float(config, "rope_theta", 10000.0))
        if rope_type == "default":
            return RopeConfig(theta)
        if params.get("factor") is None:
            raise ModelConfigError(f"rope type {rope_type!r} needs the field 'factor'")
        return RopeConfig(
            theta,
            rope_type,
            factor=read_float(params, "factor", 1.0),
            low_freq_factor=read_float(params, "low_freq_factor", 1.0),
            high_freq_factor=read_float(params, "high_freq_factor", 4.0),
            original_max_positions=read_int(params, "original_max_position_embeddings", max_positions),
        )

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[head_dim / 2] fp32 inverse frequencies, computed exactly as transformers does."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type == "llama3":
            return self._llama3(inv)
        return inv

    def _llama3(self, inv: torch.Tensor) -> torch.Tensor:
        """Llama 3.1: long wavelengths slowed by `factor`, a smooth ramp between (HF _compute_llama3_parameters)."""
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    rope: RopeConfig

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_act {self.hidden_act!r} is not supported (supported: {sorted(ACTIVATIONS)})")

    @staticmethod
    def from_hf(config: Mapping[str, Any]) -> "LlamaConfig":
        """From a Hugging Face config.json dict; defaults are transformers' LlamaConfig defaults."""
        d, heads = read_int(config, "hidden_size"), read_int(config, "num_attention_heads")
        max_positions = read_int(config, "max_position_embeddings", 2048)
        if config.get("pretraining_tp", 1) != 1:
            raise ModelConfigError(f"pretraining_tp={config['pretraining_tp']} is not supported (only 1)")
        return LlamaConfig(
            vocab_size=read_int(config, "vocab_size"),
            max_position_embeddings=max_positions,
            hidden_size=d,
            intermediate_size=read_int(config, "intermediate_size"),
            num_hidden_layers=read_int(config, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=read_int(config, "num_key_value_heads", heads),
            head_dim=read_int(config, "head_dim", d // heads),
            hidden_act=config.get("hidden_act", "silu"),
            rms_norm_eps=read_float(config, "rms_norm_eps", 1e-6),
            attention_bias=read_bool(config, "attention_bias", False),
            mlp_bias=read_bool(config, "mlp_bias", False),
            tie_word_embeddings=read_bool(config, "tie_word_embeddings", False),
            rope=RopeConfig.from_hf(config, max_positions),
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, 1, D] -> x·cos + rotate_half(x)·sin. HF's form, op for op: the
    reference for the fused kernel the model runs (csrc/rope_ops.cpp, bitwise equal)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, spec: BuildSpec):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        d, q_dim, kv_dim = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = spec.linear("self_attn.q_proj", d, q_dim, c.attention_bias)
        self.k_proj = spec.linear("self_attn.k_proj", d, kv_dim, c.attention_bias)
        self.v_proj = spec.linear("self_attn.v_proj", d, kv_dim, c.attention_bias)
        self.o_proj = spec.linear("self_attn.o_proj", q_dim, d, c.attention_bias)
        self.qkv = Projections(self.q_proj, self.k_proj, self.v_proj)
        self.k_cache: torch.Tensor | None = None  # [slots, kv_heads, head_dim], a view of the engine's cache
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, d], cos/sin [T, D] -> [T, d]"""
        q, k, v = self.qkv(x)  # [T, H·D], [T, kvH·D], [T, kvH·D]
        q = native.ops().rope(q, cos, sin, self.n_head)  # [T, H, D]   (= apply_rope)
        k = native.ops().rope(k, cos, sin, self.kv_heads)  # [T, kvH, D]
        v = v.unflatten(1, (self.kv_heads, self.head_dim))  # [T, kvH, D]
        y = paged_attention(q, k, v, require_cache(self.k_cache), self.v_cache, get_attention_batch(), self.scale)  # [T, H, D]
        return self.o_proj(y.flatten(1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig, spec: BuildSpec):
        super().__init__()
        self.gate_proj = spec.linear("mlp.gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = spec.linear("mlp.up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = spec.linear("mlp.down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        self.gate_up = Projections(self.gate_proj, self.up_proj)
        self.act_mul = _silu_mul if c.hidden_act in ("silu", "swish") else _act_mul(ACTIVATIONS[c.hidden_act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d]"""
        gate, up = self.gate_up(x)  # [T, d_ff] each
        return self.down_proj(self.act_mul(gate, up))  # act(gate) * up


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one pass (csrc/activation_ops.cpp; bitwise F.silu(gate) * up in fp32)."""
    return native.ops().silu_mul(gate, up)


def _act_mul(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda gate, up: act(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, spec: BuildSpec):
        super().__init__()
        self.self_attn = Attention(c, spec)
        self.mlp = MLP(c, spec)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, spec.dtype, spec.device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, spec.dtype, spec.device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig, spec: BuildSpec):
        super().__init__()
        self.embed_tokens = spec.embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, spec) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, spec.dtype, spec.device)
        # [max_positions, D] in the model dtype; HF also computes in fp32 and casts.
        freqs = torch.arange(c.max_position_embeddings).float()[:, None] * c.rope.inv_freq(c.head_dim)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos().to(spec.device, spec.dtype), persistent=False)
        self.register_buffer("rope_sin", emb.sin().to(spec.device, spec.dtype), persistent=False)


class LlamaForCausalLM(CausalLMBase):
    """Implements models.CausalLM. Parameter names are the HF checkpoint's."""

    def __init__(
        self,
        config: LlamaConfig,
        adapter_modules: Sequence[str],
        layout: SlotLayout,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        spec = BuildSpec.create(adapter_modules, ADAPTER_MODULES, layout, dtype, device)
        super().__init__(spec, config.tie_word_embeddings, config.hidden_size, config.vocab_size)
        self.config = config
        self.num_layers, self.num_kv_heads, self.head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        self.max_positions = config.max_position_embeddings
        self.model = LlamaModel(config, spec)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, d] (after the final norm)."""
        m = self.model
        cos, sin = m.rope_cos[positions], m.rope_sin[positions]  # [T, D]
        x = m.embed_tokens(input_ids)  # [T, d]
        for layer in m.layers:
            x = layer(x, cos, sin)
        return m.norm(x)

    def token_embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers]
