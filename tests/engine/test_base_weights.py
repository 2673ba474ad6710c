"""Dense and int8 storage of W0: the int8 GEMM against its float64 reference, its error against
the dense product, batch invariance, and every adapter path over an int8 base."""

from __future__ import annotations

import pytest
import torch

from services.engine.adapter_batch import AdapterBatch
from services.engine.adapter_slots import LayerSlots
from services.engine.base_weights import DenseWeight, Int8Weight, Quantization, base_weight, int8_reference_mm, quantize_rows
from services.engine.config import EngineConfig
from services.engine.layers import Linear, multi_adapter_linear
from services.engine.reference import reference_linear
from tests.engine.helpers import fill_slots, rel_err
from tests.engine.test_layers import ALL_CHOOSERS, MIXED_LAYOUT

SHAPES = [(1, 8, 8), (3, 12, 5), (33, 48, 96), (32, 576, 192), (7, 1536, 576)]  # (rows, d_in, d_out)
# Per-row int8 activations and per-channel int8 weights: ~1% relative error on Gaussian data
# (measured 0.9-1.2%), so 4% on the max-normalized error leaves room without hiding a bug.
QUANTIZATION_ERROR = 4e-2


def operands(rows: int, d_in: int, d_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen) / d_in**0.5


@pytest.mark.parametrize("rows,d_in,d_out", SHAPES)
def test_int8_matmul_equals_its_float64_reference(rows, d_in, d_out):
    x, w = operands(rows, d_in, d_out)
    weight = Int8Weight.quantize(w)
    assert weight.qweight.dtype == torch.int8 and weight.qweight.shape == (d_out, d_in)
    assert rel_err(weight.mm(x).double(), int8_reference_mm(x, weight)) <= 1e-6


@pytest.mark.parametrize("rows,d_in,d_out", SHAPES)
def test_int8_is_within_quantization_error_of_the_dense_product(rows, d_in, d_out):
    x, w = operands(rows, d_in, d_out, seed=1)
    bias = torch.randn(d_out)
    assert rel_err(Int8Weight.quantize(w).mm(x, bias), x @ w.T + bias) <= QUANTIZATION_ERROR
    assert rel_err(Int8Weight.quantize(w).dense(), w) <= 1 / 127  # per-channel absmax scaling: half a step per entry


def test_int8_rows_do_not_depend_on_the_rest_of_the_batch():
    """Integer sums are exact and scales are per row: a row's output is bitwise the same alone,
    in any batch, in any order (what lets a tenant's output not depend on its neighbours)."""
    x, w = operands(32, 576, 192)
    x[5] *= 1000  # an outlier row must not coarsen the others
    weight = Int8Weight.quantize(w)
    together = weight.mm(x)
    for i in range(len(x)):
        assert torch.equal(weight.mm(x[i : i + 1]), together[i : i + 1])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    assert torch.equal(weight.mm(x[perm]), together[perm])


def test_zero_rows_and_zero_channels_quantize_to_zero():
    w = torch.randn(6, 16)
    w[2] = 0
    x = torch.randn(3, 16)
    x[1] = 0
    y = Int8Weight.quantize(w).mm(x)
    assert torch.equal(y[1], torch.zeros(6)) and torch.equal(y[:, 2], torch.zeros(3)) and torch.isfinite(y).all()
    xq, scale = quantize_rows(x)
    assert xq.dtype == torch.int8 and xq.abs().max() == 127 and scale.shape == (3, 1)


def test_dense_weight_multiplies_the_parameter_itself():
    layer = Linear(torch.randn(5, 4), torch.randn(5))
    assert layer.base.dense() is layer.weight
    x = torch.randn(3, 4)
    assert torch.allclose(layer(x), x @ layer.weight.T + layer.bias)


def test_quantizing_a_layer_frees_its_dense_weight_and_only_once():
    layer = Linear(torch.randn(5, 4), None)
    x = torch.randn(3, 4)
    dense = layer(x)
    layer.quantize(Quantization.INT8)
    assert layer.weight is None and isinstance(layer.base, Int8Weight)
    assert rel_err(layer(x), dense) <= QUANTIZATION_ERROR
    with pytest.raises(RuntimeError, match="already quantized"):
        layer.quantize(Quantization.INT8)


def test_int8_rows_are_contiguous_whatever_the_dense_layout():
    """The model lays dense weights out as their transpose (BuildSpec.linear); int8 re-stores them
    row-major, the layout _int_mm reads fastest (measured 1.45x single-stream decode)."""
    w = torch.randn(6, 16).T.contiguous().T  # [d_out, d_in] with stride (1, d_out), like the model's
    weight = Int8Weight.quantize(w)
    assert weight.qweight.is_contiguous() and weight.rows(2, 5).qweight.is_contiguous()
    assert torch.equal(weight.qweight, Int8Weight.quantize(w.contiguous()).qweight)


