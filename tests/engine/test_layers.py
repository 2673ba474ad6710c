"""The multi-adapter linear layer against the per-row dense reference, every path."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.engine.adapter_batch import PATHS_BY_KIND, AdapterBatch, KernelPath
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import LayerSlots, SlotLayout, SlotPool
from services.engine.adapter_weights import FloraWeights, Ia3Weights
from services.engine.base_weights import DenseWeight, Quantization, base_weight
from services.engine.context import StepContext, using_adapter_batch, using_step
from services.engine.cost_model import FixedPaths
from services.engine.layers import Linear, MultiAdapterLinear, Projections, fits_parts_mm, multi_adapter_linear, shares_base_gemm
from services.engine.reference import reference_linear
from tests.engine.helpers import fill_slots, random_adapter, rel_err

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
FLORA_PATHS = PATHS_BY_KIND[AdapterKind.FLORA]
LORA_PATHS = PATHS_BY_KIND[AdapterKind.LORA]
ALL_CHOOSERS = [FixedPaths(f, l) for f, l in itertools.product(FLORA_PATHS, LORA_PATHS)]

# Every kind, several rank capacities up to 32: rows of all of them meet in one batch.
MIXED_LAYOUT = SlotLayout(
    (
        SlotPool(AdapterKind.FLORA, 1, 3),
        SlotPool(AdapterKind.FLORA, 4, 2),
        SlotPool(AdapterKind.FLORA, 32, 2),
        SlotPool(AdapterKind.LORA, 2, 3),
        SlotPool(AdapterKind.LORA, 16, 2),
        SlotPool(AdapterKind.LORA, 32, 1),
        SlotPool(AdapterKind.IA3, 1, 3),
    )
)


def check_all_paths(layout: SlotLayout, slot_ids: list[int], d_in: int, d_out: int, dtype: torch.dtype, seed: int, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, dtype=dtype, generator=gen) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype, generator=gen) if bias else None
    adapters = fill_slots(layout, d_in, d_out, dtype, gen)
    slots = LayerSlots(layout, d_in, d_out, dtype)
    for slot, adapter in adapters.items():
        slots.load(slot, adapter)
    x = torch.randn(len(slot_ids), d_in, dtype=dtype, generator=gen)
    ref = reference_linear(x.double(), weight.double(), None if b is None else b.double(), [adapters.get(s) for s in slot_ids])
    for chooser in ALL_CHOOSERS:
        batch = AdapterBatch.build(slot_ids, layout, chooser, d_in, d_out)
        y = multi_adapter_linear(x, DenseWeight(weight), b, slots, batch)
        assert y.dtype == dtype and y.shape == (len(slot_ids), d_out)
        assert rel_err(y.double(), ref) <= TOLERANCE[dtype], f"{chooser} on slots {slot_ids}"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    d_in=st.integers(1, 48),
    d_out=st.integers(1, 48),
    slot_ids=st.lists(st.integers(-1, MIXED_LAYOUT.num_slots - 1), min_size=1, max_size=40),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_mixed_batches_match_reference(d_in, d_out, slot_ids, dtype, bias, seed):
    check_all_paths(MIXED_LAYOUT, slot_ids, d_in, d_out, dtype, seed, bias)


# bf16 keeps 8 bits of mantissa; int8 rounds each weight by at most half a step (its row's absmax / 254)
@pytest.mark.parametrize("lora_dtype,tol", [(torch.bfloat16, 4e-3), (torch.int8, 1.5e-2)])
def test_narrow_lora_slots_under_float32_rows_on_every_path(lora_dtype, tol):
    """SlotLayout.lora_dtype: LoRA pools store bf16 or int8 (FLoRA and IA3 keep the layer's dtype),
    every LoRA path reads them under fp32 rows; the only error is the weights' rounding."""
    layout = SlotLayout(MIXED_LAYOUT.pools, lora_dtype=lora_dtype)
    d_in, d_out = 40, 56
    gen = torch.Generator().manual_seed(11)
    weight, bias = torch.randn(d_out, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, generator=gen)
    adapters = fill_slots(layout, d_in, d_out, torch.float32, gen)
    slots = LayerSlots(layout, d_in, d_out, torch.float32)
    for slot, adapter in adapters.items():
        slots.load(slot, adapter)
    assert [p.a.dtype if hasattr(p, "a") else p.scale_in.dtype for p in slots.pools] == [
        lora_dtype if pool.kind is AdapterKind.LORA else torch.float32 for pool in layout.pools
    ]
    slot_ids = list(range(-1, layout.num_slots)) * 2
    x = torch.randn(len(slot_ids), d_in, generator=gen)
    ref = reference_linear(x.double(), weight.double(), bias.double(), [adapters.get(s) for s in slot_ids])
    outputs = [multi_adapter_linear(x, DenseWeight(weight), bias, slots, AdapterBatch.build(slot_ids, layout, chooser, d_in, d_out)) for chooser in ALL_CHOOSERS]
    for chooser, y in zip(ALL_CHOOSERS, outputs):
        assert y.dtype == torch.float32 and rel_err(y.double(), ref) <= tol, chooser
        assert rel_err(y.double(), outputs[0].double()) <= 1e-6, chooser  # the paths read the same stored weights


def test_int8_lora_slot_holds_every_rank_row_to_half_a_step():
    """An int8 LoRA pool stores each rank row of A and of scale · Bᵀ with its own scale (absmax / 127):
    every dequantized weight is within half a step of the original; reloading a smaller rank clears
    the old rows and their scales."""
    layout = SlotLayout((SlotPool(AdapterKind.LORA, 4, 2),), lora_dtype=torch.int8)
    slots = LayerSlots(layout, 24, 40, torch.float32)
    gen = torch.Generator().manual_seed(3)
    big, small = random_adapter(AdapterKind.LORA, 4, 24, 40, torch.float32, gen), random_adapter(AdapterKind.LORA, 2, 24, 40, torch.float32, gen)
    pool = slots.pools[0]
    for adapter in (big, small):
        slots.load(1, adapter)
        a, b = pool.read(lambda stored: stored[1], torch.float64)  # [4, 24], [4, 40]
        for deq, orig, scale in ((a, adapter.a, pool.a_scale[1]), (b, adapter.scale * adapter.b.T, pool.b_scale[1])):
            r = adapter.rank
            assert torch.allclose(scale[:r].double(), orig.abs().amax(1).double() / 127)
            assert ((deq[:r] - orig.double()).abs() <= scale[:r, None].double() / 2 * (1 + 1e-6)).all()
            assert (deq[r:] == 0).all() and (scale[r:] == 0).all()
    assert pool.a.dtype is torch.int8 and (pool.a[0] == 0).all() and (pool.a_scale[0] == 0).all()  # the other slot untouched


@pytest.mark.parametrize("rank", [1, 2, 3, 8, 16, 32])
@pytest.mark.parametrize("kind", [AdapterKind.FLORA, AdapterKind.LORA])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_rank_every_row_distinct(rank, kind, dtype):
    layout = SlotLayout((SlotPool(kind, rank, 12),))
    slot_ids = [5, 0, 11, -1, 3, 3, 7, 1, 2, 10, -1, 4, 6, 8, 9]
    check_all_paths(layout, slot_ids, 40, 56, dtype, seed=rank)


def test_rows_already_grouped_are_not_permuted():
    batch = AdapterBatch.build([-1, -1, 8, 8, 9, 13, 0, 0, 3], MIXED_LAYOUT, FixedPaths(), 8, 8)
    assert batch.order is None and batch.restore is None
    check_all_paths(MIXED_LAYOUT, [-1, -1, 8, 8, 9, 13, 0, 0, 3], 8, 8, torch.float64, seed=1)


def test_no_adapter_rows_only_equal_base_layer():
    check_all_paths(MIXED_LAYOUT, [-1] * 7, 16, 24, torch.float64, seed=2)


def test_identity_flora_adapter_returns_base_output():
    d_in, d_out, rank = 32, 48, 4
    layout = SlotLayout((SlotPool(AdapterKind.FLORA, 8, 2),))
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    layer = MultiAdapterLinear(weight, bias, layout)
    layer.slots.load(1, FloraWeights.identity(d_in, d_out, rank))
    x = torch.randn(6, d_in, generator=gen)
    for path in FLORA_PATHS:
        with using_adapter_batch(AdapterBatch.build([1, -1, 1, 1, -1, 1], layout, FixedPaths(flora=path), d_in, d_out)):
            assert rel_err(layer(x), x @ weight.T + bias) <= 1e-6


def test_module_flattens_leading_dims():
    layout = SlotLayout((SlotPool(AdapterKind.LORA, 4, 2),))
    gen = torch.Generator().manual_seed(3)
    layer = MultiAdapterLinear(torch.randn(12, 8, generator=gen), None, layout)
    x = torch.randn(2, 3, 8, generator=gen)
    with using_adapter_batch(AdapterBatch.build([0, 0, 0, -1, -1, 1], layout, FixedPaths(), 8, 12)):
        y = layer(x)
    assert y.shape == (2, 3, 12)
    assert torch.allclose(y[1, :2], x[1, :2] @ layer.weight.T)


@pytest.mark.parametrize("quantization", list(Quantization))
def test_projections_fuse_plain_parts_into_one_gemm(quantization):
    gen = torch.Generator().manual_seed(0)
    parts = (Linear(torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)), Linear(torch.randn(3, 8, generator=gen), None))
    x = torch.randn(5, 8, generator=gen)
    weights, bias = [p.weight.clone() for p in parts], parts[0].bias.clone()
    proj = Projections(*parts)
    proj.quantize(quantization)
    assert all(p.weight is None for p in parts)  # the fused matrix holds the only copy; parts view its rows
    storage = lambda w: (w.weight if isinstance(w, DenseWeight) else w.qweight).untyped_storage().data_ptr()  # noqa: E731
    assert all(storage(p.base) == storage(proj.base) for p in parts)
    a, b = proj(x)
    fused = base_weight(torch.cat(weights), quantization).mm(x)
    assert torch.allclose(a, fused[:, :6] + bias, rtol=1e-6, atol=1e-6) and torch.allclose(b, fused[:, 6:], rtol=1e-6, atol=1e-6)
    assert torch.allclose(a, x @ weights[0].T + bias, atol=0.1) and torch.allclose(b, x @ weights[1].T, atol=0.1)
    assert torch.equal(parts[1](x), b)  # a part alone computes from its view


