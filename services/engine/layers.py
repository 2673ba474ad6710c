"""The multi-adapter linear layer: one shared W0, a different adapter per row.

    y[t] = x[t] @ W_tᵀ + bias,   W_t = W0 adapted by row t's adapter (or W0 for -1)

computed without looping over requests: rows are grouped by pool and adapter once
per step (`AdapterBatch`), the non-FLoRA rows share one base GEMM, and each pool
group runs the kernel path its cost model picked (`kernels.KERNELS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from services.engine.adapter_batch import AdapterBatch, KernelPath, PoolGroup
from services.engine.adapter_slots import LayerSlots, SlotLayout
from services.engine.base_weights import BaseWeight, DenseWeight, FloraRows, Quantization, base_weight
from services.engine.context import get_adapter_batch
from services.engine.kernels import KERNELS, scale_ia3_inputs


def multi_adapter_linear(
    x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, slots: LayerSlots, batch: AdapterBatch
) -> torch.Tensor:
    """x [T, d_in], weight W0 [d_out, d_in] (dense or int8), bias [d_out] | None -> y [T, d_out]."""
    _check_input(x, weight, batch)
    if shares_base_gemm(batch):  # no adapter here, or LoRA terms added onto the plain product (decode's common case)
        y = weight.mm(x, bias)
        apply_adapters(x, y, weight, bias, slots, batch.groups)
        return y
    xs = x if batch.order is None else x.index_select(0, batch.order)  # rows grouped by adapter
    y = torch.empty(x.shape[0], weight.d_out, dtype=x.dtype, device=x.device)
    if batch.num_base_rows:  # 0 when every row is FLoRA's
        weight.mm_into(y[: batch.num_base_rows], _base_input(xs, slots, batch), bias)
    apply_adapters(xs, y, weight, bias, slots, batch.groups)
    return y if batch.restore is None else y.index_select(0, batch.restore)


def apply_adapters(
    xs: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, slots: LayerSlots, groups: Sequence[PoolGroup]
) -> None:
    """Run each pool group's kernel on the sorted rows; y's base rows already hold xs @ W0ᵀ + bias."""
    for group in groups:
        KERNELS[group.path](xs, y, weight, bias, slots.pools[group.pool], group)


def shares_base_gemm(batch: AdapterBatch) -> bool:
    """Whether every row's output is the plain x @ W0ᵀ + bias of the rows as given plus a LoRA term:
    no FLoRA rows (they replace the base GEMM), no IA3 rows (a slot may scale the GEMM's input), no
    reordering. A fused projection can then compute the base product of all its parts at once."""
    return batch.order is None and batch.num_base_rows == batch.num_rows and not batch.input_scaled


def rank1_flora_rows(batch: AdapterBatch, slots: LayerSlots) -> FloraRows | None:
    """The batch's FLoRA rows as one `FloraRows` block (its last group: FLoRA rows come last),
    None when it has none. Only when `fits_parts_mm` holds."""
    if batch.num_base_rows == batch.num_rows:
        return None
    group = batch.groups[-1]
    pool = slots.pools[group.pool]
    return FloraRows(group.start, pool.b[0], pool.a[0], group.slots)


def fits_parts_mm(batch: AdapterBatch, slots: LayerSlots) -> bool:
    """Whether a part of a fused projection can be computed by `BaseWeight.parts_mm`: rows in order,
    no IA3 rows (a slot may scale the GEMM's input), and its FLoRA rows (if any) one rank-1 group
    on the FLoRA path (not merged per segment); its LoRA groups add to the base rows after."""
    if batch.order is not None or batch.input_scaled:
        return False
    if batch.num_base_rows == batch.num_rows:
        return True
    group = batch.groups[-1]
    return group.start == batch.num_base_rows and group.path is KernelPath.FLORA and slots.layout.pools[group.pool].max_rank == 1


def _base_input(xs: torch.Tensor, slots: LayerSlots, batch: AdapterBatch) -> torch.Tensor:
    """The base GEMM's input rows; IA3 feed-forward rows are scaled on a copy (x feeds the residual too)."""
    x_base = xs[: batch.num_base_rows]
    if batch.input_scaled:
        x_base = x_base.clone()
        for group in batch.input_scaled:
            scale_ia3_inputs(x_base, slots.pools[group.pool], group)
    return x_base


def _check_input(x: torch.Tensor, weight: BaseWeight, batch: AdapterBatch) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be token rows [T, d_in], got shape {tuple(x.shape)}")
    if x.shape[1] != weight.d_in:
        raise ValueError(f"x has d_in={x.shape[1]} but the weight [d_out, d_in] is {(weight.d_out, weight.d_in)}")
    if x.shape[0] != batch.num_rows:
        raise ValueError(f"x has {x.shape[0]} rows but the adapter batch was built for {batch.num_rows}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the layer's weight is {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the layer's weight is on {weight.device}")


class Linear(nn.Module):
    """y = x @ W0ᵀ + bias, W0 dense or int8 (`base_weights`). nn.Linear without the init pass:
    the loader (or `random_model`) fills the weight, then `quantize` picks its storage."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [d_out, d_in]; loaded by name, None once quantized
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [d_out]
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        self.base: BaseWeight = DenseWeight(self.weight)
        self.d_out, self.d_in = weight.shape

    def quantize(self, quantization: Quantization) -> None:
        """Re-store W0 once its weights are loaded; int8 frees the dense weight."""
        if self.weight is None:
            raise RuntimeError("this layer is already quantized (or fused into a Projections)")
        self.base = base_weight(self.weight, quantization)
        if quantization is not Quantization.NONE:
            self.weight = None

    def share(self, base: BaseWeight) -> None:
        """Use `base`, a view of a fused `Projections` matrix, and drop this layer's own copy."""
        self.base, self.weight = base, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_in] -> [T, d_out]"""
        return self.base.mm(x, self.bias)


class Projections(nn.Module):
    """Linears that read the same input (q, k, v; gate, up): forward(x) -> one output per part.

    `quantize` (after loading) moves the parts' weights into one [Σ d_out, d_in] matrix (dense or
    int8) and gives each part a view of its rows, so a step runs one GEMM instead of several (and
    int8 quantizes x once). Parts with adapters join in when this step's adapters only add to the
    base product (LoRA: `shares_base_gemm`). Rank-1 FLoRA rows change a part's input and output
    scaling, so the parts cannot share one GEMM, but they still run as one call (`parts_mm`: in
    int8 one op that spreads whole parts over the threads). With IA3 rows, or FLoRA of higher rank
    or merged per segment, every part computes on its own. The parts stay where the checkpoint
    names them (q_proj.weight, ...), so loading and adapter addressing are unchanged.
    """

    def __init__(self, *parts: Linear):
        super().__init__()
        self.parts = parts  # a tuple: not registered twice, the parent module owns them
        self.adapted = [(i, part) for i, part in enumerate(parts) if isinstance(part, MultiAdapterLinear)]
        self.splits = [p.d_out for p in parts]
        self.base: BaseWeight | None = None  # the fused weight, built by `quantize`
        self.bias: torch.Tensor | None = None

    def quantize(self, quantization: Quantization) -> None:
        # [Σ d_out, d_in] stored as its transpose, like every weight here (BuildSpec.linear)
        weight = torch.cat([p.weight.T for p in self.parts], dim=1).T
        if any(p.bias is not None for p in self.parts):
            self.bias = torch.cat([p.bias if p.bias is not None else weight.new_zeros(p.d_out) for p in self.parts])
        self.base = base_weight(weight, quantization)
        start = 0
        for part in self.parts:
            part.share(self.base.rows(start, start + part.d_out))
            start += part.d_out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, d_in] -> per part [T, d_out_i]"""
        adapted = [(i, part.step_batch()) for i, part in self.adapted]
        if all(shares_base_gemm(batch) for _, batch in adapted):
            ys = self.base.mm(x, self.bias).split(self.splits, dim=1)  # column views of one [T, Σ d_out]
            additive = [batch.groups for _, batch in adapted]
        elif all(fits_parts_mm(batch, self.parts[i].slots) for i, batch in adapted):  # rank-1 FLoRA rows: one call
            flora: list[FloraRows | None] = [None] * len(self.parts)
            for i, batch in adapted:
                flora[i] = rank1_flora_rows(batch, self.parts[i].slots)
            ys = self.base.parts_mm(x, self.bias, self.splits, flora)
            additive = [batch.groups if flora[i] is None else batch.groups[:-1] for i, batch in adapted]
        else:
            return tuple(part(x) for part in self.parts)
        for (i, _), groups in zip(adapted, additive):
            part = self.parts[i]
            apply_adapters(x, ys[i], part.base, part.bias, part.slots, groups)
        return ys


class MultiAdapterLinear(Linear):
    """A linear layer whose rows each carry their own adapter; reads the step's batch from context."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: SlotLayout, batch_index: int = 0):
        super().__init__(weight, bias)
        self.batch_index = batch_index  # which of the step's adapter batches this layer reads
        self.slots = LayerSlots(layout, self.d_in, self.d_out, weight.dtype, weight.device)

    def step_batch(self) -> AdapterBatch:
        """This step's rows → adapters, for this layer's module type."""
        return get_adapter_batch(self.batch_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> [..., d_out]; the leading dims flatten to the batch's T rows."""
        flat = x.dim() == 2  # the models pass [T, d_in]: no reshape and view (~2 µs each per call)
        y = multi_adapter_linear(x if flat else x.reshape(-1, self.d_in), self.base, self.bias, self.slots, self.step_batch())
        return y if flat else y.view(*x.shape[:-1], self.d_out)
