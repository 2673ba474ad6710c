"""The stored adapter file: one `.safetensors` file, header metadata + tensors.

Layout (safetensors): 8-byte little-endian header length N, N bytes of JSON
header, then the tensor data. The header's `__metadata__` (all values strings):

  format_version  "1"
  kind            "flora" | "lora" | "ia3"
  rank            "4"   (ia3: "1")
  targets         JSON list of module names of the base model, e.g. ["transformer.h.0.attn.c_attn"]
  base_model      the base model id, e.g. "bigcode/starcoderbase-1b"
  alpha           LoRA only, e.g. "8.0" (the scale is alpha / rank)

Tensor names and shapes per target module are those of
`services.engine.adapter_format` (e.g. `{module}.lora_A [r, d_in]`).

Files are parsed with safetensors only, never pickle or `torch.load`. The
container (length, JSON header, offsets) is checked here first, so that a
pickle, an empty or truncated file or a huge header gets a message that says
so instead of a parser error. Written files are canonical (sorted header keys,
tensors in name order), so the same adapter always has the same sha256.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from services.engine.adapter_format import FORMAT_VERSION, AdapterKind, AdapterSpec, tensor_names

from adapters_store.errors import AdapterValidationError

if TYPE_CHECKING:  # torch is imported only where tensors are touched: reading a header must stay light
    import torch

    from services.engine.adapter_weights import LayerAdapter

DEFAULT_MAX_HEADER_BYTES = 1024 * 1024

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}  # torch dtype name -> safetensors

SUFFIX_KIND = {"flora_B": AdapterKind.FLORA, "flora_A": AdapterKind.FLORA, "lora_A": AdapterKind.LORA,
               "lora_B": AdapterKind.LORA, "ia3_out": AdapterKind.IA3, "ia3_in": AdapterKind.IA3}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int


@dataclass(frozen=True)
class Container:
    """A checked safetensors header: tensors by name and the `__metadata__` strings."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # 8 + header length


