"""Bad input to the layer API raises a clear error naming what is wrong."""

from __future__ import annotations

import pytest
import torch

from services.engine.adapter_batch import AdapterBatch, KernelPath
from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.adapter_slots import LayerSlots, SlotLayout, SlotPool
from services.engine.adapter_weights import FloraWeights, Ia3Weights, LoraWeights
from services.engine.base_weights import DenseWeight
from services.engine.cost_model import FixedPaths
from services.engine.layers import MultiAdapterLinear, multi_adapter_linear
from services.engine.context import get_adapter_batch

LAYOUT = SlotLayout((SlotPool(AdapterKind.FLORA, 4, 2), SlotPool(AdapterKind.LORA, 8, 2), SlotPool(AdapterKind.IA3, 1, 1)))
D_IN, D_OUT = 16, 24


@pytest.fixture
def layer() -> MultiAdapterLinear:
    return MultiAdapterLinear(torch.randn(D_OUT, D_IN), torch.randn(D_OUT), LAYOUT)


def batch(ids: list[int]) -> AdapterBatch:
    return AdapterBatch.build(ids, LAYOUT, FixedPaths(), D_IN, D_OUT)


def run(layer: MultiAdapterLinear, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return multi_adapter_linear(x, layer.base, layer.bias, layer.slots, batch(ids))


def test_wrong_feature_width(layer):
    with pytest.raises(ValueError, match=r"x has d_in=15 but the weight \[d_out, d_in\] is \(24, 16\)"):
        run(layer, torch.randn(2, 15), [0, 1])


def test_rows_do_not_match_batch(layer):
    with pytest.raises(ValueError, match="x has 3 rows but the adapter batch was built for 2"):
        run(layer, torch.randn(3, D_IN), [0, 1])


def test_x_not_two_dimensional(layer):
    with pytest.raises(ValueError, match=r"token rows \[T, d_in\], got shape \(16,\)"):
        run(layer, torch.randn(D_IN), [0])


def test_wrong_dtype(layer):
    with pytest.raises(TypeError, match="x is torch.float64 but the layer's weight is torch.float32"):
        run(layer, torch.randn(2, D_IN, dtype=torch.float64), [0, 1])


def test_wrong_device(layer):
    with pytest.raises(ValueError, match="x is on meta but the layer's weight is on cpu"):
        run(layer, torch.empty(2, D_IN, device="meta"), [0, 1])


@pytest.mark.parametrize("bad", [5, -2, 100])
def test_slot_out_of_range(bad):
    with pytest.raises(IndexError, match=rf"slot_ids\[1\] = {bad} is out of range: valid slots are -1 \(no adapter\) .. 4"):
        batch([0, bad, 1])


def test_slot_ids_must_be_integer_vector():
    with pytest.raises(TypeError, match="slot_ids must be integers, got torch.float32"):
        batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"slot_ids must be 1-D \(one slot per row\), got shape \(1, 2\)"):
        batch(torch.tensor([[0, 1]]))


def test_rank_above_slot_capacity(layer):
    with pytest.raises(ValueError, match="rank 5 exceeds slot 0's capacity 4"):
        layer.slots.load(0, FloraWeights(torch.ones(D_IN, 5), torch.ones(5, D_OUT)))


def test_kind_does_not_match_pool(layer):
    with pytest.raises(ValueError, match="slot 2 belongs to a lora pool, cannot load a flora adapter"):
        layer.slots.load(2, FloraWeights(torch.ones(D_IN, 1), torch.ones(1, D_OUT)))


def test_adapter_tensor_shapes(layer):
    with pytest.raises(ValueError, match=r"lora_B has shape \(23, 2\), expected \(24, 2\)"):
        layer.slots.load(2, LoraWeights(torch.ones(2, D_IN), torch.ones(D_OUT - 1, 2), scale=1.0))
    with pytest.raises(ValueError, match=r"flora_A has shape \(1, 16\), expected \(1, 24\)"):
        layer.slots.load(0, FloraWeights(torch.ones(D_IN, 1), torch.ones(1, D_IN)))
    with pytest.raises(ValueError, match=r"ia3_in has shape \(24,\), expected \(16,\)"):
        layer.slots.load(4, Ia3Weights(torch.ones(D_OUT), on_input=True))


def test_adapter_tensor_dtype(layer):
    with pytest.raises(TypeError, match="lora_A must be a floating-point tensor, got torch.int64"):
        layer.slots.load(2, LoraWeights(torch.ones(2, D_IN, dtype=torch.long), torch.ones(D_OUT, 2), scale=1.0))


def test_load_into_missing_slot(layer):
    with pytest.raises(IndexError, match=r"slot 5 is out of range \[0, 5\)"):
        layer.slots.load(5, Ia3Weights(torch.ones(D_OUT), on_input=False))


def test_bias_shape():
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(24,\)"):
        MultiAdapterLinear(torch.randn(D_OUT, D_IN), torch.randn(3), LAYOUT)


def test_path_must_fit_kind():
    with pytest.raises(ValueError, match="path lora_bmm cannot run flora adapters"):
        AdapterBatch.build([0], LAYOUT, FixedPaths(flora=KernelPath.LORA_BMM), D_IN, D_OUT)


def test_forward_without_batch_context(layer):
    with pytest.raises(RuntimeError, match="no step context is set"):
        get_adapter_batch()


def test_pool_and_spec_validation():
    with pytest.raises(ValueError, match="max_rank >= 1 and num_slots >= 1"):
        SlotPool(AdapterKind.LORA, 0, 4)
    with pytest.raises(ValueError, match="an ia3 pool has max_rank 1"):
        SlotPool(AdapterKind.IA3, 2, 4)
    with pytest.raises(ValueError, match=r"no lora pool holds rank 9 \(capacities: \[8\]\)"):
        LAYOUT.pool_for(AdapterKind.LORA, 9)
    with pytest.raises(ValueError, match="alpha is required for lora and only for lora"):
        AdapterSpec(AdapterKind.LORA, 4, ("c_attn",), "bigcode/starcoderbase-1b")
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        AdapterSpec(AdapterKind.FLORA, 0, ("c_attn",), "bigcode/starcoderbase-1b")


def test_reload_clears_the_old_adapter():
    """A rank-2 adapter loaded over a rank-4 one must not keep the old rank 3-4 terms."""
    slots = LayerSlots(LAYOUT, D_IN, D_OUT, torch.float64)
    slots.load(0, FloraWeights(torch.rand(D_IN, 4, dtype=torch.float64), torch.rand(4, D_OUT, dtype=torch.float64)))
    slots.load(0, FloraWeights.identity(D_IN, D_OUT, 2, torch.float64))
    w = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    x = torch.randn(3, D_IN, dtype=torch.float64)
    y = multi_adapter_linear(x, DenseWeight(w), None, slots, AdapterBatch.build([0, 0, 0], LAYOUT, FixedPaths(), D_IN, D_OUT))
    assert torch.allclose(y, x @ w.T, rtol=1e-12, atol=1e-12)
