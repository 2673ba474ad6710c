"""`flora-gateway generate` on SmolLM2 with an adapter file from the store's format, and its
one-line errors for bad input (most on a tiny random model with a character tokenizer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from adapters_store.format import encode_adapter
from services.cli import main
from services.engine.adapter_format import AdapterKind, AdapterSpec, tensor_names
from services.engine.models.smollm2 import materialize_smollm2
from tests.engine.engine_fixtures import VOCAB, save_tiny_gpt_bigcode

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


# ---- bad input: one line naming the argument, exit 2, no traceback -------------------------------


def error_line(capsys, *argv: str) -> str:
    """Run `generate` in-process, expecting bad input: exit 2 and exactly one stderr line."""
    try:
        code = main(["generate", "--threads", "1", *argv])
    except SystemExit as e:  # argparse's own checks exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("flora-gateway generate: error: ")
    return err.removeprefix("flora-gateway generate: error: ").rstrip("\n")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """The engine tests' tiny GPTBigCode (128 positions) plus a tokenizer: one token per character."""
    path = save_tiny_gpt_bigcode(tmp_path_factory.mktemp("tiny"))
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2} | {chr(i - 3 + 32): i for i in range(3, VOCAB)}
    chars = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    chars.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=chars, eos_token="<eos>").save_pretrained(path)
    return str(path)


def tiny_flora_file(path: Path, module: str, d_in: int, d_out: int = 48) -> str:
    b_name, a_name = tensor_names(AdapterKind.FLORA, module)
    tensors = {b_name: torch.ones(d_in, 2), a_name: torch.full((2, d_out), 0.5)}
    path.write_bytes(encode_adapter(AdapterSpec(AdapterKind.FLORA, 2, (module,), "tiny"), tensors))
    return str(path)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ((), "--prompt"),  # missing
        (("--prompt", "x", "--threads", "0"), "--threads"),
        (("--prompt", "x", "--threads", "two"), "--threads"),
        (("--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens"),
        (("--prompt", "x", "--temperature", "-1"), "--temperature"),
        (("--prompt", "x", "--temperature", "nan"), "--temperature"),
        (("--prompt", "x", "--top-p", "0"), "--top-p"),
        (("--prompt", "x", "--top-p", "1.5"), "--top-p"),
        (("--prompt", "x", "--top-k", "-1"), "--top-k"),
        (("--prompt", "x", "--seed", str(2**64)), "--seed"),
        (("--prompt", "x", "--stop", ""), "--stop"),
        (("--prompt", "x", "--quantization", "int4"), "--quantization"),
        (("--prompt", "x", "--bogus"), "--bogus"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_flag(capsys, argv, named):
    assert named in error_line(capsys, *argv)


def test_cheap_checks_come_before_any_model(tmp_path, capsys, monkeypatch):
    """Checked in order prompt, adapter file, model directory: none needs SmolLM2 converted."""
    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path / "cache"))
    missing = str(tmp_path / "missing.safetensors")
    assert error_line(capsys, "--prompt", "", "--adapter", missing) == "--prompt: is empty"
    assert error_line(capsys, "--prompt", "hi", "--adapter", missing, "--model", "/nonexistent") == (
        f"--adapter {missing}: cannot read file: No such file or directory"
    )
    assert error_line(capsys, "--prompt", "hi", "--adapter", str(tmp_path)).endswith("cannot read file: Is a directory")
    (tmp_path / "notes.txt").write_text("not an adapter at all\n")
    assert "not a safetensors file" in error_line(capsys, "--prompt", "hi", "--adapter", str(tmp_path / "notes.txt"))
    assert error_line(capsys, "--prompt", "hi", "--model", "/nonexistent").startswith("--model /nonexistent: not a directory")
    assert not (tmp_path / "cache").exists()


def test_adapter_not_made_for_the_model_is_refused_before_it_loads(tmp_path, capsys, tiny_model):
    c_attn = "transformer.h.0.attn.c_attn"  # d_in 32, d_out 48
    wrong_shape = tiny_flora_file(tmp_path / "shape.safetensors", c_attn, d_in=33)
    err = error_line(capsys, "--model", tiny_model, "--adapter", wrong_shape, "--prompt", "hi")
    assert err.startswith(f"--adapter {wrong_shape}: tensor {c_attn}.flora_B has shape [33, 2], expected [32, 2]")
    no_layer = tiny_flora_file(tmp_path / "layer.safetensors", "transformer.h.7.attn.c_attn", d_in=32)
    err = error_line(capsys, "--model", tiny_model, "--adapter", no_layer, "--prompt", "hi")
    assert err.startswith(f"--adapter {no_layer}: target transformer.h.7.attn.c_attn is not a linear module")
    ok = tiny_flora_file(tmp_path / "ok.safetensors", c_attn, d_in=32)  # and the checks pass a right one
    assert main(["generate", "--model", tiny_model, "--adapter", ok, "--prompt", "def", "--max-new-tokens", "2", "--threads", "1"]) == 0


def test_prompt_longer_than_the_context(capsys, tiny_model):
    err = error_line(capsys, "--model", tiny_model, "--prompt", "x" * 200)
    assert err == "--prompt: the prompt has 200 tokens; this model's context is 128"


def test_broken_model_directories_name_model(tmp_path, capsys):
    model = save_tiny_gpt_bigcode(tmp_path / "tiny")  # no tokenizer files
    capsys.readouterr()  # transformers' progress bar
    assert error_line(capsys, "--model", str(model), "--prompt", "hi").startswith(f"--model {model}: ")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])
    assert "deserializing header" in error_line(capsys, "--model", str(model), "--prompt", "hi")
    (model / "config.json").unlink()
    assert error_line(capsys, "--model", str(model), "--prompt", "hi") == (
        f"--model {model}: cannot read base model config {model}/config.json: No such file or directory"
    )


def test_console_script_prints_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("flora-gateway")
    argv = [str(script), "generate", "--adapter", str(tmp_path / "missing.safetensors"), "--prompt", "hi"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    missing = f"{tmp_path}/missing.safetensors"
    assert done.stderr == f"flora-gateway generate: error: --adapter {missing}: cannot read file: No such file or directory\n"