def adapted_projections(quantization: Quantization, flora_rank: int, gen: torch.Generator) -> tuple[SlotLayout, Projections]:
    """q (8 → 8) and k (8 → 4, with bias), both adapted, and a plain v, fused. Slots 0-1: LoRA,
    2: IA3 on the output, 3-5: FLoRA of `flora_rank`. q reads adapter batch 0, k batch 1."""
    layout = SlotLayout((SlotPool(AdapterKind.LORA, 4, 2), SlotPool(AdapterKind.IA3, 1, 1), SlotPool(AdapterKind.FLORA, flora_rank, 3)))
    q = MultiAdapterLinear(torch.randn(8, 8, generator=gen), None, layout, batch_index=0)
    k = MultiAdapterLinear(torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen), layout, batch_index=1)
    proj = Projections(q, k, Linear(torch.randn(4, 8, generator=gen), None))
    proj.quantize(quantization)
    for layer in (q, k):
        for slot in (0, 1):
            layer.slots.load(slot, random_adapter(AdapterKind.LORA, 4, 8, layer.d_out, torch.float32, gen))
        layer.slots.load(2, Ia3Weights(1 + 0.5 * torch.randn(layer.d_out, generator=gen), on_input=False))
        for slot in (3, 4, 5):
            layer.slots.load(slot, random_adapter(AdapterKind.FLORA, flora_rank, 8, layer.d_out, torch.float32, gen))
    return layout, proj


