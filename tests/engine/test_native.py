"""The compiled kernels (services/engine/csrc/) against their plain-torch references: bitwise where
the arithmetic is the same (int8 glue, RoPE, SiLU·up), within rounding where the order of a sum
differs (LoRA, decode attention, RMSNorm); strided inputs, 1 and 2 threads, clear errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.engine import native
from services.engine.adapter_format import AdapterKind
from services.engine.base_weights import dequantize, quantize_last_dim, quantize_rows
from services.engine.models import rms_norm_reference
from services.engine.models.llama import apply_rope
from services.engine.reference import reference_linear
from tests.engine.helpers import random_adapter, rel_err

REPO_ROOT = Path(__file__).resolve().parents[2]
QUANT_SHAPES = [(1, 1), (1, 576), (3, 5), (32, 576), (7, 1536), (400, 1536)]  # (rows, width); the last splits across threads


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows,width", QUANT_SHAPES)
def test_quantize_rows_is_bitwise_the_torch_reference(rows, width, threads):
    gen = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=gen) * torch.logspace(-3, 3, rows)[:, None]
    x[0, 0] = 0.5 * (x[0].abs().max() / 127)  # exactly half a step: rounds to even, like torch.round
    xq, scale = native.ops().quantize_rows(x)
    ref_q, ref_scale = quantize_rows(x)
    assert xq.dtype == torch.int8 and torch.equal(xq, ref_q)
    assert scale.shape == (rows, 1) and torch.equal(scale, ref_scale)


def test_quantize_rows_reads_strided_rows_and_zero_rows():
    wide = torch.randn(4, 100)
    wide[2] = 0
    x = wide[:, 10:60]  # rows 100 apart
    xq, scale = native.ops().quantize_rows(x)
    ref_q, ref_scale = quantize_rows(x.contiguous())
    assert torch.equal(xq, ref_q) and torch.equal(scale, ref_scale)
    assert torch.equal(xq[2], torch.zeros(50, dtype=torch.int8))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows,width", [(1, 8), (33, 70), (300, 960)])
def test_dequantize_into_is_bitwise_the_torch_reference(rows, width, with_bias, threads):
    gen = torch.Generator().manual_seed(rows + width)
    acc = torch.randint(-(2**28), 2**28, (rows, width), dtype=torch.int32, generator=gen)  # beyond 2^24: rounds like torch
    x_scale, w_scale = torch.rand(rows, 1, generator=gen), torch.rand(width, generator=gen)
    bias = torch.randn(width, generator=gen) if with_bias else None
    out = torch.empty(rows, width)
    native.ops().dequantize_into(out, acc, x_scale, w_scale, bias)
    assert torch.equal(out, dequantize(acc, x_scale, w_scale, bias))


def test_dequantize_into_writes_a_column_block_and_nothing_else():
    acc = torch.randint(-1000, 1000, (5, 7), dtype=torch.int32)
    x_scale, w_scale = torch.rand(5, 1), torch.rand(7)
    fused = torch.full((5, 20), 7.0)
    native.ops().dequantize_into(fused[:, 3:10], acc, x_scale, w_scale, None)
    assert torch.equal(fused[:, 3:10], dequantize(acc, x_scale, w_scale))
    assert (fused[:, :3] == 7).all() and (fused[:, 10:] == 7).all()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows,width", [(1, 8), (32, 576), (300, 960)])
def test_row_scaled_quantize_and_epilogue_are_bitwise_the_torch_composition(rows, width, with_bias, threads):
    """FLoRA's fused form: quantize(x ∘ in_scale[slots]) and (acc · scales) ∘ out_scale[slots] + bias,
    each row scaled by its own slot's vector, equal to the plain-torch ops applied in that order."""
    gen = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, width, generator=gen)
    in_scale, out_scale = torch.randn(5, width, generator=gen), torch.randn(5, width, generator=gen)
    slots = torch.randint(5, (rows,), generator=gen)
    xq, x_scale = native.ops().quantize_rows(x, in_scale, slots)
    ref_q, ref_scale = quantize_rows(x * in_scale[slots])
    assert torch.equal(xq, ref_q) and torch.equal(x_scale, ref_scale)

    acc = torch.randint(-(2**20), 2**20, (rows, width), dtype=torch.int32, generator=gen)
    w_scale = torch.rand(width, generator=gen)
    bias = torch.randn(width, generator=gen) if with_bias else None
    out = torch.empty(rows, width)
    native.ops().dequantize_into(out, acc, x_scale, w_scale, bias, out_scale, slots)
    ref = dequantize(acc, x_scale, w_scale) * out_scale[slots]
    assert torch.equal(out, ref if bias is None else ref + bias)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("rows,d_in,d_out", [(1, 8, 8), (32, 576, 960), (5, 64, 129), (40, 576, 192), (0, 16, 128)])