def read_source(source: Path | bytes) -> tuple[bytes, str]:
    """(bytes, where) for a path or in-memory bytes; `where` names it in error messages."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), "<bytes>"
    try:
        return Path(source).read_bytes(), str(source)
    except OSError as e:
        raise AdapterValidationError(str(source), [f"cannot read file: {e.strerror or e}"]) from e


# ---- container ---------------------------------------------------------------------------------


def read_container(data: bytes, where: str, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Container:
    """Check the safetensors framing of `data` without trusting any of it."""
    _check_magic(data, where)
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise AdapterValidationError(where, [
            f"not a safetensors file, or truncated: its first 8 bytes declare a {length}-byte header "
            f"but only {len(data) - 8} bytes follow"
        ])  # fmt: skip
    if length > max_header_bytes:
        raise AdapterValidationError(where, [f"header is {length} bytes, over the {max_header_bytes}-byte limit"])
    header = _parse_header_json(data[8 : 8 + length], where)
    metadata = _metadata(header.pop("__metadata__", {}), where)
    tensors = {name: _entry(name, raw, where) for name, raw in header.items()}
    _check_offsets(tensors, len(data) - 8 - length, where)
    return Container(tensors, metadata, 8 + length)


def _check_magic(data: bytes, where: str) -> None:
    if not data:
        raise AdapterValidationError(where, ["file is empty (0 bytes)"])
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise AdapterValidationError(
            where, [f"is a Python pickle (protocol {data[1]}), not safetensors; pickles can run code and are never loaded"]
        )
    if data[:4] == b"PK\x03\x04":
        raise AdapterValidationError(where, ["is a zip archive (torch.save format), not safetensors; it is never loaded"])
    if len(data) < 8:
        raise AdapterValidationError(where, [f"truncated: {len(data)} bytes, shorter than the 8-byte header length"])


def _parse_header_json(raw: bytes, where: str) -> dict:
    if not raw.lstrip().startswith(b"{"):
        raise AdapterValidationError(where, ["not a safetensors file: the header is not a JSON object"])
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterValidationError(where, [f"not a safetensors file: the header is not valid JSON ({e})"]) from e
    if not isinstance(header, dict):
        raise AdapterValidationError(where, ["not a safetensors file: the header is not a JSON object"])
    return header


def _metadata(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise AdapterValidationError(where, ["header __metadata__ must map strings to strings"])
    return raw


def _entry(name: str, raw: object, where: str) -> TensorEntry:
    try:
        dtype, shape, (start, end) = raw["dtype"], tuple(raw["shape"]), raw["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
        raise AdapterValidationError(where, [f"tensor {name!r}: malformed header entry {raw!r}"]) from e
    if dtype not in DTYPE_BYTES:
        raise AdapterValidationError(where, [f"tensor {name!r}: unknown dtype {dtype!r}"])
    if not all(isinstance(v, int) and v >= 0 for v in (*shape, start, end)):
        raise AdapterValidationError(where, [f"tensor {name!r}: shape and offsets must be non-negative integers"])
    if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise AdapterValidationError(
            where, [f"tensor {name!r}: {dtype} {list(shape)} needs {math.prod(shape) * DTYPE_BYTES[dtype]} bytes, "
                    f"its offsets span {end - start}"]  # fmt: skip
        )
    return TensorEntry(dtype, shape, start, end)


def _check_offsets(tensors: dict[str, TensorEntry], data_len: int, where: str) -> None:
    """Tensors must tile the data section exactly: no gaps, no overlap, nothing past the end."""
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            raise AdapterValidationError(where, [f"tensor {name!r}: data starts at byte {entry.start}, expected {position}"])
        position = entry.end
    if position > data_len:
        raise AdapterValidationError(
            where, [f"truncated: tensors need {position} bytes of data but only {data_len} follow the header"]
        )
    if position < data_len:
        raise AdapterValidationError(where, [f"{data_len - position} unexpected bytes after the last tensor"])


# ---- header metadata <-> AdapterSpec -----------------------------------------------------------


def spec_metadata(spec: AdapterSpec) -> dict[str, str]:
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "kind": spec.kind.value,
        "rank": str(spec.rank),
        "targets": json.dumps(list(spec.targets)),
        "base_model": spec.base_model,
    }
    if spec.alpha is not None:
        metadata["alpha"] = repr(float(spec.alpha))
    return metadata


def spec_from_metadata(metadata: Mapping[str, str], where: str) -> AdapterSpec:
    missing = [k for k in ("format_version", "kind", "rank", "targets", "base_model") if k not in metadata]
    if missing:
        hint = " (a PEFT adapter_model.safetensors? upload its directory instead)" if metadata.get("format") == "pt" else ""
        raise AdapterValidationError(where, [f"header metadata lacks {missing}: not a flora-gateway adapter{hint}"])
    if metadata["format_version"] != str(FORMAT_VERSION):
        raise AdapterValidationError(
            where, [f"header format_version {metadata['format_version']!r} is not supported (this store reads {FORMAT_VERSION})"]
        )
    try:
        return AdapterSpec(
            kind=_kind(metadata["kind"]),
            rank=_rank(metadata["rank"]),
            targets=_targets(metadata["targets"]),
            base_model=metadata["base_model"],
            alpha=_alpha(metadata.get("alpha")),
        )
    except ValueError as e:
        raise AdapterValidationError(where, [f"header metadata: {e}"]) from e


def _kind(raw: str) -> AdapterKind:
    try:
        return AdapterKind(raw)
    except ValueError:
        raise ValueError(f"kind {raw!r} is not one of {[k.value for k in AdapterKind]}") from None


def _rank(raw: str) -> int:
    if not raw.strip().lstrip("-").isdigit():
        raise ValueError(f"rank {raw!r} is not an integer")
    return int(raw)


def _targets(raw: str) -> tuple[str, ...]:
    try:
        targets = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"targets must be a JSON list of module names, got {raw!r}") from None
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a JSON list of module names, got {raw!r}")
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
        raise ValueError(f"targets lists {duplicates} more than once")
    return tuple(targets)


def _alpha(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        alpha = float(raw)
    except ValueError:
        raise ValueError(f"alpha {raw!r} is not a number") from None
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"alpha must be finite and non-zero, got {raw!r}")
    return alpha


# ---- tensors vs header -------------------------------------------------------------------------


def tensor_name_problems(spec: AdapterSpec, names: set[str] | Mapping[str, object]) -> list[str]:
    """Every way the tensor names disagree with the header's kind and targets."""
    names = set(names)
    problems = []
    for module in spec.targets:
        wanted = tensor_names(spec.kind, module)
        present = [n for n in wanted if n in names]
        if spec.kind is AdapterKind.IA3 and len(present) != 1:
            problems.append(f"ia3 target {module} needs exactly one of {list(wanted)}, found {present or 'none'}")
        elif spec.kind is not AdapterKind.IA3 and len(present) != len(wanted):
            problems.append(f"target {module} lacks tensor(s) {[n for n in wanted if n not in names]}")
    expected = {n for m in spec.targets for n in tensor_names(spec.kind, m)}
    problems += [_unexpected(spec, name) for name in sorted(names - expected)]
    return problems