@pytest.mark.parametrize("quantization", list(Quantization))
def test_projections_with_rank1_flora_rows_run_as_one_call(quantization):
    """Rank-1 FLoRA rows (last) after base and LoRA rows: the parts run as one `parts_mm` call,
    bitwise what each part computes alone, also when another part's rows are all base rows.
    FLoRA merged per segment, or an IA3 row (it may scale the input), falls back to the parts alone."""
    gen = torch.Generator().manual_seed(2)
    layout, proj = adapted_projections(quantization, 1, gen)
    x = torch.randn(8, 8, generator=gen)
    mixed, with_ia3 = [-1, 0, 1, 1, 3, 3, 4, 5], [-1, 0, 1, 2, 3, 3, 4, 5]  # in the order the engine lays rows out
    cases = (
        (mixed, mixed, FixedPaths(), True),
        (mixed, [-1] * 8, FixedPaths(), True),
        (mixed, mixed, FixedPaths(flora=KernelPath.FLORA_SEGMENT), False),
        (with_ia3, with_ia3, FixedPaths(), False),
    )
    for q_slots, k_slots, paths, one_call in cases:
        batches = tuple(AdapterBatch.build(s, layout, paths, 8, 8) for s in (q_slots, k_slots))
        with using_step(StepContext(batches)):
            assert fits_parts_mm(batches[0], proj.parts[0].slots) == one_call
            got = proj(x)
            alone = tuple(part(x) for part in proj.parts)
        for g, a in zip(got, alone):
            assert torch.equal(g, a)


@pytest.mark.parametrize("quantization", list(Quantization))
def test_projections_with_adapted_parts_equal_each_part_alone(quantization):
    """LoRA rows ride on the fused GEMM; an IA3 or a rank-2 FLoRA row makes every part run alone.
    Either way each part's output is what the part computes by itself."""
    gen = torch.Generator().manual_seed(1)
    layout, proj = adapted_projections(quantization, 2, gen)
    x = torch.randn(5, 8, generator=gen)
    for slots, shared in (([-1, 0, 0, 1, 1], True), ([-1, 0, 1, 2, 2], False), ([-1, 0, 1, 3, 3], False)):  # 2: IA3, 3: FLoRA
        batch = AdapterBatch.build(slots, layout, FixedPaths(), 8, 8)
        with using_step(StepContext((batch, batch))):
            got = proj(x)
            alone = tuple(part(x) for part in proj.parts)
        assert shares_base_gemm(batch) == shared
        for g, a in zip(got, alone):
            assert torch.allclose(g, a, rtol=1e-5, atol=1e-5)