def test_int8_rejects_what_it_cannot_quantize():
    with pytest.raises(TypeError, match="float"):
        Int8Weight.quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"\[d_out, d_in\]"):
        Int8Weight.quantize(torch.ones(4))


def test_every_adapter_path_over_an_int8_base():
    """FLoRA, LoRA, IA3 and base rows in one batch, every path: within quantization error of the
    dense per-row reference on the dequantized W0, and the base rows exactly the int8 GEMM."""
    d_in, d_out = 48, 40
    gen = torch.Generator().manual_seed(3)
    x, w = operands(len(range(-1, MIXED_LAYOUT.num_slots)), d_in, d_out, seed=3)
    bias = torch.randn(d_out, generator=gen)
    slot_ids = list(range(-1, MIXED_LAYOUT.num_slots))
    adapters = fill_slots(MIXED_LAYOUT, d_in, d_out, torch.float32, gen)
    slots = LayerSlots(MIXED_LAYOUT, d_in, d_out, torch.float32)
    for slot, adapter in adapters.items():
        slots.load(slot, adapter)
    weight = base_weight(w, Quantization.INT8)
    ref = reference_linear(x.double(), weight.dense().double(), bias.double(), [adapters.get(s) for s in slot_ids])
    for chooser in ALL_CHOOSERS:
        y = multi_adapter_linear(x, weight, bias, slots, AdapterBatch.build(slot_ids, MIXED_LAYOUT, chooser, d_in, d_out))
        assert rel_err(y.double(), ref) <= QUANTIZATION_ERROR, chooser
        assert torch.allclose(y[0], weight.mm(x[:1], bias)[0], rtol=1e-6, atol=1e-6)  # slot -1: no adapter


@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_is_rank_one_flora_with_the_scales_fused(with_bias):
    """scaled_mm_into: out[t] = out_scale[s_t] ∘ ((x[t] ∘ in_scale[s_t]) @ W0ᵀ) + bias. Int8 folds the
    scales into its quantization and epilogue: bitwise the same int8 weight's unfused ops."""
    x, w = operands(32, 96, 40, seed=4)
    gen = torch.Generator().manual_seed(4)
    in_scale, out_scale = torch.randn(5, 96, generator=gen), torch.randn(5, 40, generator=gen)
    slots = torch.randint(5, (32,), generator=gen)
    bias = torch.randn(40, generator=gen) if with_bias else None
    for weight in (DenseWeight(w), Int8Weight.quantize(w)):
        out = torch.empty(32, 40)
        weight.scaled_mm_into(out, x, in_scale, out_scale, slots, bias)
        unfused = weight.mm(x * in_scale[slots]) * out_scale[slots]
        assert torch.equal(out, unfused if bias is None else unfused + bias), type(weight).__name__


def test_dense_and_int8_share_one_interface():
    x, w = operands(4, 8, 6)
    for weight in (DenseWeight(w), Int8Weight.quantize(w)):
        out = torch.empty(4, 6)
        weight.mm_into(out, x)
        assert torch.equal(out, weight.mm(x)) and (weight.d_in, weight.d_out) == (8, 6) and weight.dtype == torch.float32


def test_engine_config_validates_quantization():
    assert EngineConfig(quantization=Quantization.INT8).quantization is Quantization.INT8
    with pytest.raises(ValueError, match=r"quantization must be one of \['none', 'int8'\]"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="int8 weights compute in float32"):
        EngineConfig(quantization=Quantization.INT8, dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig(dtype="float8")


def test_engine_config_validates_lora_dtype():
    assert EngineConfig(lora_dtype="bfloat16").layout.lora_dtype is torch.bfloat16
    assert EngineConfig(lora_dtype="int8").layout.lora_dtype is torch.int8
    assert EngineConfig().layout.lora_dtype is None and EngineConfig(lora_dtype="float32").layout.lora_dtype is torch.float32
    with pytest.raises(ValueError, match="lora_dtype must be 'auto', the model dtype 'float32', or 'bfloat16' or 'int8' under float32; got 'float16'"):
        EngineConfig(lora_dtype="float16")
    with pytest.raises(ValueError, match="got 'int8'"):  # the kernels widen int8 to fp32 only
        EngineConfig(dtype="bfloat16", lora_dtype="int8")
    with pytest.raises(ValueError, match="got 'float32'"):  # the kernels widen bf16 to fp32, never narrow
        EngineConfig(dtype="bfloat16", lora_dtype="float32")