def _unexpected(spec: AdapterSpec, name: str) -> str:
    module, _, suffix = name.rpartition(".")
    kind = SUFFIX_KIND.get(suffix)
    if kind is not None and kind is not spec.kind:
        return f"tensor {name} is a {kind.value} tensor but the header says kind={spec.kind.value}"
    if kind is not None:
        return f"tensor {name} belongs to module {module}, which is not in the header's targets"
    return f"tensor {name} is not an adapter tensor (expected names ending in {_suffixes(spec.kind)})"


def _suffixes(kind: AdapterKind) -> list[str]:
    return [s for s, k in SUFFIX_KIND.items() if k is kind]


def rank_problems(spec: AdapterSpec, tensors: Mapping[str, TensorEntry]) -> list[str]:
    """Dimensions that must equal the header's rank (or be vectors, for ia3), model-independent."""
    rank_axis = {"flora_B": 1, "flora_A": 0, "lora_A": 0, "lora_B": 1}
    problems = []
    for name, entry in sorted(tensors.items()):
        suffix = name.rpartition(".")[2]
        if suffix in ("ia3_in", "ia3_out") and len(entry.shape) != 1:
            problems.append(f"tensor {name} has shape {list(entry.shape)}, an ia3 tensor must be a vector")
        elif suffix in rank_axis and (len(entry.shape) != 2 or entry.shape[rank_axis[suffix]] != spec.rank):
            problems.append(f"tensor {name} has shape {list(entry.shape)}, inconsistent with header rank {spec.rank}")
    return problems


def decode_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors, parsed by safetensors (only after `read_container` accepted the framing)."""
    from safetensors.torch import load as safetensors_load

    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterValidationError(where, [f"safetensors cannot parse the file: {e}"]) from e


# ---- writing -----------------------------------------------------------------------------------


def encode_adapter(spec: AdapterSpec, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The canonical file for `spec` + tensors: same content, same bytes (safetensors' own
    writer orders the metadata differently from run to run, which would defeat content addressing)."""
    header: dict[str, object] = {"__metadata__": spec_metadata(spec)}
    blobs, offset = [], 0
    # Widest dtype first (then by name) keeps every tensor aligned to its element size, as safetensors does.
    for name in sorted(tensors, key=lambda n: (-DTYPE_BYTES.get(TORCH_DTYPES.get(dtype_name(tensors[n]), ""), 0), n)):
        raw = _tensor_bytes(name, tensors[name])
        header[name] = {"dtype": TORCH_DTYPES[dtype_name(tensors[name])], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _tensor_bytes(name: str, tensor: torch.Tensor) -> bytes:
    import torch

    if dtype_name(tensor) not in TORCH_DTYPES:
        raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored (use one of {list(TORCH_DTYPES)})")
    # Raw memory of a contiguous CPU tensor: little-endian, as safetensors specifies.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---- the engine hand-off -----------------------------------------------------------------------


def load_layer_adapters(
    source: Path | bytes, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[AdapterSpec, dict[str, LayerAdapter]]:
    """A stored adapter as the engine takes it: its spec and one weights value per target module,
    ready for `MultiAdapterLinear.slots.load(slot, weights)`."""
    data, where = read_source(source)
    container = read_container(data, where, max_header_bytes)
    spec = spec_from_metadata(container.metadata, where)
    problems = tensor_name_problems(spec, container.tensors) + rank_problems(spec, container.tensors)
    if problems:
        raise AdapterValidationError(where, problems)
    tensors = decode_tensors(data, where)
    return spec, {module: _layer_adapter(spec, module, tensors) for module in spec.targets}


def _layer_adapter(spec: AdapterSpec, module: str, tensors: dict[str, torch.Tensor]) -> LayerAdapter:
    from services.engine.adapter_weights import FloraWeights, Ia3Weights, LoraWeights

    first, second = tensor_names(spec.kind, module)
    match spec.kind:
        case AdapterKind.FLORA:
            return FloraWeights(b=tensors[first], a=tensors[second])
        case AdapterKind.LORA:
            return LoraWeights(a=tensors[first], b=tensors[second], scale=spec.lora_scale)
        case AdapterKind.IA3:
            on_input = second in tensors  # `{module}.ia3_in`: scales the layer's input
            return Ia3Weights(scale=tensors[second if on_input else first], on_input=on_input)
