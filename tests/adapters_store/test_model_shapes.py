"""model_shapes against the real transformers modules: every nn.Linear it names, with its shape."""

from __future__ import annotations

import json

import pytest
from torch import nn

from services.engine.model_shapes import ModelConfigError, ModuleShape, load_config, module_shapes


def _linear_shapes(model: nn.Module, names: set[str]) -> dict[str, ModuleShape]:
    return {n: ModuleShape(m.in_features, m.out_features) for n, m in model.named_modules() if n in names}


def _adaptable_linears(model: nn.Module) -> set[str]:
    """Every linear layer inside the transformer blocks (not the LM head)."""
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (".h." in n or ".layers." in n)}


@pytest.mark.parametrize(
    "options",
    [dict(multi_query=True), dict(multi_query=False), dict(multi_query=True, n_inner=96)],
    ids=["multi-query", "multi-head", "n_inner"],
)
def test_gpt_bigcode_matches_transformers(options):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0, **options)
    model = GPTBigCodeForCausalLM(config)
    shapes = module_shapes(config.to_dict())
    assert set(shapes) == _adaptable_linears(model)
    assert shapes == _linear_shapes(model, set(shapes))
    assert shapes["transformer.h.2.attn.c_attn"] == ModuleShape(64, 96 if options["multi_query"] else 192)


def test_llama_grouped_query_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=128, bos_token_id=0, eos_token_id=1)  # fmt: skip
    model = LlamaForCausalLM(config)
    shapes = module_shapes(config.to_dict())
    assert set(shapes) == _adaptable_linears(model)
    assert shapes == _linear_shapes(model, set(shapes))
    assert shapes["model.layers.1.self_attn.k_proj"] == ModuleShape(64, 32)  # 2 kv heads of 16


def test_llama_defaults_when_fields_are_absent():
    # Old configs have neither num_key_value_heads (then = heads) nor head_dim (then hidden / heads).
    config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 48}
    shapes = module_shapes(config)
    assert shapes["model.layers.0.self_attn.v_proj"] == ModuleShape(32, 32)
    assert shapes["model.layers.0.mlp.down_proj"] == ModuleShape(48, 32)
    assert len(shapes) == 7


def test_unknown_model_type_is_named():
    with pytest.raises(ModelConfigError, match=r"model_type 'gpt2' is not supported \(supported: \['gpt_bigcode', 'llama'\]\)"):
        module_shapes({"model_type": "gpt2"})


@pytest.mark.parametrize("value", [None, 0, -4, "64", True, 6.5])
def test_bad_size_field_is_named(value):
    config = {"model_type": "gpt_bigcode", "n_embd": value, "n_layer": 1, "n_head": 1}
    with pytest.raises(ModelConfigError, match=f"config field 'n_embd' must be a positive integer, got {value!r}"):
        module_shapes(config)


def test_load_config_from_file_or_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert load_config(tmp_path) == load_config(tmp_path / "config.json") == {"model_type": "llama", "hidden_size": 8}


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ModelConfigError, match=f"cannot read base model config {tmp_path / 'missing.json'}"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="bad.json is not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ModelConfigError, match="list.json must be a JSON object"):
        load_config(tmp_path / "list.json")
