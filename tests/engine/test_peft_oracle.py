"""PEFT is the oracle for LoRA and IA3 rows.

A tiny GPTBigCode model gets two PEFT LoRA adapters on `c_attn`, run through
PEFT's own mixed batch (`adapter_names=[...]`). The same base weights with every
`c_attn` swapped for our MultiAdapterLinear, loaded with PEFT's tensors, must give
the same logits for every row, under every LoRA kernel path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

from services.engine.adapter_batch import PATHS_BY_KIND, AdapterBatch
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import SlotLayout, SlotPool
from services.engine.adapter_weights import Ia3Weights, LoraWeights
from services.engine.context import using_adapter_batch
from services.engine.cost_model import FixedPaths
from services.engine.layers import MultiAdapterLinear
from tests.engine.helpers import rel_err

SEQ_LEN = 7


def tiny_gpt_bigcode() -> GPTBigCodeForCausalLM:
    torch.manual_seed(0)
    config = GPTBigCodeConfig(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, multi_query=True, bos_token_id=1, eos_token_id=2
    )
    return GPTBigCodeForCausalLM(config).eval()


def swap_in_multi_adapter_layers(model: GPTBigCodeForCausalLM, names: list[str], layout: SlotLayout) -> dict[str, MultiAdapterLinear]:
    """Replace each block's module `names[i]` (e.g. attn.c_attn) by a MultiAdapterLinear with the same W0 and bias."""
    swapped = {}
    for i, block in enumerate(model.transformer.h):
        for name in names:
            parent_name, attr = name.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            base = getattr(parent, attr)
            layer = MultiAdapterLinear(base.weight.detach().clone(), base.bias.detach().clone(), layout)
            setattr(parent, attr, layer)
            swapped[f"transformer.h.{i}.{name}"] = layer
    return swapped


@pytest.fixture(scope="module")
def mixed_lora_case():
    base = tiny_gpt_bigcode()
    ours = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False), "tenant_a")
    peft_model.add_adapter("tenant_b", LoraConfig(r=8, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False))
    peft_model.eval()
    input_ids = torch.randint(3, 97, (4, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids, adapter_names=["tenant_a", "tenant_b", "__base__", "tenant_a"]).logits

    layout = SlotLayout((SlotPool(AdapterKind.LORA, 4, 1), SlotPool(AdapterKind.LORA, 8, 1)))
    for module, layer in swap_in_multi_adapter_layers(ours, ["attn.c_attn"], layout).items():
        peft_layer = peft_model.get_submodule(f"base_model.model.{module}")
        for slot, name in enumerate(["tenant_a", "tenant_b"]):
            weights = LoraWeights(peft_layer.lora_A[name].weight, peft_layer.lora_B[name].weight, peft_layer.scaling[name])
            layer.slots.load(slot, weights)
    slot_ids = [0] * SEQ_LEN + [1] * SEQ_LEN + [-1] * SEQ_LEN + [0] * SEQ_LEN
    return ours, layout, input_ids, slot_ids, expected


@pytest.mark.parametrize("path", PATHS_BY_KIND[AdapterKind.LORA])
def test_mixed_lora_batch_matches_peft(mixed_lora_case, path):
    ours, layout, input_ids, slot_ids, expected = mixed_lora_case
    d = ours.config.n_embd
    batch = AdapterBatch.build(slot_ids, layout, FixedPaths(lora=path), d, d)
    with torch.no_grad(), using_adapter_batch(batch):
        logits = ours(input_ids).logits
    assert rel_err(logits, expected) <= 1e-5
    # The adapters must matter, or the comparison above proves nothing.
    assert rel_err(expected[0], expected[2]) > 1e-2 and rel_err(expected[1], expected[2]) > 1e-2


def test_ia3_rows_match_peft():
    """PEFT IA3 on attn.c_attn (output scaling) and mlp.c_fc (feed-forward: input scaling)."""
    base = tiny_gpt_bigcode()
    ours = copy.deepcopy(base)
    config = IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], init_ia3_weights=False)
    peft_model = get_peft_model(base, config).eval()
    input_ids = torch.randint(3, 97, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids).logits

    layout = SlotLayout((SlotPool(AdapterKind.IA3, 1, 1),))
    for module, layer in swap_in_multi_adapter_layers(ours, ["attn.c_attn", "mlp.c_fc"], layout).items():
        peft_layer = peft_model.get_submodule(f"base_model.model.{module}")
        on_input = module.endswith("c_fc")
        layer.slots.load(0, Ia3Weights(peft_layer.ia3_l["default"].detach().flatten(), on_input=on_input))
    d = ours.config.n_embd
    with torch.no_grad(), using_adapter_batch(AdapterBatch.build([0] * SEQ_LEN + [-1] * SEQ_LEN, layout, FixedPaths(), d, d)):
        logits = ours(input_ids).logits
    assert rel_err(logits[0], expected[0]) <= 1e-5
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids).logits
    assert rel_err(logits[1], plain[1]) <= 1e-5
    assert rel_err(expected[0], plain[0]) > 1e-2
