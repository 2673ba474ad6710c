"""`make run` until the gateway exists: one StarCoder-1B-shaped c_attn layer serving a
mixed batch of tenants (FLoRA, LoRA, IA3, none) in one call, checked row by row
against the dense reference, with the cost model's path choices and timings."""

from __future__ import annotations

import time

import torch

from services.engine.adapter_batch import AdapterBatch
from services.engine.adapter_format import AdapterKind
from services.engine.adapter_slots import LayerSlots, SlotLayout, SlotPool
from services.engine.adapter_weights import FloraWeights, Ia3Weights, LayerAdapter, LoraWeights
from services.engine.cost_model import calibrate
from services.engine.layers import multi_adapter_linear
from services.engine.reference import reference_linear

D_IN, D_OUT = 2048, 2304  # StarCoderBase-1B's fused c_attn (multi-query attention)
LAYOUT = SlotLayout((SlotPool(AdapterKind.FLORA, 1, 8), SlotPool(AdapterKind.FLORA, 4, 4), SlotPool(AdapterKind.LORA, 8, 4), SlotPool(AdapterKind.IA3, 1, 4)))


def tenants(gen: torch.Generator) -> dict[str, tuple[int, LayerAdapter]]:
    """tenant -> (global slot, adapter) for a few kinds and ranks."""
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        "user42 (flora r1)": (0, FloraWeights(1 + 0.1 * rnd(D_IN, 1), 1 + 0.1 * rnd(1, D_OUT))),
        "acme (flora r4)": (8, FloraWeights(1 + 0.1 * rnd(D_IN, 4), (1 + 0.1 * rnd(4, D_OUT)) / 4)),
        "globex (lora r8)": (12, LoraWeights(rnd(8, D_IN) / 45, rnd(D_OUT, 8) / 8, scale=2.0)),
        "initech (ia3)": (16, Ia3Weights(1 + 0.1 * rnd(D_OUT), on_input=False)),
    }


def main() -> int:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(D_OUT, D_IN, generator=gen) / D_IN**0.5, torch.randn(D_OUT, generator=gen)
    slots = LayerSlots(LAYOUT, D_IN, D_OUT, torch.float32)
    table = tenants(gen)
    for slot, adapter in table.values():
        slots.load(slot, adapter)
    names = [*table, "base (no adapter)"]
    row_tenant = [names[i % len(names)] for i in range(32)]  # 32 decode rows, tenants interleaved
    slot_ids = [table[n][0] if n in table else -1 for n in row_tenant]
    x = torch.randn(32, D_IN, generator=gen)

    print("calibrating the kernel cost model on this machine ...")
    model = calibrate(torch.float32, D_IN, D_OUT)
    print(f"  c1 (bmm) = {model.c1:.2e} s/MAC, c2 (GEMM) = {model.c2:.2e} s/MAC; eq. 7 crossover rank at d={D_IN}: {model.eq7_crossover_rank(D_IN):.2f}")
    batch = AdapterBatch.build(slot_ids, LAYOUT, model, D_IN, D_OUT)
    y = multi_adapter_linear(x, weight, bias, slots, batch)
    ref = reference_linear(x.double(), weight.double(), bias.double(), [table[n][1] if n in table else None for n in row_tenant])

    print(f"\none c_attn layer [{D_OUT}x{D_IN}], 32 rows, {len(names)} tenants in one call:")
    for name in names:
        rows = [i for i, n in enumerate(row_tenant) if n == name]
        err = float((y[rows].double() - ref[rows]).abs().max() / ref[rows].abs().max())
        print(f"  {name:<20} rows {rows[:3]}...  max rel err vs dense reference {err:.1e}")
    for group in batch.groups:
        pool = LAYOUT.pools[group.pool]
        print(f"  {pool.kind.value} pool (rank <= {pool.max_rank}), {group.end - group.start} rows -> path {group.path.value}")
    t_mixed = _seconds(lambda: multi_adapter_linear(x, weight, bias, slots, batch))
    base = AdapterBatch.build([-1] * 32, LAYOUT, model, D_IN, D_OUT)
    t_base = _seconds(lambda: multi_adapter_linear(x, weight, bias, slots, base))
    print(f"\nmixed batch {t_mixed * 1e3:.2f} ms vs base layer {t_base * 1e3:.2f} ms ({t_mixed / t_base:.2f}x), 1 thread")
    return 0


def _seconds(fn) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
    return (time.perf_counter() - t0) / 20
