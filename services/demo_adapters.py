"""Plausible trained adapters with random weights, for any base model config: the demo
tenants of `make run`, the gateway's tests and its benchmark.

FLoRA near the identity (B A ≈ 1), LoRA with a small B A, IA3 near 1, on every layer's
modules of the given types; IA3 scales the input of feed-forward output projections
(PEFT's convention for feed-forward layers) and the output of the others.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters_store.format import encode_adapter
from services.engine.adapter_format import AdapterKind, AdapterSpec, tensor_names
from services.engine.model_shapes import load_config, module_shapes

FEED_FORWARD_OUT = ("mlp.down_proj", "mlp.c_proj")


def synthetic_adapter(kind: AdapterKind, rank: int, module_types: tuple[str, ...], model_dir: Path, base_model_id: str,
                      seed: int) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(load_config(model_dir))
    modules = [m for m in shapes if m.endswith(tuple("." + t for t in module_types))]
    tensors = {}
    for module in modules:
        d_in, d_out = shapes[module].d_in, shapes[module].d_out
        first, second = tensor_names(kind, module)
        match kind:
            case AdapterKind.FLORA:
                tensors[first] = 1 + 0.1 * torch.randn(d_in, rank, generator=gen)
                tensors[second] = (1 + 0.1 * torch.randn(rank, d_out, generator=gen)) / rank
            case AdapterKind.LORA:
                tensors[first] = torch.randn(rank, d_in, generator=gen) / d_in**0.5
                tensors[second] = 0.2 * torch.randn(d_out, rank, generator=gen)
            case AdapterKind.IA3 if module.endswith(FEED_FORWARD_OUT):
                tensors[second] = 1 + 0.2 * torch.randn(d_in, generator=gen)
            case AdapterKind.IA3:
                tensors[first] = 1 + 0.2 * torch.randn(d_out, generator=gen)
    alpha = 2.0 * rank if kind is AdapterKind.LORA else None
    return AdapterSpec(kind, rank, tuple(modules), base_model_id, alpha), tensors


def write_synthetic_adapter(path: Path, kind: AdapterKind, rank: int, module_types: tuple[str, ...], model_dir: Path,
                            base_model_id: str, seed: int) -> Path:  # fmt: skip
    spec, tensors = synthetic_adapter(kind, rank, module_types, model_dir, base_model_id, seed)
    path.write_bytes(encode_adapter(spec, tensors))
    return path