def test_int8_linear_is_bitwise_its_three_steps(rows, d_in, d_out, scaled, threads):
    """int8_linear_into splits the GEMM by output columns (one block per thread); every block's
    integer sums are exact, so it equals quantize_rows -> _int_mm -> dequantize_into bitwise."""
    gen = torch.Generator().manual_seed(rows + d_out)
    x = torch.randn(rows, d_in, generator=gen)
    qweight = torch.randint(-127, 128, (d_out, d_in), dtype=torch.int8, generator=gen)
    w_scale, bias = torch.rand(d_out, generator=gen), torch.randn(d_out, generator=gen)
    in_scale, out_scale = torch.randn(3, d_in, generator=gen), torch.randn(3, d_out, generator=gen)
    slots = torch.randint(3, (rows,), generator=gen)
    row_args = (in_scale, out_scale, slots) if scaled else (None, None, None)
    fused = torch.full((rows, d_out + 4), 7.0)
    out = fused[:, 2:-2]  # a column block: the columns around it stay
    native.ops().int8_linear_into(out, x, qweight, w_scale, bias, *row_args)
    ref = torch.empty(rows, d_out)
    xq, x_scale = native.ops().quantize_rows(x, row_args[0], row_args[2])
    native.ops().dequantize_into(ref, torch._int_mm(xq, qweight.T), x_scale, w_scale, bias, row_args[1], row_args[2])
    assert torch.equal(out, ref)
    assert (fused[:, :2] == 7).all() and (fused[:, -2:] == 7).all()


