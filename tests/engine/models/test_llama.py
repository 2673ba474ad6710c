"""Llama (GQA, RoPE) against transformers, PEFT LoRA on two module types, config errors."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotLayout, SlotPool
from services.engine.model_shapes import ModelConfigError
from services.engine.models.llama import ADAPTER_MODULES, LlamaConfig as OurLlamaConfig, RopeConfig
from services.engine.models.loader import build_model, load_model
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
LORA_LAYOUT = SlotLayout((SlotPool(AdapterKind.LORA, 4, 2),))
PROMPT_LENGTHS = (7, 2, 13, 4)
PLAN = ({0: 1, 1: 1, 2: 1, 3: 1}, {1: 3, 3: 1}, {0: 1, 1: 1, 2: 2, 3: 1}, {0: 5, 2: 1})
VARIANTS = {
    # untied head, plain RoPE, no biases: SmolLM2's shape of model (which ties the head)
    "plain-rope": dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # tied head, Llama-3.1 RoPE scaling, biases everywhere, a gated GELU instead of SiLU (the MLP's
    # generic act(gate) * up path rather than the fused silu_mul kernel)
    "llama3-rope": dict(
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        hidden_act="gelu_pytorch_tanh",
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    ),  # fmt: skip
}


def tiny_config(variant: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, **VARIANTS[variant],
    )  # fmt: skip


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(transformers model, its saved safetensors directory)."""
    torch.manual_seed(0)
    return saved_checkpoint(LlamaForCausalLM(tiny_config(request.param)), tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("adapter_modules", [(), ADAPTER_MODULES], ids=["plain", "all-adaptable"])
def test_ragged_prefill_and_decode_match_transformers(checkpoint, adapter_modules):
    hf, path = checkpoint
    ours = load_model(path, adapter_modules, LORA_LAYOUT)
    assert (ours.num_kv_heads, ours.head_dim, ours.num_layers) == (2, 16, 2)
    assert len(ours.adapted_layers()) == 2 * len(adapter_modules)
    assert_matches_transformers(ours, hf, PROMPT_LENGTHS, PLAN, 28, VOCAB)


def test_tied_head_shares_the_embedding(checkpoint):
    hf, path = checkpoint
    ours = load_model(path, (), SlotLayout(()))
    names = {n for n, _ in ours.named_parameters()}
    assert ("lm_head.weight" in names) == (not hf.config.tie_word_embeddings)


def test_lora_on_q_and_v_matches_peft(checkpoint):
    """Two adapted module types: each reads its own AdapterBatch (batch_index 0 and 1)."""
    hf, path = checkpoint
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(path), config).eval()
    ours = load_model(path, ("self_attn.v_proj", "self_attn.q_proj"), LORA_LAYOUT)
    load_peft_lora(ours, peft_model, slot=1)
    gen = torch.Generator().manual_seed(3)
    prompts = [random_tokens(gen, 5, VOCAB), random_tokens(gen, 8, VOCAB)]
    runner = PagedRunner(ours, 2, 16, slot_ids=[-1, 1])  # sequence 1 is the LoRA tenant
    with torch.inference_mode():
        base_logits, lora_logits = runner.step([0, 1], prompts)
        assert max_diff(base_logits, hf_logits(hf, prompts[0])) <= TOLERANCE
        assert max_diff(lora_logits, hf_logits(peft_model, prompts[1])) <= TOLERANCE
        assert max_diff(hf_logits(peft_model, prompts[1]), hf_logits(hf, prompts[1])) > 1e-2  # the adapter matters
        new = [[int(base_logits[-1].argmax())], [int(lora_logits[-1].argmax())]]
        base_next, lora_next = runner.step([0, 1], new)
        assert max_diff(base_next[-1], hf_logits(hf, prompts[0] + new[0])[-1]) <= TOLERANCE
        assert max_diff(lora_next[-1], hf_logits(peft_model, prompts[1] + new[1])[-1]) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# Config reading and errors

BASE = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
}  # fmt: skip


def test_legacy_rope_fields():
    """transformers 4.x wrote rope_theta at the top level and scaling as rope_scaling."""
    legacy = OurLlamaConfig.from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy.rope == RopeConfig(5e5, "linear", factor=2.0, original_max_positions=32)
    assert OurLlamaConfig.from_hf(BASE).rope == RopeConfig(10000.0)
    v5 = OurLlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}})
    assert v5.rope == RopeConfig(100000.0)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, r"rope type 'yarn' is not supported"),
        ({"rope_scaling": {"type": "linear"}}, r"rope type 'linear' needs the field 'factor'"),
        ({"num_key_value_heads": 3}, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"hidden_act": "tanh"}, r"hidden_act 'tanh' is not supported"),
        ({"hidden_size": True}, r"config field 'hidden_size' must be a positive integer, got True"),
    ],
)
def test_bad_config(fields, message):
    with pytest.raises(ModelConfigError, match=message):
        build_model({**BASE, **fields}, (), SlotLayout(()))


def test_unknown_adapter_module():
    allowed = r"\['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', "
    allowed += r"'mlp.down_proj'\]"
    with pytest.raises(ValueError, match=rf"unknown adapter module\(s\) \['attn.c_attn'\]: this model allows {allowed}"):
        build_model(BASE, ("attn.c_attn",), LORA_LAYOUT)
    with pytest.raises(TypeError, match=r"adapter_modules must be a tuple of module names, got the string 'mlp.up_proj'"):
        build_model(BASE, "mlp.up_proj", LORA_LAYOUT)
    with pytest.raises(ValueError, match=r"adapter_modules lists a module twice"):
        build_model(BASE, ("mlp.up_proj", "mlp.up_proj"), LORA_LAYOUT)
