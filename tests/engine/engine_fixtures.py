"""Tiny real checkpoints (random weights, saved by transformers) and a character tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.adapter_manager import Adapter
from services.engine.adapter_slots import SlotPool
from services.engine.adapter_weights import FloraWeights, Ia3Weights, LoraWeights
from services.engine.base_weights import Quantization
from services.engine.config import EngineConfig
from services.engine.cost_model import FixedPaths
from services.engine.engine import LLMEngine
from services.engine.models.loader import load_model
from services.engine.scheduler import SchedulerConfig

VOCAB, EOS = 97, 2
MODULES = ("attn.c_attn", "mlp.c_fc")
POOLS = (
    SlotPool(AdapterKind.FLORA, 1, 2),
    SlotPool(AdapterKind.FLORA, 4, 2),
    SlotPool(AdapterKind.LORA, 8, 2),
    SlotPool(AdapterKind.IA3, 1, 2),
)


class CharTokenizer:
    """ids 3..96 are the printable ASCII characters ' '..'~'; 0-2 are special (2 = EOS)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) - 32 + 3 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3 + 32) for i in ids if i >= 3)


def save_tiny_gpt_bigcode(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4, multi_query=True, bos_token_id=1, eos_token_id=EOS, initializer_range=0.3)
    GPTBigCodeForCausalLM(config).eval().save_pretrained(path)
    return path


def make_engine(
    model_dir: Path, kv_cache_bytes: int = 1 << 22, max_num_seqs: int = 16, max_tokens: int = 8192, pools=POOLS,
    quantization: Quantization = Quantization.NONE,
) -> LLMEngine:
    config = EngineConfig(
        adapter_modules=MODULES, pools=pools, kv_cache_bytes=kv_cache_bytes, block_size=4, quantization=quantization,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens),
    )
    model = load_model(model_dir, config.adapter_modules, config.layout, config.torch_dtype, quantization=quantization)
    return LLMEngine(model, CharTokenizer(), config, FixedPaths(), frozenset({EOS}))


def adapter(adapter_id: str, kind: AdapterKind, rank: int, engine: LLMEngine, seed: int) -> Adapter:
    """A random adapter on every c_attn (and, for IA3, the feed-forward c_fc input too)."""
    gen = torch.Generator().manual_seed(seed)
    layers = engine.model.adapted_layers()
    names = [n for n in layers if n.endswith("attn.c_attn") or (kind is AdapterKind.IA3 and n.endswith("mlp.c_fc"))]
    weights = {}
    for name in names:
        d_in, d_out = layers[name].d_in, layers[name].d_out
        match kind:
            case AdapterKind.FLORA:
                weights[name] = FloraWeights(1 + 0.5 * torch.randn(d_in, rank, generator=gen), (1 + 0.5 * torch.randn(rank, d_out, generator=gen)) / rank)
            case AdapterKind.LORA:
                weights[name] = LoraWeights(torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen), 0.5)
            case AdapterKind.IA3:
                on_input = name.endswith("c_fc")
                weights[name] = Ia3Weights(1 + torch.randn(d_in if on_input else d_out, generator=gen), on_input)
    alpha = 4.0 if kind is AdapterKind.LORA else None
    return Adapter(adapter_id, AdapterSpec(kind, rank, tuple(names), "tiny", alpha), weights)
