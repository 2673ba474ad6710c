"""PEFT directory -> adapterctl upload -> S3 + Redis -> download -> engine layer == PEFT.

PEFT is the oracle: the adapter it trained (here: random, non-zero), once stored and
loaded into the engine's MultiAdapterLinear, must compute what PEFT's own layer computes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adapters_store.format import load_layer_adapters
from services.engine.adapter_batch import AdapterBatch
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotLayout, SlotPool
from services.engine.adapter_weights import Ia3Weights, LoraWeights
from services.engine.context import using_adapter_batch
from services.engine.cost_model import FixedPaths
from services.engine.layers import MultiAdapterLinear
from tests.adapters_store.helpers import BASE_MODEL_ID, C_ATTN, run_cli, tiny_config


@pytest.fixture
def base_model():
    from transformers import GPTBigCodeForCausalLM

    torch.manual_seed(0)
    return GPTBigCodeForCausalLM(tiny_config()).eval()


def _store_and_fetch(directory, tmp_path, *args: str):
    """adapterctl upload DIR, then download the tenant's current version: (spec, layer adapters)."""
    up = run_cli("upload", directory, "--json", *args)
    assert up.code == 0, up.err
    down = run_cli("download", directory.name, "-o", tmp_path / "stored.safetensors")
    assert down.code == 0, down.err
    return up.json, load_layer_adapters(tmp_path / "stored.safetensors")


def _engine_layer(weight: torch.Tensor, bias: torch.Tensor, pool: SlotPool, adapter) -> MultiAdapterLinear:
    layer = MultiAdapterLinear(weight.detach().clone(), bias.detach().clone(), SlotLayout((pool,)))
    layer.slots.load(0, adapter)
    return layer


def _run(layer: MultiAdapterLinear, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    batch = AdapterBatch.build(slots, layer.slots.layout, FixedPaths(), layer.d_in, layer.d_out)
    with using_adapter_batch(batch):
        return layer(x)


def test_peft_lora_directory_round_trip(store_env, tmp_path, base_model):
    from peft import LoraConfig, get_peft_model

    reference_base = copy.deepcopy(base_model)
    peft_model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "user42")
    # A model built in memory records no id; --base-model names it, as it would a local checkpoint path.
    uploaded, (spec, layers) = _store_and_fetch(tmp_path / "user42", tmp_path, "--base-model", BASE_MODEL_ID)

    assert uploaded["version"]["ref"] == "user42/default@1"  # the tenant is the directory's name
    assert (spec.kind, spec.rank, spec.alpha, spec.targets, spec.base_model) == (AdapterKind.LORA, 4, 8.0, C_ATTN, BASE_MODEL_ID)
    gen = torch.Generator().manual_seed(1)
    for module in C_ATTN:
        peft_layer = peft_model.base_model.model.get_submodule(module)
        assert isinstance(layers[module], LoraWeights) and torch.equal(layers[module].a, peft_layer.lora_A["default"].weight)
        assert layers[module].b.abs().min() > 0  # really non-zero: the check below is not vacuous
        base = reference_base.get_submodule(module)
        layer = _engine_layer(base.weight, base.bias, SlotPool(AdapterKind.LORA, 4, 1), layers[module])
        x = torch.randn(6, 64, generator=gen)
        with torch.no_grad():
            y, expected, plain = _run(layer, x, [0, 0, -1, 0, -1, 0]), peft_layer(x), base(x)
        torch.testing.assert_close(y[[0, 1, 3, 5]], expected[[0, 1, 3, 5]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[[2, 4]], plain[[2, 4]], rtol=1e-5, atol=1e-5)  # rows without the adapter
        assert not torch.allclose(expected, plain, atol=1e-3)


def test_engine_model_with_stored_adapter_matches_peft_logits(store_env, tmp_path, base_model):
    """The whole tiny model, every c_attn swapped for the engine layer holding the stored adapter."""
    from peft import LoraConfig, get_peft_model

    engine_model = copy.deepcopy(base_model)
    tokens = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = base_model(tokens).logits
    peft_model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "team")
    config = json.loads((tmp_path / "team" / "adapter_config.json").read_text())
    (tmp_path / "team" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": BASE_MODEL_ID}))
    _, (spec, layers) = _store_and_fetch(tmp_path / "team", tmp_path)
    for module in spec.targets:
        parent, _, child = module.rpartition(".")
        base = engine_model.get_submodule(module)
        setattr(engine_model.get_submodule(parent), child, _engine_layer(base.weight, base.bias, SlotPool(AdapterKind.LORA, 4, 1), layers[module]))
    batch = AdapterBatch.build([0] * tokens.numel(), SlotLayout((SlotPool(AdapterKind.LORA, 4, 1),)), FixedPaths(), 64, 96)
    with torch.no_grad(), using_adapter_batch(batch):
        logits = engine_model(tokens).logits
    with torch.no_grad():
        expected = peft_model(tokens).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter changes the output


def test_peft_ia3_directory_round_trip(store_env, tmp_path, base_model):
    from peft import IA3Config, get_peft_model

    reference_base = copy.deepcopy(base_model)
    config = IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], init_ia3_weights=False)
    peft_model = get_peft_model(base_model, config).eval()
    peft_model.save_pretrained(tmp_path / "user7")
    _, (spec, layers) = _store_and_fetch(tmp_path / "user7", tmp_path, "--base-model", BASE_MODEL_ID)
    assert spec.kind is AdapterKind.IA3 and len(spec.targets) == 4
    gen = torch.Generator().manual_seed(3)
    for module in spec.targets:
        assert isinstance(layers[module], Ia3Weights) and layers[module].on_input == module.endswith("mlp.c_fc")
        base = reference_base.get_submodule(module)
        layer = _engine_layer(base.weight, base.bias, SlotPool(AdapterKind.IA3, 1, 1), layers[module])
        x = torch.randn(5, 64, generator=gen)
        with torch.no_grad():
            y, expected = _run(layer, x, [0] * 5), peft_model.base_model.model.get_submodule(module)(x)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_peft_upload_is_deterministic(store_env, tmp_path, base_model):
    """Normalizing the same PEFT directory twice gives the same bytes, so a re-upload is a no-op."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(base_model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)).save_pretrained(tmp_path / "user42")
    first = run_cli("upload", tmp_path / "user42", "--base-model", BASE_MODEL_ID, "--json").json
    again = run_cli("upload", tmp_path / "user42", "--base-model", BASE_MODEL_ID, "--json").json
    assert (again["added"], again["version"]["sha256"]) == (False, first["version"]["sha256"])
