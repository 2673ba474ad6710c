"""GPTBigCode against transformers (MQA and MHA), PEFT LoRA rows, the loader's errors, random StarCoder shapes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotLayout, SlotPool
from services.engine.attention import AttentionBatch, SequenceChunk
from services.engine.context import StepContext, using_step
from services.engine.model_shapes import ModelConfigError
from services.engine.models.gpt_bigcode import ADAPTER_MODULES
from services.engine.models.loader import CheckpointError, load_model, random_model, starcoder_config
from tests.engine.models.conftest import (
    assert_matches_transformers,
    saved_checkpoint,
    TOLERANCE,
    PagedRunner,
    hf_logits,
    load_peft_lora,
    max_diff,
    random_tokens,
)

VOCAB = 128
NO_POOLS = SlotLayout(())
LORA_LAYOUT = SlotLayout((SlotPool(AdapterKind.LORA, 4, 2),))
PROMPT_LENGTHS = (5, 11, 1, 8)
# Steps after the prefill, {sequence: new tokens}: decode rows mixed with chunked-prefill-like chunks,
# and steps that leave some sequences out.
PLAN = ({0: 1, 1: 1, 2: 3, 3: 1}, {0: 2, 2: 1}, {0: 1, 1: 1, 2: 1, 3: 1}, {1: 4, 3: 1})


def tiny_config(multi_query: bool) -> GPTBigCodeConfig:
    return GPTBigCodeConfig(
        vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, multi_query=multi_query,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@pytest.fixture(scope="module", params=[True, False], ids=["mqa", "mha"])
def checkpoint(request, tmp_path_factory):
    """(transformers model, its saved safetensors directory)."""
    torch.manual_seed(0)
    return saved_checkpoint(GPTBigCodeForCausalLM(tiny_config(request.param)), tmp_path_factory.mktemp("gpt_bigcode"))


@pytest.mark.parametrize("adapter_modules", [(), ADAPTER_MODULES], ids=["plain", "all-adaptable"])
def test_ragged_prefill_and_decode_match_transformers(checkpoint, adapter_modules):
    hf, path = checkpoint
    ours = load_model(path, adapter_modules, LORA_LAYOUT)
    assert len(ours.adapted_layers()) == 2 * len(adapter_modules)
    assert_matches_transformers(ours, hf, PROMPT_LENGTHS, PLAN, 24, VOCAB)


def test_model_interface(checkpoint):
    hf, path = checkpoint
    ours = load_model(path, ("attn.c_attn", "mlp.c_proj"), LORA_LAYOUT)
    c = hf.config
    assert (ours.num_layers, ours.hidden_size, ours.vocab_size, ours.max_positions) == (2, 32, VOCAB, 48)
    assert (ours.num_kv_heads, ours.head_dim) == ((1 if c.multi_query else 4), 8)
    layers = ours.adapted_layers()
    assert sorted(layers) == sorted(f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj"))
    assert [layers[f"transformer.h.1.{m}"].batch_index for m in ("attn.c_attn", "mlp.c_proj")] == [0, 1]
    assert torch.equal(layers["transformer.h.1.attn.c_attn"].weight, hf.transformer.h[1].attn.c_attn.weight)


def test_lora_row_matches_peft_and_base_row_matches_base(checkpoint):
    hf, path = checkpoint
    peft_model = get_peft_model(
        GPTBigCodeForCausalLM.from_pretrained(path), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    ).eval()
    ours = load_model(path, ("attn.c_attn",), SlotLayout((SlotPool(AdapterKind.LORA, 4, 1),)))
    load_peft_lora(ours, peft_model, slot=0)
    gen = torch.Generator().manual_seed(3)
    prompts = [random_tokens(gen, 6, VOCAB), random_tokens(gen, 9, VOCAB)]
    runner = PagedRunner(ours, 2, 16, slot_ids=[0, -1])  # sequence 0: the LoRA tenant, sequence 1: the base model
    seqs = [list(p) for p in prompts]
    with torch.inference_mode():
        got = runner.step([0, 1], prompts)
        for step in range(4):
            expected = [hf_logits(peft_model, seqs[0]), hf_logits(hf, seqs[1])]
            for logits, exp in zip(got, expected):
                assert max_diff(logits[-1], exp[-1]) <= TOLERANCE, f"step {step}"
            assert max_diff(expected[0], hf_logits(hf, seqs[0])) > 1e-2  # the adapter matters
            new = [[int(g[-1].argmax())] for g in got]
            seqs = [s + n for s, n in zip(seqs, new)]
            got = runner.step([0, 1], new)


# ---------------------------------------------------------------------------------------------
# Errors


def copy_checkpoint(path, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(path, out)
    return out


def test_unknown_model_type(checkpoint, tmp_path):
    out = copy_checkpoint(checkpoint[1], tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelConfigError, match=r"model_type 'bert' is not supported \(supported: \['gpt_bigcode', 'llama'\]\)"):
        load_model(out, (), NO_POOLS)


def edit_weights(out, edit) -> None:
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(checkpoint, tmp_path):
    out = copy_checkpoint(checkpoint[1], tmp_path)
    edit_weights(out, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): transformer.h.1.mlp.c_fc.bias$"):
        load_model(out, (), NO_POOLS)


def test_wrong_shape_and_unexpected_tensor(checkpoint, tmp_path):
    out = copy_checkpoint(checkpoint[1], tmp_path)

    def edit(t):
        t["transformer.wpe.weight"] = torch.zeros(32, 32)
        t["transformer.h.0.attn.q_attn.weight"] = torch.zeros(4)

    edit_weights(out, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(out, (), NO_POOLS)
    assert "1 unexpected tensor(s): transformer.h.0.attn.q_attn.weight" in str(err.value)
    assert "1 mis-shaped tensor(s): transformer.wpe.weight: checkpoint (32, 32) vs model (48, 32)" in str(err.value)


def test_no_safetensors(checkpoint, tmp_path):
    out = copy_checkpoint(checkpoint[1], tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files in .*never pickle"):
        load_model(out, (), NO_POOLS)


def test_unknown_adapter_module(checkpoint):
    allowed = r"\['attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'\]"
    with pytest.raises(ValueError, match=rf"unknown adapter module\(s\) \['self_attn.q_proj'\]: this model allows {allowed}"):
        load_model(checkpoint[1], ("attn.c_attn", "self_attn.q_proj"), LORA_LAYOUT)


def test_kv_cache_errors(checkpoint):
    ours = load_model(checkpoint[1], (), NO_POOLS)
    batch = AttentionBatch.build([SequenceChunk(0, 2, (0,))], 4)
    with pytest.raises(RuntimeError, match="no KV cache attached"), torch.inference_mode(), using_step(StepContext((), batch)):
        ours(torch.tensor([5, 6]), batch.positions)
    kv = ours.num_kv_heads
    with pytest.raises(ValueError, match=rf"k_cache must be \[num_layers=2, slots, kv_heads={kv}, head_dim=8\], got \(3, 16, {kv}, 8\)"):
        ours.attach_kv_cache(torch.zeros(3, 16, kv, 8), torch.zeros(3, 16, kv, 8))
    with pytest.raises(TypeError, match="KV cache is torch.bfloat16 but the model computes in torch.float32"):
        ours.attach_kv_cache(torch.zeros(2, 16, kv, 8, dtype=torch.bfloat16), torch.zeros(2, 16, kv, 8, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Random StarCoder shapes (benchmarks)


@pytest.mark.parametrize(
    "name,billions", [("starcoderbase-1b", 1.14), ("starcoderbase-3b", 3.04), ("starcoderbase-7b", 7.33), ("starcoder-15b", 15.52)]
)
def test_starcoder_shapes(name, billions):
    """Built on the meta device: shapes and parameter counts without allocating gigabytes."""
    model = random_model(starcoder_config(name), ("attn.c_attn",), LORA_LAYOUT, torch.bfloat16, device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    assert model.num_kv_heads == 1 and model.head_dim == 128 and model.max_positions == 8192


def test_random_model_is_seeded_and_runs_in_bf16():
    config = {**starcoder_config("starcoderbase-1b"), "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "vocab_size": 256}
    a = random_model(config, ("attn.c_attn",), LORA_LAYOUT, torch.bfloat16, seed=7)
    b = random_model(config, ("attn.c_attn",), LORA_LAYOUT, torch.bfloat16, seed=7)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype is torch.bfloat16 and torch.equal(p, q), name
    w = a.transformer.h[0].mlp.c_fc.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(a.transformer.ln_f.weight, torch.ones(64, dtype=torch.bfloat16))
    with torch.inference_mode():
        (logits,) = PagedRunner(a, 1, 8).step([0], [[1, 2, 3, 4, 5]])
    assert logits.shape == (5, 256) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match=r"unknown StarCoder config 'starcoder-2b' \(known: \["):
        starcoder_config("starcoder-2b")
