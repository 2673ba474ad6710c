"""PEFT adapter directories -> the store's canonical adapter file.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`
with tensors named `base_model.model.{module}.{lora_A|lora_B}.weight` (LoRA) or
`base_model.model.{module}.ia3_l` (IA3). Only what the engine computes exactly
is accepted; anything else (DoRA, per-module ranks, trained biases, full
`modules_to_save` copies, embedding LoRA, a pickled `adapter_model.bin`) is
refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from services.engine.adapter_format import AdapterKind, AdapterSpec

from adapters_store.errors import AdapterValidationError
from adapters_store.format import TORCH_DTYPES, decode_tensors, dtype_name, encode_adapter, read_container
from adapters_store.settings import Limits

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_IA3_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.ia3_l$")


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def normalize_peft_dir(path: Path, limits: Limits, base_model: str | None = None) -> bytes:
    """The canonical adapter file for PEFT directory `path`; `base_model` overrides the id
    its config records (PEFT often records a local path instead of the model's id)."""
    where = str(path)
    config = _read_config(path)
    tensors = _read_weights(path, limits)
    model_id = base_model or config.get("base_model_name_or_path")
    if not model_id:
        raise AdapterValidationError(where, [f"{CONFIG_FILE} does not name the base model: pass --base-model ID"])
    match config.get("peft_type"):
        case "LORA":
            spec, normalized = _lora(config, tensors, model_id, where)
        case "IA3":
            spec, normalized = _ia3(tensors, model_id, where)
        case other:
            raise AdapterValidationError(where, [f"peft_type {other!r} is not supported (LORA or IA3)"])
    return encode_adapter(spec, normalized)


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterValidationError(str(path / CONFIG_FILE), [f"cannot read the PEFT config: {e}"]) from e
    if not isinstance(config, dict):
        raise AdapterValidationError(str(path / CONFIG_FILE), ["the PEFT config is not a JSON object"])
    return config


def _read_weights(path: Path, limits: Limits) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").exists()
        hint = " (only adapter_model.bin, a pickle, which is never loaded: re-save with safe_serialization=True)" if pickled else ""
        raise AdapterValidationError(str(path), [f"has no {WEIGHTS_FILE}{hint}"])
    if weights.stat().st_size > limits.max_file_bytes:
        raise AdapterValidationError(str(weights), [f"file is over the {limits.max_file_bytes}-byte limit"])
    data = weights.read_bytes()
    read_container(data, str(weights), limits.max_header_bytes)  # clear errors before safetensors sees it
    tensors = decode_tensors(data, str(weights))
    bad = [f"tensor {n} has dtype {t.dtype}, expected a float type" for n, t in sorted(tensors.items())
           if dtype_name(t) not in TORCH_DTYPES]  # fmt: skip
    if bad:
        raise AdapterValidationError(str(weights), bad)
    return tensors


def _lora(config: dict, tensors: dict[str, torch.Tensor], model_id: str, where: str) -> tuple[AdapterSpec, dict]:
    _refuse_unsupported_lora(config, where)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or not isinstance(alpha, int | float):
        problem = f"{CONFIG_FILE} needs integer r and numeric lora_alpha, got r={rank!r}, lora_alpha={alpha!r}"
        raise AdapterValidationError(where, [problem])
    # rsLoRA scales by alpha / sqrt(r); the format's scale is alpha / r, so fold the difference into alpha.
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)
    normalized, modules = {}, set()
    for name, tensor, match in _matched(tensors, _LORA_NAME, "a LoRA A/B weight", where):
        modules.add(match["module"])
        normalized[f"{match['module']}.{match['part']}"] = tensor
    spec = _spec(AdapterKind.LORA, rank, modules, model_id, float(alpha), where)
    return spec, normalized


def _matched(tensors: dict[str, torch.Tensor], pattern: re.Pattern, what: str, where: str) -> Iterator[tuple[str, torch.Tensor, re.Match]]:
    """(name, tensor, match) for every tensor; a name the pattern refuses is a validation error."""
    for name, tensor in tensors.items():
        match = pattern.match(name)
        if match is None:
            raise AdapterValidationError(where, [f"tensor {name} is not {what} of a linear layer (not supported)"])
        yield name, tensor, match


def _refuse_unsupported_lora(config: dict, where: str) -> None:
    problems = []
    if config.get("use_dora"):
        problems.append("use_dora=true: DoRA adapters are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern: per-module ranks or alphas are not supported (one rank per adapter)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: trained biases are not supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r}: full module copies are not supported")
    if problems:
        raise AdapterValidationError(where, problems)


def _ia3(tensors: dict[str, torch.Tensor], model_id: str, where: str) -> tuple[AdapterSpec, dict]:
    normalized, modules = {}, set()
    for name, tensor, match in _matched(tensors, _IA3_NAME, "an IA3 vector", where):
        modules.add(match["module"])
        normalized[f"{match['module']}.{_ia3_side(name, tensor, where)}"] = tensor.reshape(-1)
    return _spec(AdapterKind.IA3, 1, modules, model_id, None, where), normalized


def _ia3_side(name: str, tensor: torch.Tensor, where: str) -> str:
    """PEFT stores a feed-forward (input-scaling) vector as [1, d_in], an output one as [d_out, 1]."""
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        return "ia3_in"
    if tensor.dim() == 2 and tensor.shape[1] == 1:
        return "ia3_out"
    raise AdapterValidationError(where, [f"tensor {name} has shape {list(tensor.shape)}, expected [1, d_in] or [d_out, 1]"])


def _spec(kind: AdapterKind, rank: int, modules: set[str], model_id: str, alpha: float | None, where: str) -> AdapterSpec:
    try:
        return AdapterSpec(kind, rank, tuple(sorted(modules, key=natural_key)), model_id, alpha)
    except ValueError as e:
        raise AdapterValidationError(where, [str(e)]) from e


def natural_key(name: str) -> tuple:
    """transformer.h.2 before transformer.h.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
