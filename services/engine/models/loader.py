"""Build a model from a Hugging Face checkpoint directory, or with random weights.

    load_model(dir, adapter_modules, layout)    config.json + *.safetensors -> CausalLM
    random_model(starcoder_config("starcoderbase-1b"), ...)   benchmark shapes, random weights

Weights are read only with safetensors (never pickle / torch.load). Every tensor is
allocated once, in the target dtype, by the model's constructor; loading copies each
checkpoint tensor into it. The checkpoint must match the model exactly: all missing,
unexpected and mis-shaped tensors are reported together in one error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from services.engine.adapter_slots import SlotLayout
from services.engine.base_weights import Quantization
from services.engine.model_shapes import ModelConfigError, load_config
from services.engine.models import CausalLM, RMSNorm
from services.engine.models.gpt_bigcode import GPTBigCodeConfig, GPTBigCodeForCausalLM
from services.engine.models.llama import LlamaConfig, LlamaForCausalLM

# Buffers some older checkpoints carry next to the weights; nothing to load.
_BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")
_TIED_HEAD = "lm_head.weight"  # a tied model has no such parameter; a checkpoint may still hold a copy
_SHOWN = 8  # names listed per problem kind in an error


class CheckpointError(ValueError):
    """A checkpoint directory whose tensors do not match the model its config.json describes."""


Architecture = Callable[[Mapping[str, Any], Sequence[str], SlotLayout, torch.dtype, torch.device | str], CausalLM]


def _gpt_bigcode(config, adapter_modules, layout, dtype, device) -> CausalLM:
    return GPTBigCodeForCausalLM(GPTBigCodeConfig.from_hf(config), adapter_modules, layout, dtype, device)


def _llama(config, adapter_modules, layout, dtype, device) -> CausalLM:
    return LlamaForCausalLM(LlamaConfig.from_hf(config), adapter_modules, layout, dtype, device)


_ARCHITECTURES: dict[str, Architecture] = {"gpt_bigcode": _gpt_bigcode, "llama": _llama}


def build_model(
    config: Mapping[str, Any],
    adapter_modules: Sequence[str],
    layout: SlotLayout,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> CausalLM:
    """The model a config.json dict describes, with uninitialized weights."""
    build = _ARCHITECTURES.get(config.get("model_type"))
    if build is None:
        raise ModelConfigError(f"model_type {config.get('model_type')!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
    # Plain tensors even if the caller is in inference mode: adapter slots are written between steps.
    with torch.inference_mode(False):
        return build(config, adapter_modules, layout, dtype, device)


def load_model(
    model_dir: Path,
    adapter_modules: Sequence[str],
    layout: SlotLayout,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: Quantization = Quantization.NONE,
) -> CausalLM:
    """config.json + *.safetensors in model_dir -> the model, weights loaded, in `dtype` on `device`,
    then stored as `quantization` says (int8: quantized from the loaded weights)."""
    model_dir = Path(model_dir)
    model = build_model(load_config(model_dir), adapter_modules, layout, dtype, device)
    load_weights(model, _shards(model_dir))
    model.quantize(quantization)
    return model


def load_weights(model: nn.Module, shards: Sequence[Path]) -> None:
    """Copy every parameter from the safetensors shards; raise CheckpointError on any mismatch."""
    params = dict(model.named_parameters())
    index = _index(shards)  # name -> (shard, shape)
    _check(params, {name: shape for name, (_, shape) in index.items()})
    with torch.no_grad():
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    if name in params:
                        params[name].copy_(f.get_tensor(name))


def _shards(model_dir: Path) -> list[Path]:
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files in {model_dir} (weights are only read from safetensors, never pickle)")
    return shards


def _index(shards: Sequence[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if name in index:
                    raise CheckpointError(f"tensor {name!r} is in both {index[name][0].name} and {shard.name}")
                index[name] = (shard, tuple(f.get_slice(name).get_shape()))
    return index


def _check(params: Mapping[str, nn.Parameter], found: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(params) - set(found))
    unexpected = sorted(n for n in set(found) - set(params) if n != _TIED_HEAD and not n.endswith(_BUFFER_SUFFIXES))
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    misshaped = sorted(f"{n}: checkpoint {found[n]} vs model {shape}" for n, shape in shapes.items() if n in found and found[n] != shape)
    problems = [p for p in (_listing("missing", missing), _listing("unexpected", unexpected), _listing("mis-shaped", misshaped)) if p]
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))


def _listing(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{len(names)} {kind} tensor(s): {', '.join(names[:_SHOWN])}{more}"


# ---------------------------------------------------------------------------------------------
# Random weights for benchmarks

# name -> (n_embd, n_layer, n_head, n_inner); all multi-query, vocab 49152, 8192 positions.
STARCODER_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "starcoderbase-1b": (2048, 24, 16, 8192),
    "starcoderbase-3b": (2816, 36, 22, 11264),
    "starcoderbase-7b": (4096, 42, 32, 16384),
    "starcoder-15b": (6144, 40, 48, 24576),
}


def starcoder_config(name: str) -> dict[str, Any]:
    """A config.json dict with a StarCoder model's shapes (for `random_model`)."""
    if name not in STARCODER_SHAPES:
        raise ValueError(f"unknown StarCoder config {name!r} (known: {sorted(STARCODER_SHAPES)})")
    d, layers, heads, inner = STARCODER_SHAPES[name]
    return {
        "model_type": "gpt_bigcode",
        "vocab_size": 49152,
        "n_positions": 8192,
        "n_embd": d,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": inner,
        "multi_query": True,
        "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def random_model(
    config: Mapping[str, Any],
    adapter_modules: Sequence[str],
    layout: SlotLayout,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    std: float = 0.02,
    quantization: Quantization = Quantization.NONE,
) -> CausalLM:
    """The model `config` describes with GPT-2-style random weights, initialized in place (no second copy):
    matrices and embeddings N(0, std), biases 0, norm weights 1; then stored as `quantization` says."""
    model = build_model(config, adapter_modules, layout, dtype, device)
    gen = None if torch.device(device).type == "meta" else torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.LayerNorm, RMSNorm))
            for name, p in module.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    p.fill_(1.0)
                elif p.dim() >= 2:
                    p.normal_(0.0, std, generator=gen)
                else:
                    p.zero_()
    model.quantize(quantization)
    return model
