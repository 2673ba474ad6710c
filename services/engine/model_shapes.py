"""The adaptable linear layers of a base model, computed from its Hugging Face `config.json`.

Pure Python (no torch): the adapter store validates uploads against these shapes
without loading the model. Names are the model's module names, shapes are
`(d_in, d_out)` of its `nn.Linear` (weight `[d_out, d_in]`).

  gpt_bigcode  transformer.h.{i}.attn.c_attn   n_embd -> n_embd + 2·head_dim (multi-query) | 3·n_embd
               transformer.h.{i}.attn.c_proj   n_embd -> n_embd
               transformer.h.{i}.mlp.c_fc      n_embd -> n_inner (default 4·n_embd)
               transformer.h.{i}.mlp.c_proj    n_inner -> n_embd
  llama        model.layers.{i}.self_attn.{q,k,v,o}_proj   (grouped-query: k, v have num_key_value_heads)
               model.layers.{i}.mlp.{gate,up,down}_proj
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """A config.json this module cannot describe (unknown model type, missing or bad field)."""


@dataclass(frozen=True)
class ModuleShape:
    d_in: int
    d_out: int


def module_shapes(config: Mapping[str, Any]) -> dict[str, ModuleShape]:
    """Module name -> shape for every adaptable linear layer of the model `config` describes."""
    model_type = config.get("model_type")
    builder = _BUILDERS.get(model_type)
    if builder is None:
        raise ModelConfigError(f"model_type {model_type!r} is not supported (supported: {sorted(_BUILDERS)})")
    return builder(config)


def load_config(path: Path) -> dict[str, Any]:
    """Read a config.json, given as the file or the model directory holding it."""
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise ModelConfigError(f"cannot read base model config {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"base model config {path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ModelConfigError(f"base model config {path} must be a JSON object")
    return config


def _gpt_bigcode(config: Mapping[str, Any]) -> dict[str, ModuleShape]:
    d, layers, heads = read_int(config, "n_embd"), read_int(config, "n_layer"), read_int(config, "n_head")
    inner = read_int(config, "n_inner", 4 * d)
    # Multi-query attention: one shared key and value head next to the n_head query heads.
    qkv = d + 2 * (d // heads) if config.get("multi_query", True) else 3 * d
    per_layer = {
        "attn.c_attn": ModuleShape(d, qkv),
        "attn.c_proj": ModuleShape(d, d),
        "mlp.c_fc": ModuleShape(d, inner),
        "mlp.c_proj": ModuleShape(inner, d),
    }
    return _expand("transformer.h", layers, per_layer)


def _llama(config: Mapping[str, Any]) -> dict[str, ModuleShape]:
    d, layers, heads = read_int(config, "hidden_size"), read_int(config, "num_hidden_layers"), read_int(config, "num_attention_heads")
    kv_heads = read_int(config, "num_key_value_heads", heads)
    head_dim = read_int(config, "head_dim", d // heads)
    inner = read_int(config, "intermediate_size")
    per_layer = {
        "self_attn.q_proj": ModuleShape(d, heads * head_dim),
        "self_attn.k_proj": ModuleShape(d, kv_heads * head_dim),
        "self_attn.v_proj": ModuleShape(d, kv_heads * head_dim),
        "self_attn.o_proj": ModuleShape(heads * head_dim, d),
        "mlp.gate_proj": ModuleShape(d, inner),
        "mlp.up_proj": ModuleShape(d, inner),
        "mlp.down_proj": ModuleShape(inner, d),
    }
    return _expand("model.layers", layers, per_layer)


def _expand(prefix: str, layers: int, per_layer: dict[str, ModuleShape]) -> dict[str, ModuleShape]:
    return {f"{prefix}.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


def read_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None and default is not None:
        return default
    # bool is an int subclass; a `true` where a size belongs is a broken config, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelConfigError(f"config field {key!r} must be a positive integer, got {value!r}")
    return value


def read_float(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ModelConfigError(f"config field {key!r} must be a positive number, got {value!r}")
    return float(value)


def read_bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelConfigError(f"config field {key!r} must be true or false, got {value!r}")
    return value


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], dict[str, ModuleShape]]] = {
    "gpt_bigcode": _gpt_bigcode,
    "llama": _llama,
}
