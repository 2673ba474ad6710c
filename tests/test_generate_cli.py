"""`flora-gateway generate` on SmolLM2 with an adapter file from the store's format."""

from __future__ import annotations

import torch

from adapters_store.format import encode_adapter
from services.cli import main
from services.engine.adapter_format import AdapterKind, AdapterSpec, tensor_names
from services.engine.models.smollm2 import materialize_smollm2

PROMPT = "def add(a, b):"


def flora_file(path, scale: float, layers: int = 30, d: int = 576, kv: int = 192):
    """A rank-2 FLoRA adapter on every q_proj and k_proj: B = 1, A = scale / 2 (B A = scale)."""
    tensors, targets = {}, []
    for i in range(layers):
        for proj, d_out in (("q_proj", d), ("k_proj", kv)):
            module = f"model.layers.{i}.self_attn.{proj}"
            b_name, a_name = tensor_names(AdapterKind.FLORA, module)
            tensors[b_name], tensors[a_name] = torch.ones(d, 2), torch.full((2, d_out), scale / 2)
            targets.append(module)
    path.write_bytes(encode_adapter(AdapterSpec(AdapterKind.FLORA, 2, tuple(targets), "SmolLM2-135M-Instruct"), tensors))
    return path


def lora_file(path, layers: int = 30, d: int = 576, kv: int = 192):
    """A rank-8 LoRA adapter on every q_proj and v_proj: random weights that change the text and keep it code."""
    gen = torch.Generator().manual_seed(0)
    tensors, targets = {}, []
    for i in range(layers):
        for proj, d_out in (("q_proj", d), ("v_proj", kv)):
            module = f"model.layers.{i}.self_attn.{proj}"
            a_name, b_name = tensor_names(AdapterKind.LORA, module)
            tensors[a_name], tensors[b_name] = 0.05 * torch.randn(8, d, generator=gen), 0.05 * torch.randn(d_out, 8, generator=gen)
            targets.append(module)
    path.write_bytes(encode_adapter(AdapterSpec(AdapterKind.LORA, 8, tuple(targets), "SmolLM2-135M-Instruct", alpha=16.0), tensors))
    return path


def generate(capsys, *extra: str) -> str:
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--threads", "1", *extra]) == 0
    return capsys.readouterr().out


def test_identity_adapter_file_gives_the_base_text(tmp_path, capsys):
    materialize_smollm2()
    base = generate(capsys)
    assert len(base.strip()) > 0
    assert generate(capsys, "--adapter", str(flora_file(tmp_path / "identity.safetensors", 1.0))) == base
    # scaling q and k by 3 sharpens every attention pattern: the text must change
    assert generate(capsys, "--adapter", str(flora_file(tmp_path / "sharp.safetensors", 3.0))) != base


def test_bad_sampling_arguments_exit_2(capsys):
    assert main(["generate", "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_int8_weights_generate_sensible_code(capsys):
    materialize_smollm2()
    assert "return a + b" in generate(capsys, "--quantization", "int8")


def test_lora_in_narrow_slots_generates_the_exact_slots_text(tmp_path, capsys):
    """--lora-dtype bfloat16 / int8 store the adapter in 2 / 1 bytes per weight; greedy text stays the fp32 slots' text."""
    materialize_smollm2()
    adapter = str(lora_file(tmp_path / "lora.safetensors"))
    base, exact = generate(capsys), generate(capsys, "--adapter", adapter)
    assert exact != base  # the adapter matters
    for lora_dtype in ("bfloat16", "int8"):
        assert generate(capsys, "--adapter", adapter, "--lora-dtype", lora_dtype) == exact
