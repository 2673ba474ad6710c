"""The adapter file format: canonical writing, strict reading, and the hand-off to the engine."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters_store.errors import AdapterValidationError, UsageError
from adapters_store.format import encode_adapter, load_layer_adapters, read_container, spec_from_metadata, tensor_name_problems
from adapters_store.names import AdapterRef, check_name
from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.adapter_slots import SlotLayout, SlotPool
from services.engine.adapter_weights import FloraWeights, Ia3Weights, LoraWeights
from services.engine.context import using_adapter_batch
from services.engine.cost_model import FixedPaths
from services.engine.adapter_batch import AdapterBatch
from services.engine.layers import MultiAdapterLinear
from services.engine.reference import reference_linear
from tests.adapters_store.helpers import BASE_MODEL_ID, C_ATTN, adapter_tensors, lora_spec, tiny_shapes

FLORA = AdapterSpec(AdapterKind.FLORA, 3, C_ATTN, BASE_MODEL_ID)
IA3 = AdapterSpec(AdapterKind.IA3, 1, C_ATTN, BASE_MODEL_ID)


def test_encoding_is_canonical_and_readable_by_safetensors(tmp_path):
    spec, tensors = lora_spec(), adapter_tensors(lora_spec())
    data = encode_adapter(spec, tensors)
    assert encode_adapter(spec, dict(reversed(tensors.items()))) == data  # input order does not matter
    (tmp_path / "a.safetensors").write_bytes(data)
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"format_version": "1", "kind": "lora", "rank": "4", "targets": json.dumps(list(C_ATTN)),
                                "base_model": BASE_MODEL_ID, "alpha": "8.0"}  # fmt: skip
        assert sorted(f.keys()) == sorted(tensors)
        assert all(torch.equal(f.get_tensor(n), t) for n, t in tensors.items())


def test_mixed_dtypes_stay_aligned():
    tensors = {"m.lora_A": torch.randn(3, 5, dtype=torch.float16), "m.lora_B": torch.randn(7, 3, dtype=torch.float32)}
    container = read_container(encode_adapter(AdapterSpec(AdapterKind.LORA, 3, ("m",), "x", 1.0), tensors), "<bytes>")
    assert all(e.start % {"F32": 4, "F16": 2}[e.dtype] == 0 for e in container.tensors.values())


@pytest.mark.parametrize("spec", [FLORA, lora_spec(rank=2), IA3], ids=lambda s: s.kind.value)
def test_load_layer_adapters_gives_engine_types(spec):
    tensors = adapter_tensors(spec, seed=3)
    loaded_spec, layers = load_layer_adapters(encode_adapter(spec, tensors))
    assert loaded_spec == spec and list(layers) == list(spec.targets)
    for module, weights in layers.items():
        match weights:
            case FloraWeights(b=b, a=a):
                assert torch.equal(b, tensors[f"{module}.flora_B"]) and torch.equal(a, tensors[f"{module}.flora_A"])
            case LoraWeights(a=a, b=b, scale=scale):
                assert torch.equal(a, tensors[f"{module}.lora_A"]) and torch.equal(b, tensors[f"{module}.lora_B"])
                assert scale == spec.alpha / spec.rank
            case Ia3Weights(scale=scale, on_input=on_input):
                assert not on_input and torch.equal(scale, tensors[f"{module}.ia3_out"])


def test_stored_adapters_run_in_the_engine_layer():
    """Three stored adapters of three kinds in one mixed batch equal the plain-torch reference."""
    ia3_in = AdapterSpec(AdapterKind.IA3, 1, ("transformer.h.0.mlp.c_fc",), BASE_MODEL_ID)
    module = "transformer.h.0.mlp.c_fc"
    specs = [AdapterSpec(AdapterKind.FLORA, 2, (module,), BASE_MODEL_ID), lora_spec(3, (module,)), ia3_in]
    tensors = [adapter_tensors(s, seed=i) for i, s in enumerate(specs)]
    tensors[2] = {f"{module}.ia3_in": 1 + 0.1 * torch.randn(64)}  # the input-side IA3 vector
    adapters = [load_layer_adapters(encode_adapter(s, t))[1][module] for s, t in zip(specs, tensors)]
    shape = tiny_shapes()[module]
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(shape.d_out, shape.d_in, generator=gen), torch.randn(shape.d_out, generator=gen)
    layout = SlotLayout((SlotPool(AdapterKind.FLORA, 4, 1), SlotPool(AdapterKind.LORA, 4, 1), SlotPool(AdapterKind.IA3, 1, 1)))
    layer = MultiAdapterLinear(weight, bias, layout)
    for slot, adapter in enumerate(adapters):
        layer.slots.load(slot, adapter)
    slots = [2, 0, -1, 1, 0, 2]
    x = torch.randn(len(slots), shape.d_in, generator=gen)
    with using_adapter_batch(AdapterBatch.build(slots, layout, FixedPaths(), shape.d_in, shape.d_out)):
        y = layer(x)
    expected = reference_linear(x, weight, bias, [None if s < 0 else adapters[s] for s in slots])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# ---- strict reading ----------------------------------------------------------------------------


def _with_header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9), "1 unexpected bytes after the last tensor"),
        (_with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "data starts at byte 4, expected 0"),
        (_with_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "F32 [3] needs 12 bytes, its offsets span 8"),
        (_with_header({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype 'Q4'"),
        (_with_header({"a": {"dtype": "F32"}}), "malformed header entry"),
        (_with_header({"__metadata__": {"rank": 4}}), "__metadata__ must map strings to strings"),
        (_with_header([1, 2]), "the header is not a JSON object"),
        (struct.pack("<Q", 4) + b"{abc", "the header is not valid JSON"),
    ],
)
def test_container_errors_say_what_is_wrong(data, message):
    with pytest.raises(AdapterValidationError, match=f"^<bytes>: .*{_re(message)}"):
        read_container(data, "<bytes>")


def _re(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "dora"}, "kind 'dora' is not one of ['flora', 'lora', 'ia3']"),
        ({"rank": "four"}, "rank 'four' is not an integer"),
        ({"rank": "0"}, "rank must be >= 1, got 0"),
        ({"targets": "c_attn"}, "targets must be a JSON list of module names"),
        ({"targets": '["a", "a"]'}, "targets lists ['a'] more than once"),
        ({"alpha": None}, "alpha is required for lora and only for lora"),
        ({"alpha": "nan"}, "alpha must be finite and non-zero"),
        ({"format_version": "2"}, "format_version '2' is not supported"),
        ({"base_model": None}, "header metadata lacks ['base_model']"),
    ],
)
def test_metadata_errors_say_what_is_wrong(change, message):
    metadata = {"format_version": "1", "kind": "lora", "rank": "4", "targets": '["a"]', "base_model": "m", "alpha": "8"}
    metadata = {k: v for k, v in {**metadata, **change}.items() if v is not None}
    with pytest.raises(AdapterValidationError, match=_re(message)):
        spec_from_metadata(metadata, "f.safetensors")


def test_peft_file_gets_a_hint():
    with pytest.raises(AdapterValidationError, match="a PEFT adapter_model.safetensors\\? upload its directory instead"):
        spec_from_metadata({"format": "pt"}, "adapter_model.safetensors")


def test_tensor_name_problems_name_each_tensor():
    spec = AdapterSpec(AdapterKind.FLORA, 2, ("m.0", "m.1"), "x")
    names = {"m.0.flora_B", "m.0.lora_A", "m.1.flora_A", "m.1.flora_B", "m.2.flora_A", "m.1.weight"}
    assert tensor_name_problems(spec, names) == [
        "target m.0 lacks tensor(s) ['m.0.flora_A']",
        "tensor m.0.lora_A is a lora tensor but the header says kind=flora",
        "tensor m.1.weight is not an adapter tensor (expected names ending in ['flora_B', 'flora_A'])",
        "tensor m.2.flora_A belongs to module m.2, which is not in the header's targets",
    ]
    ia3 = AdapterSpec(AdapterKind.IA3, 1, ("m.0",), "x")
    assert tensor_name_problems(ia3, {"m.0.ia3_in", "m.0.ia3_out"}) == [
        "ia3 target m.0 needs exactly one of ['m.0.ia3_out', 'm.0.ia3_in'], found ['m.0.ia3_out', 'm.0.ia3_in']"
    ]


# ---- names and references ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["user42", "a", "Team-7.prod_v2", "x" * 64])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "tenant name is empty"),
        ("../etc", "has '.' at position 0"),
        ("a/b", "contains a path separator '/' at position 1"),
        ("a\\b", "contains a path separator '\\\\' at position 1"),
        ("bell\x07", "contains control character U+0007 at position 4"),
        ("new\nline", "contains control character U+000A at position 3"),
        ("a:b", "has ':' at position 1"),
        ("a b", "has ' ' at position 1"),
        ("é", "has 'é' at position 0"),
        ("x" * 65, "is 65 characters, the limit is 64"),
    ],
)
def test_invalid_names_say_which_character(name, message):
    with pytest.raises(UsageError, match=_re(message)):
        check_name(name)


def test_references_parse_and_print():
    assert AdapterRef.parse("user42") == AdapterRef("user42")
    assert AdapterRef.parse("user42/default") == AdapterRef("user42", "default")
    assert AdapterRef.parse("user42/default@3") == AdapterRef("user42", "default", 3)
    assert str(AdapterRef("user42", "default", 3)) == "user42/default@3"
    with pytest.raises(UsageError, match="version 'x' must be a positive integer"):
        AdapterRef.parse("user42/default@x")
    with pytest.raises(UsageError, match="adapter name 'a/b' contains a path separator"):
        AdapterRef.parse("user42/a/b")


def test_reading_headers_does_not_import_torch():
    """Routers read the registry and headers, and most adapterctl commands only the registry:
    none of them should pay seconds for importing torch."""
    code = ("import sys, adapters_store.format, adapters_store.registry, adapters_store.blobstore, adapters_store.cli;"
            "print('torch' in sys.modules)")  # fmt: skip
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo, env=env)
    assert result.stdout.strip() == "False"