def test_int8_linear_refuses_bad_input_clearly():
    op, x, w, scale = native.ops().int8_linear_into, torch.ones(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match=r"does not fit the weight \[d_out, d_in\]"):
        op(torch.empty(2, 4), torch.ones(2, 7), w, scale, None)
    with pytest.raises(RuntimeError, match=r"out has shape \[2, 5\], expected \[2, 4\]"):
        op(torch.empty(2, 5), x, w, scale, None)
    with pytest.raises(RuntimeError, match="qweight must be Char"):
        op(torch.empty(2, 4), x, w.float(), scale, None)
    with pytest.raises(RuntimeError, match=r"w_scale must be a contiguous float32 \[4\]"):
        op(torch.empty(2, 4), x, w, torch.ones(3), None)
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous float32 \[4\]"):
        op(torch.empty(2, 4), x, w, scale, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "rows,d_in,splits,starts",
    [
        (32, 576, (576, 192, 192), (0, 5, None)),  # SmolLM2's q, k, v: FLoRA on q (all rows) and k (from row 5), v plain
        (7, 64, (129,), (3,)),  # one part: halved across the threads, a width not a multiple of the vector
        (9, 48, (40, 24, 8, 100), (9, None, 0, 4)),  # more parts than threads; FLoRA rows empty (start = rows)
        (0, 16, (64, 64), (0, None)),
        (8, 32, (64, 32, 64, 16), (None, 2, None, 0)),  # plain parts share one quantized input, FLoRA parts between them do not
    ],
)
def test_int8_parts_is_bitwise_each_part_alone(rows, d_in, splits, starts, threads):
    """int8_parts_into (a fused projection's parts, some rank-1 FLoRA from a row on) spreads whole
    parts over the threads; each part equals int8_linear_into on its columns, bitwise: plain on the
    rows before `start`, scaled from it on."""
    gen = torch.Generator().manual_seed(rows + len(splits))
    width = sum(splits)
    x = torch.randn(rows, d_in, generator=gen)
    qweight = torch.randint(-127, 128, (width, d_in), dtype=torch.int8, generator=gen)
    w_scale, bias = torch.rand(width, generator=gen), torch.randn(width, generator=gen)
    scaled = [start is not None for start in starts]
    in_scales = [torch.randn(3, d_in, generator=gen) if on else None for on in scaled]
    out_scales = [torch.randn(3, n, generator=gen) if on else None for n, on in zip(splits, scaled)]
    slots = [torch.randint(3, (rows - start,), generator=gen) if start is not None else None for start in starts]
    starts = [rows if start is None else start for start in starts]
    out = torch.empty(rows, width)
    native.ops().int8_parts_into(out, x, qweight, w_scale, bias, list(splits), starts, in_scales, out_scales, slots)
    ref, col = torch.empty(rows, width), 0
    for n, start, in_scale, out_scale, part_slots in zip(splits, starts, in_scales, out_scales, slots):
        cols = slice(col, col + n)
        native.ops().int8_linear_into(ref[:start, cols], x[:start], qweight[cols], w_scale[cols], bias[cols])
        if in_scale is not None:
            native.ops().int8_linear_into(ref[start:, cols], x[start:], qweight[cols], w_scale[cols], bias[cols], in_scale, out_scale, part_slots)
        col += n
    assert torch.equal(out, ref)


def test_int8_parts_refuse_bad_input_clearly():
    op, x, w, scale = native.ops().int8_parts_into, torch.ones(2, 8), torch.ones(6, 8, dtype=torch.int8), torch.ones(6)
    in_scale, out_scale, slots = torch.ones(3, 8), torch.ones(3, 4), torch.tensor([0, 2])
    op(torch.empty(2, 6), x, w, scale, None, [4, 2], [0, 2], [in_scale, None], [out_scale, None], [slots, None])  # valid
    with pytest.raises(RuntimeError, match=r"the parts' widths sum to 5, the weight has 6 rows"):
        op(torch.empty(2, 6), x, w, scale, None, [4, 1], [2, 2], [None, None], [None, None], [None, None])
    with pytest.raises(RuntimeError, match=r"need one entry per part \(2\)"):
        op(torch.empty(2, 6), x, w, scale, None, [4, 2], [2], [None, None], [None, None], [None, None])
    with pytest.raises(RuntimeError, match=r"part 0's FLoRA rows start at 3, outside \[0, 2\]"):
        op(torch.empty(2, 6), x, w, scale, None, [4, 2], [3, 2], [None, None], [None, None], [None, None])
    with pytest.raises(RuntimeError, match="part 0: in_scale and out_scale come together"):
        op(torch.empty(2, 6), x, w, scale, None, [4, 2], [0, 2], [in_scale, None], [None, None], [slots, None])
    with pytest.raises(RuntimeError, match=r"slots must be a contiguous int64 \[1\]"):  # rows [1, 2) are FLoRA: one slot each
        op(torch.empty(2, 6), x, w, scale, None, [4, 2], [1, 2], [in_scale, None], [out_scale, None], [slots, None])
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 3\), got \[0, 3\]"):
        op(torch.empty(2, 6), x, w, scale, None, [4, 2], [0, 2], [in_scale, None], [out_scale, None], [torch.tensor([0, 3]), None])
    with pytest.raises(RuntimeError, match=r"out_scale must be a contiguous float32 \[slots, 4\]"):
        op(torch.empty(2, 6), x, w, scale, None, [4, 2], [0, 2], [in_scale, None], [torch.ones(3, 2), None], [slots, None])


