"""Everything an adapter must satisfy before any of it is stored.

Checked in order, cheapest first, each stage reporting all of its findings:

  1. size cap, safetensors framing, header cap (format.read_container)
  2. header metadata -> AdapterSpec (format.spec_from_metadata)
  3. base model id equals the deployment's, rank within limits, targets are real modules
  4. tensor names agree with kind and targets (format.tensor_name_problems)
  5. dtypes allowed, shapes equal the base model's dimensions at the declared rank
  6. no NaN / Inf values (the only stage that reads tensor data)
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.model_shapes import ModelConfigError, ModuleShape, load_config, module_shapes

from adapters_store.errors import AdapterValidationError, UsageError
from adapters_store.format import (
    TensorEntry,
    decode_tensors,
    read_container,
    spec_from_metadata,
    tensor_name_problems,
)
from adapters_store.settings import Limits

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BaseModel:
    """The deployment's base model: adapters must be made for exactly this one."""

    model_id: str
    modules: Mapping[str, ModuleShape]

    @staticmethod
    def from_config(model_id: str | None, config_path: Path | None) -> "BaseModel":
        if not model_id or config_path is None:
            raise UsageError(
                "the deployment's base model is not configured: set FLORA_BASE_MODEL and FLORA_BASE_MODEL_CONFIG "
                "or pass --model-id and --model-config"
            )
        try:
            return BaseModel(model_id, module_shapes(load_config(Path(config_path))))
        except ModelConfigError as e:
            raise UsageError(str(e)) from e


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed every check, with the exact bytes that will be stored."""

    spec: AdapterSpec
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def validate_file(path: Path, base: BaseModel, limits: Limits) -> ValidatedAdapter:
    # Check the size before reading, so an oversized file is never loaded into memory.
    try:
        size = path.stat().st_size
    except OSError as e:
        raise AdapterValidationError(str(path), [f"cannot read file: {e.strerror or e}"]) from e
    _check_size(size, str(path), limits)
    return validate_bytes(path.read_bytes(), str(path), base, limits)


def validate_bytes(data: bytes, where: str, base: BaseModel, limits: Limits) -> ValidatedAdapter:
    _check_size(len(data), where, limits)
    container = read_container(data, where, limits.max_header_bytes)
    spec = spec_from_metadata(container.metadata, where)
    _raise_if(where, header_problems(spec, base, limits))
    _raise_if(where, tensor_name_problems(spec, container.tensors))
    _raise_if(where, tensor_problems(spec, container.tensors, base, limits))
    _raise_if(where, value_problems(decode_tensors(data, where)))
    return ValidatedAdapter(spec, data, hashlib.sha256(data).hexdigest())


def _check_size(size: int, where: str, limits: Limits) -> None:
    if size > limits.max_file_bytes:
        raise AdapterValidationError(where, [f"file is {size} bytes, over the {limits.max_file_bytes}-byte limit"])


def _raise_if(where: str, problems: list[str]) -> None:
    if problems:
        raise AdapterValidationError(where, problems)


def header_problems(spec: AdapterSpec, base: BaseModel, limits: Limits) -> list[str]:
    problems = []
    if spec.base_model != base.model_id:
        problems.append(f"adapter is for base model {spec.base_model!r}, this deployment serves {base.model_id!r}")
    if spec.rank > limits.max_rank:
        problems.append(f"rank {spec.rank} is above the limit of {limits.max_rank}")
    problems += [_unknown_module(t, base) for t in spec.targets if t not in base.modules]
    return problems


def _unknown_module(target: str, base: BaseModel) -> str:
    close = difflib.get_close_matches(target, list(base.modules), n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (its modules look like {next(iter(base.modules))})"
    return f"target {target} is not a linear module of base model {base.model_id}{hint}"


def tensor_problems(spec: AdapterSpec, tensors: Mapping[str, TensorEntry], base: BaseModel, limits: Limits) -> list[str]:
    problems = []
    for name, entry in sorted(tensors.items()):
        module, _, suffix = name.rpartition(".")
        if entry.dtype not in limits.allowed_dtypes:
            problems.append(f"tensor {name} has dtype {entry.dtype}, allowed: {list(limits.allowed_dtypes)}")
        expected = expected_shape(suffix, spec.rank, base.modules[module])
        if entry.shape != expected:
            why = _why(spec, module, base)
            problems.append(f"tensor {name} has shape {list(entry.shape)}, expected {list(expected)} for {why}")
    return problems


def expected_shape(suffix: str, rank: int, shape: ModuleShape) -> tuple[int, ...]:
    """A tensor's shape by its name suffix (see services.engine.adapter_format)."""
    return {
        "flora_B": (shape.d_in, rank),
        "flora_A": (rank, shape.d_out),
        "lora_A": (rank, shape.d_in),
        "lora_B": (shape.d_out, rank),
        "ia3_out": (shape.d_out,),
        "ia3_in": (shape.d_in,),
    }[suffix]


def _why(spec: AdapterSpec, module: str, base: BaseModel) -> str:
    shape = base.modules[module]
    rank = "" if spec.kind is AdapterKind.IA3 else f", rank {spec.rank}"
    return f"{module} (d_in {shape.d_in}, d_out {shape.d_out}{rank})"


def value_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    import torch  # here, not at the top: commands that only read the registry should start fast

    problems = []
    for name, tensor in sorted(tensors.items()):
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nan, bad = int(torch.isnan(tensor).sum()), (~finite).nonzero()[0].tolist()
            inf = int((~finite).sum()) - nan
            problems.append(f"tensor {name} has {nan} NaN and {inf} Inf values (first at index {bad})")
    return problems
