"""The causal LMs the engine serves, and the small pieces they share.

A model runs one engine step: a flat ragged batch of T new tokens from many
sequences (prefill chunks and decode rows mixed), attention through the paged KV
cache, each row's adapter through the step context (`context.py`):

    with using_step(StepContext(adapters, attention_batch)):
        hidden = model(input_ids, positions)                 # [T] -> [T, d_model]
        logits = model.compute_logits(hidden[last_rows])     # [B, d_model] -> [B, vocab]

Module and parameter names are the Hugging Face checkpoint names, so weights load
by name (`loader.py`) and adapters address layers by HF module name
("transformer.h.3.attn.c_attn", "model.layers.3.self_attn.q_proj").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from services.engine import native
from services.engine.adapter_slots import SlotLayout
from services.engine.base_weights import BaseWeight, Quantization, base_weight
from services.engine.layers import Linear, MultiAdapterLinear, Projections


class CausalLM(Protocol):
    """What the engine needs from a model (GPTBigCodeForCausalLM, LlamaForCausalLM)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int  # positions must be < max_positions
    hidden_size: int
    dtype: torch.dtype

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 -> hidden [T, hidden_size] (final norm applied)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden_size] -> logits [B, vocab_size]."""
        ...

    def attach_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """k_cache, v_cache [num_layers, slots, num_kv_heads, head_dim]: layer i keeps the view [i]."""
        ...

    def adapted_layers(self) -> dict[str, MultiAdapterLinear]:
        """HF module name -> adapter-capable layer, for loading adapter weights into slots."""
        ...

    def quantize(self, quantization: Quantization) -> None:
        """Store the linears' weights dense or int8 (the loader calls it once, after loading)."""
        ...


# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 like Hugging Face's (matters for bf16): one C++ pass per
    row (csrc/norm_ops.cpp; torch runs F.rms_norm on the CPU as ~8 ops)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> [T, d]"""
        return native.ops().rms_norm(x, self.weight, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, op for op: the oracle for the native kernel."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@dataclass(frozen=True)
class BuildSpec:
    """How a model's layers are built: which linears are adapter-capable, in what dtype and where.

    adapter_modules are module types, i.e. names within a block ("attn.c_attn"); layer
    type i reads the step's i-th AdapterBatch. Every other linear stays plain, so an
    empty adapter_modules costs nothing at all.
    """

    adapter_modules: tuple[str, ...]
    layout: SlotLayout
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def create(
        adapter_modules: Sequence[str], allowed: tuple[str, ...], layout: SlotLayout, dtype: torch.dtype, device: torch.device | str
    ) -> "BuildSpec":
        if isinstance(adapter_modules, str):
            raise TypeError(f"adapter_modules must be a tuple of module names, got the string {adapter_modules!r}")
        modules = tuple(adapter_modules)
        unknown = [m for m in modules if m not in allowed]
        if unknown:
            raise ValueError(f"unknown adapter module(s) {unknown}: this model allows {list(allowed)}")
        if len(set(modules)) != len(modules):
            raise ValueError(f"adapter_modules lists a module twice: {list(modules)}")
        if not dtype.is_floating_point:
            raise TypeError(f"a model's dtype must be floating point, got {dtype}")
        return BuildSpec(modules, layout, dtype, torch.device(device))

    def empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=self.dtype, device=self.device)

    def linear(self, module_type: str, d_in: int, d_out: int, bias: bool) -> nn.Module:
        """[d_out, d_in] linear for block module `module_type`; adapter-capable if listed."""
        # [d_out, d_in] as torch expects, laid out as its transpose [d_in, d_out]: x @ weight.T then
        # reads the weight without a transposed-B GEMM, measured 20-35% faster for decode-sized
        # (32-row) inputs on this CPU (docs/engine.md). Loading copies into the view unchanged.
        weight, b = self.empty(d_in, d_out).T, self.empty(d_out) if bias else None
        if module_type in self.adapter_modules:
            return MultiAdapterLinear(weight, b, self.layout, batch_index=self.adapter_modules.index(module_type))
        return Linear(weight, b)

    def embedding(self, num: int, dim: int) -> nn.Embedding:
        return nn.Embedding(num, dim, _weight=self.empty(num, dim), _freeze=True)

    def layer_norm(self, dim: int, eps: float) -> nn.LayerNorm:
        return nn.LayerNorm(dim, eps=eps, dtype=self.dtype, device=self.device)


def attach_kv_cache(
    attentions: Sequence[nn.Module], k_cache: torch.Tensor, v_cache: torch.Tensor, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    """Hand attention layer i the views k_cache[i], v_cache[i]: [slots, kv_heads, head_dim]."""
    expected = (len(attentions), kv_heads, head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or (cache.shape[0], *cache.shape[2:]) != expected:
            raise ValueError(
                f"{name} must be [num_layers={expected[0]}, slots, kv_heads={kv_heads}, head_dim={head_dim}], got {tuple(cache.shape)}"
            )
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or k_cache.device != v_cache.device:
        raise ValueError(f"k_cache and v_cache differ: {k_cache.shape} {k_cache.dtype} vs {v_cache.shape} {v_cache.dtype}")
    if k_cache.dtype != dtype:
        raise TypeError(f"the KV cache is {k_cache.dtype} but the model computes in {dtype}")
    for i, attn in enumerate(attentions):
        attn.k_cache, attn.v_cache = k_cache[i], v_cache[i]


def require_cache(k_cache: torch.Tensor | None) -> torch.Tensor:
    if k_cache is None:
        raise RuntimeError("no KV cache attached: call model.attach_kv_cache(k_cache, v_cache) before forward")
    return k_cache


class CausalLMBase(nn.Module):
    """What the architectures share: the (possibly tied) LM head, KV-cache wiring, adapted layers.
    A subclass builds its blocks in __init__ and names its token embedding and attention layers."""

    def __init__(self, spec: BuildSpec, tie_word_embeddings: bool, hidden_size: int, vocab_size: int):
        super().__init__()
        self.dtype, self.tie_word_embeddings = spec.dtype, tie_word_embeddings
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        if not tie_word_embeddings:
            self.lm_head = spec.linear("lm_head", hidden_size, vocab_size, bias=False)
        self.head: BaseWeight | None = None  # the LM head [vocab, d], bound by `quantize` once the weights are loaded

    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def attention_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, d] -> [B, vocab]"""
        if self.head is None:
            raise RuntimeError("the LM head is not bound: call model.quantize(...) after loading the weights")
        return self.head.mm(hidden)

    def quantize(self, quantization: Quantization) -> None:
        """Store every linear's weight (and the LM head) as `quantization` says; call once, after loading.
        A tied head keeps the embedding dense for lookups and gets its own int8 copy."""
        for module in self.modules():  # fusing first: it releases the parts' weights
            if isinstance(module, Projections):
                module.quantize(quantization)
        for module in self.modules():
            if isinstance(module, Linear) and module.weight is not None:
                module.quantize(quantization)
        tied = self.tie_word_embeddings
        self.head = base_weight(self.token_embedding().weight, quantization) if tied else self.lm_head.base

    def attach_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """k_cache, v_cache [num_layers, slots, kv_heads, head_dim]"""
        attach_kv_cache(self.attention_layers(), k_cache, v_cache, self.num_kv_heads, self.head_dim, self.dtype)

    def adapted_layers(self) -> dict[str, MultiAdapterLinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiAdapterLinear)}


# ---------------------------------------------------------------------------------------------
# Activations by config.json name (the field readers are model_shapes.read_*)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # the same tanh formula, written out in HF
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