def test_row_scales_refuse_bad_input_clearly():
    ops, x, acc = native.ops(), torch.ones(3, 4), torch.zeros(3, 4, dtype=torch.int32)
    scale, slots = torch.ones(2, 4), torch.tensor([0, 1, 1])
    with pytest.raises(RuntimeError, match="scale and slots come together"):
        ops.quantize_rows(x, scale, None)
    with pytest.raises(RuntimeError, match=r"scale must be a contiguous float32 \[slots, 4\]"):
        ops.quantize_rows(x, torch.ones(2, 5), slots)
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 2\), got \[0, 2\]"):
        ops.quantize_rows(x, scale, torch.tensor([0, 2, 1]))
    with pytest.raises(RuntimeError, match=r"slots must be a contiguous int64 \[3\]"):
        ops.quantize_rows(x, scale, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=r"out_scale must be a contiguous float32"):
        ops.dequantize_into(torch.empty(3, 4), acc, torch.ones(3, 1), torch.ones(4), None, scale.double(), slots)
    with pytest.raises(RuntimeError, match="out_scale and slots come together"):
        ops.dequantize_into(torch.empty(3, 4), acc, torch.ones(3, 1), torch.ones(4), None, None, slots)


def test_int8_kernels_refuse_bad_input_clearly():
    ops = native.ops()
    with pytest.raises(RuntimeError, match="x must be Float"):
        ops.quantize_rows(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.quantize_rows(torch.ones(3))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.quantize_rows(torch.ones(3, 4).T)
    acc = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out has shape"):
        ops.dequantize_into(torch.empty(2, 4), acc, torch.ones(2, 1), torch.ones(3), None)
    with pytest.raises(RuntimeError, match="w_scale must be a contiguous float32 \\[3\\]"):
        ops.dequantize_into(torch.empty(2, 3), acc, torch.ones(2, 1), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.dequantize_into(torch.empty(2, 3), acc, torch.ones(2, 1), torch.ones(3), torch.ones(3, dtype=torch.float64))


def lora_pool(num_slots: int, rank: int, d_in: int, d_out: int, dtype: torch.dtype, gen: torch.Generator):
    """Random LoRA adapters of ranks up to `rank`, stored as adapter_slots.LoraPool stores them
    (rank-padded with zeros, scale folded into b) -> (a [S, R, d_in], b [S, R, d_out], adapters)."""
    a = torch.zeros(num_slots, rank, d_in, dtype=dtype)
    b = torch.zeros(num_slots, rank, d_out, dtype=dtype)
    adapters = []
    for s in range(num_slots):
        w = random_adapter(AdapterKind.LORA, 1 + s % rank, d_in, d_out, dtype, gen)
        a[s, : w.rank] = w.a
        b[s, : w.rank] = w.scale * w.b.T
        adapters.append(w)
    return a, b, adapters


@pytest.mark.parametrize("rows,num_slots,rank,d_in,d_out", [(1, 1, 1, 8, 8), (32, 32, 8, 576, 192), (40, 3, 16, 64, 96), (384, 32, 8, 576, 576)])
def test_lora_bgmv_adds_each_rows_own_adapter(rows, num_slots, rank, d_in, d_out, threads):
    gen = torch.Generator().manual_seed(rows + rank)
    a, b, adapters = lora_pool(num_slots, rank, d_in, d_out, torch.float32, gen)
    x = torch.randn(rows, d_in, generator=gen)
    w = torch.zeros(d_out, d_in, dtype=torch.float64)  # W0 = 0: the reference is the LoRA term alone
    slots = torch.randint(num_slots, (rows,), generator=gen)
    y0 = torch.randn(rows, d_out, generator=gen)
    y = y0.clone()
    native.ops().lora_bgmv_(y, x, a, b, slots, 0)
    delta = reference_linear(x.double(), w, None, [adapters[s] for s in slots.tolist()])
    assert rel_err((y - y0).double(), delta) <= 1e-5


def test_lora_bgmv_in_bfloat16_into_a_block_of_rows_and_columns():
    """A pool group: rows [start, start + n) of the batch, and a fused projection's column block."""
    gen = torch.Generator().manual_seed(5)
    a, b, adapters = lora_pool(4, 8, 64, 48, torch.bfloat16, gen)
    x = torch.randn(12, 64, generator=gen).bfloat16()
    slots = torch.tensor([3, 0, 0, 1, 2, 3, 1, 1, 0])
    fused = torch.zeros(12, 100, dtype=torch.bfloat16)
    native.ops().lora_bgmv_(fused[:, 20:68], x, a, b, slots, 2)
    delta = reference_linear(x[2:11].double(), torch.zeros(48, 64, dtype=torch.float64), None, [adapters[s] for s in slots.tolist()])
    assert rel_err(fused[2:11, 20:68].double(), delta) <= 1e-2  # one bf16 rounding of the output
    untouched = torch.ones_like(fused, dtype=torch.bool)
    untouched[2:11, 20:68] = False
    assert (fused[untouched] == 0).all()


@pytest.mark.parametrize("d_in,d_out", [(576, 192), (40, 24)])  # whole vectors, and tails within one
def test_lora_bgmv_reads_bfloat16_adapters_under_float32_rows(d_in, d_out, threads):
    """EngineConfig.lora_dtype="bfloat16": the pool holds bf16, rows and sums stay fp32. The error
    is the bf16 rounding of the stored weights alone: the same kernel on those weights widened to
    fp32 agrees to fp32 rounding."""
    gen = torch.Generator().manual_seed(d_in)
    a, b, adapters = lora_pool(6, 8, d_in, d_out, torch.float32, gen)
    x = torch.randn(20, d_in, generator=gen)
    slots = torch.randint(6, (20,), generator=gen)
    y_bf16, y_widened = torch.zeros(20, d_out), torch.zeros(20, d_out)
    native.ops().lora_bgmv_(y_bf16, x, a.bfloat16(), b.bfloat16(), slots, 0)
    native.ops().lora_bgmv_(y_widened, x, a.bfloat16().float(), b.bfloat16().float(), slots, 0)
    assert rel_err(y_bf16.double(), y_widened.double()) <= 1e-6
    delta = reference_linear(x.double(), torch.zeros(d_out, d_in, dtype=torch.float64), None, [adapters[s] for s in slots.tolist()])
    assert rel_err(y_bf16.double(), delta) <= 1e-2  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("d_in,d_out", [(576, 192), (40, 24)])  # whole vectors, and tails within one
def test_lora_bgmv_reads_int8_adapters_under_float32_rows(d_in, d_out, threads):
    """EngineConfig.lora_dtype="int8": int8 A and B with one scale per (slot, rank row). The kernel
    equals the plain-torch LoRA term on the dequantized weights to fp32 rounding; against the
    original weights the only error is their int8 rounding."""
    gen = torch.Generator().manual_seed(d_out)
    a, b, adapters = lora_pool(6, 8, d_in, d_out, torch.float32, gen)
    (a8, a_scale), (b8, b_scale) = quantize_last_dim(a), quantize_last_dim(b)
    x = torch.randn(20, d_in, generator=gen)
    slots = torch.randint(6, (20,), generator=gen)
    y = torch.zeros(20, d_out)
    native.ops().lora_bgmv_(y, x, a8, b8, slots, 0, a_scale, b_scale)
    a_deq, b_deq = a8.double() * a_scale.double()[..., None], b8.double() * b_scale.double()[..., None]
    exact = torch.einsum("tr,tro->to", torch.einsum("ti,tri->tr", x.double(), a_deq[slots]), b_deq[slots])
    assert rel_err(y.double(), exact) <= 1e-6
    delta = reference_linear(x.double(), torch.zeros(d_out, d_in, dtype=torch.float64), None, [adapters[s] for s in slots.tolist()])
    assert rel_err(y.double(), delta) <= 2e-2  # int8: per element at most half a step, absmax / 254


def test_lora_bgmv_refuses_bad_input_clearly():
    a, b = torch.zeros(2, 4, 8), torch.zeros(2, 4, 6)
    x, y = torch.zeros(3, 8), torch.zeros(3, 6)
    op = native.ops().lora_bgmv_
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 2\), got \[0, 2\]"):
        op(y, x, a, b, torch.tensor([0, 1, 2]), 0)
    with pytest.raises(RuntimeError, match="same number of rows"):
        op(y[:2], x, a, b, torch.tensor([0, 1]), 0)
    with pytest.raises(RuntimeError, match=r"rows \[2, 4\) are not all in x's 3 rows"):
        op(y, x, a, b, torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="do not match"):
        op(y, torch.zeros(3, 7), a, b, torch.tensor([0, 1, 1]), 0)
    with pytest.raises(RuntimeError, match="x and y must share one dtype"):
        op(y, x.double(), a, b, torch.tensor([0, 1, 1]), 0)
    with pytest.raises(RuntimeError, match=r"a and b must be Double like x \(or bfloat16 or int8 under float32 x\), got Float"):
        op(y.double(), x.double(), a, b, torch.tensor([0, 1, 1]), 0)
    a8, b8, scales = a.to(torch.int8), b.to(torch.int8), torch.ones(2, 4)
    op(y, x, a8, b8, torch.tensor([0, 1, 1]), 0, scales, scales)  # valid
    with pytest.raises(RuntimeError, match="int8 a and b need a_scale and b_scale"):
        op(y, x, a8, b8, torch.tensor([0, 1, 1]), 0)
    with pytest.raises(RuntimeError, match="a_scale and b_scale go with int8 a and b only"):
        op(y, x, a, b, torch.tensor([0, 1, 1]), 0, scales, scales)
    with pytest.raises(RuntimeError, match=r"a_scale and b_scale must be contiguous float32 \[2, 4\] \(slots, rank\), got Float \[4, 2\]"):
        op(y, x, a8, b8, torch.tensor([0, 1, 1]), 0, scales, scales.T)
    with pytest.raises(RuntimeError, match="a and b another"):
        op(y, x, a, b.bfloat16(), torch.tensor([0, 1, 1]), 0)
    with pytest.raises(RuntimeError, match="slots must be contiguous int64"):
        op(y, x, a, b, torch.tensor([0, 1, 1], dtype=torch.int32), 0)


def test_decode_attention_refuses_bad_input_clearly():
    op = native.ops().paged_decode_attention_
    q, out = torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)
    cache = torch.zeros(16, 2, 8)
    rows, kv, lengths = torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 1])
    op(out, q, cache, cache, rows, kv, lengths, 1.0)  # valid
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 2 is not a row of q"):
        op(out, q, cache, cache, torch.tensor([0, 2]), kv, lengths, 1.0)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 0 is not in \[1, 3\]"):
        op(out, q, cache, cache, rows, kv, torch.tensor([3, 0]), 1.0)
    with pytest.raises(RuntimeError, match="kv_index row 0 points outside the cache's 16 slots"):
        op(out, q, cache, cache, rows, torch.tensor([[0, 16, 0], [0, 0, 0]]), lengths, 1.0)
    with pytest.raises(RuntimeError, match="heads must be a multiple of kv heads"):
        op(out, q, torch.zeros(16, 3, 8), torch.zeros(16, 3, 8), rows, kv, lengths, 1.0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(out, q, cache.double(), cache.double(), rows, kv, lengths, 1.0)
    with pytest.raises(RuntimeError, match="must be contiguous int64"):
        op(out, q, cache, cache, rows.int(), kv, lengths, 1.0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("rows,width", [(1, 8), (32, 576), (300, 2048)])
def test_rms_norm_equals_hugging_faces_form(dtype, tol, rows, width, threads):
    """fp32 math whatever the dtype, like HF; equal up to the order of the sum of squares (bf16: one ulp)."""
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, width, generator=gen) * 4).to(dtype)
    weight = torch.randn(width, generator=gen).to(dtype)
    y = native.ops().rms_norm(x, weight, 1e-5)
    assert y.dtype == dtype and rel_err(y.double(), rms_norm_reference(x, weight, 1e-5).double()) <= tol


def test_rms_norm_refuses_bad_input_clearly():
    op = native.ops().rms_norm
    with pytest.raises(RuntimeError, match="x must be 2-D rows"):
        op(torch.ones(2, 3, 4), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \[4\]"):
        op(torch.ones(2, 4), torch.ones(5), 1e-5)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(torch.ones(2, 4), torch.ones(4, dtype=torch.float64), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,heads,dim", [(1, 1, 2), (32, 9, 64), (7, 3, 24), (300, 16, 128)])
def test_rope_is_bitwise_the_torch_form(dtype, rows, heads, dim, threads):
    gen = torch.Generator().manual_seed(rows + heads)
    fused = torch.randn(rows, heads * dim + 10, generator=gen).to(dtype)  # x is a column block of it, like q of q|k|v
    x = fused[:, 5 : 5 + heads * dim]
    angles = torch.rand(rows, dim // 2, generator=gen) * 100
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    out = native.ops().rope(x, cos, sin, heads)
    assert out.shape == (rows, heads, dim) and torch.equal(out, apply_rope(x.unflatten(1, (heads, dim)), cos[:, None], sin[:, None]))


@pytest.mark.parametrize("rows,width", [(1, 5), (32, 1536), (9, 100), (200, 3000)])
def test_silu_mul_is_bitwise_torchs_silu_then_mul(rows, width, threads):
    """Widths that end on a full pair of vectors and ones that leave a scalar remainder."""
    gen = torch.Generator().manual_seed(width)
    gate_up = torch.randn(rows, 2 * width, generator=gen) * 6
    gate, up = gate_up[:, :width], gate_up[:, width:]
    assert torch.equal(native.ops().silu_mul(gate, up), F.silu(gate) * up)
    bf_gate, bf_up = gate.bfloat16(), up.bfloat16()
    assert rel_err(native.ops().silu_mul(bf_gate, bf_up).double(), (F.silu(bf_gate) * bf_up).double()) <= 8e-3


def test_rope_and_silu_mul_refuse_bad_input_clearly():
    ops = native.ops()
    cos = torch.ones(2, 8)
    with pytest.raises(RuntimeError, match="is not 3 heads of the rotary width 8"):
        ops.rope(torch.ones(2, 16), cos, cos, 3)
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous"):
        ops.rope(torch.ones(2, 16), cos, torch.ones(2, 6), 2)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.rope(torch.ones(2, 16), cos.double(), cos.double(), 2)
    with pytest.raises(RuntimeError, match="of one shape"):
        ops.silu_mul(torch.ones(2, 4), torch.ones(2, 5))


def test_a_machine_without_the_build_tools_gets_a_clear_error(tmp_path):
    """No ninja or g++ on PATH (and nothing built yet): the first use says what to install."""
    code = "from services.engine import native\ntry:\n    native.ops()\nexcept native.NativeBuildError as e:\n    print(e)\n"
    env = {"PATH": str(tmp_path), "FLORA_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert "could not build the engine's C++ kernels" in done.stdout and "apt-get install g++ ninja-build" in done.stdout, done.stderr


def test_a_running_kernel_lets_other_python_threads_run():
    """The kernels release the GIL (csrc/bindings.cpp): while the engine's thread is inside one, the
    server's event loop keeps running. With a switch interval of minutes, the main thread can only
    get the GIL back from the sleep below if the kernel's thread released it."""
    ops = native.ops()
    x, qweight, w_scale = torch.randn(2048, 2048), torch.ones(8192, 2048, dtype=torch.int8), torch.ones(8192)
    out = torch.empty(2048, 8192)
    ops.int8_linear_into(out[:8], x[:8], qweight, w_scale, None)  # warm: the first call sets up oneDNN
    finished = threading.Event()

    def long_kernel():  # ~0.5 s on 2 cores: 2048 x 2048 x 8192 int8 MACs, three times
        for _ in range(3):
            ops.int8_linear_into(out, x, qweight, w_scale, None)
        finished.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(300)
    try:
        worker = threading.Thread(target=long_kernel)
        worker.start()
        time.sleep(0.05)  # lets the worker take the GIL and enter the kernel
        got_gil_back_while_running = not finished.is_set()
    finally:
        sys.setswitchinterval(interval)
    worker.join()
    assert got_gil_back_while_running


@pytest.mark.parametrize("width", [1, 15, 16, 17, 100, 49152])
def test_argmax_rows_is_torch_argmax(width, threads):
    """First index of the maximum, NaN counting as the maximum: ties, -inf rows, a NaN row, a maximum
    in the vector body and in the scalar tail, and rows read with a stride."""
    gen = torch.Generator().manual_seed(width)
    wide = torch.randn(9, width + 3, generator=gen)
    logits = wide[:, 2 : width + 2]  # rows width + 3 apart
    logits[1] = float("-inf")
    logits[2, width // 2] = float("nan")
    logits[3] = logits[3].round()  # many ties
    logits[4, -1] = 100.0  # the maximum in the tail
    logits[5, :] = 1.0
    logits[5, width // 3] = 2.0
    logits[5, -1] = 2.0  # two maxima: the first one counts
    logits[6, 0] = -0.0  # signed zeros compare equal
    logits[6, 1:] = float("-inf")
    assert torch.equal(native.ops().argmax_rows(logits), logits.argmax(dim=-1))


def test_argmax_rows_refuses_bad_input_clearly():
    with pytest.raises(RuntimeError, match="logits must be Float, got Double"):
        native.ops().argmax_rows(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"logits must be \[B, V\] with V >= 1"):
        native.ops().argmax_rows(torch.zeros(2, 0))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        native.ops().argmax_rows(torch.zeros(3, 2).T)


@pytest.mark.parametrize("kv_heads,dtype", [(3, torch.float32), (1, torch.float32), (2, torch.bfloat16)])
def test_write_kv_is_index_copy_at_the_slots(kv_heads, dtype):
    """Keys and values land where index_copy_ puts them, read from strided views of a fused output
    (the heads of k and v interleaved with q's, as GPTBigCode lays them out); other slots untouched."""
    gen = torch.Generator().manual_seed(kv_heads)
    tokens, dim, num_slots = 7, 8, 20
    fused = torch.randn(tokens, kv_heads, 3, dim, generator=gen).to(dtype)  # per head: [q | k | v]
    k, v = fused[:, :, 1], fused[:, :, 2]  # [T, kvH, D], rows and heads strided
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    k_cache, v_cache = torch.randn(2, num_slots, kv_heads, dim, generator=gen).to(dtype).unbind(0)
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    k_ref, v_ref = k_cache.clone().index_copy_(0, slots, k), v_cache.clone().index_copy_(0, slots, v)
    native.ops().write_kv_(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_write_kv_refuses_bad_input_clearly():
    cache, kv = torch.zeros(4, 2, 8), torch.zeros(3, 2, 8)
    op = native.ops().write_kv_
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 4\), got \[0, 4\]"):
        op(cache, cache.clone(), kv, kv, torch.tensor([0, 4, 1]))
    with pytest.raises(RuntimeError, match=r"slots must be a contiguous int64 \[3\]"):
        op(cache, cache.clone(), kv, kv, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="does not fit the cache"):
        op(cache, cache.clone(), torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="must share one dtype"):
        op(cache, cache.clone(), kv.double(), kv.double(), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="each head's D values contiguous"):
        op(cache, cache.clone(), torch.zeros(3, 8, 2).transpose(1, 2), kv, torch.tensor([0, 1, 2]))
