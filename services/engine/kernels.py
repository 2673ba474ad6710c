"""The multi-adapter kernel paths, plain torch.

Every kernel works on one pool group of the sorted batch (`adapter_batch`): rows
[g.start, g.end) of x [T, d_in] and y [T, d_out]. The oracle for all of them is
`reference.reference_row`; the tests compare every path against it.

Shapes: n = g.end - g.start rows, R = the pool's rank capacity, S = slots in the
pool, U = distinct adapters among the n rows.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from services.engine import native
from services.engine.adapter_batch import KernelPath, PoolGroup
from services.engine.adapter_slots import FloraPool, Ia3Pool, LoraPool, PoolStorage
from services.engine.base_weights import BaseWeight, DenseWeight

# FLoRA stacks several rank terms into one GEMM of (terms · n) rows; past this many
# rows the stacked copy [terms, n, d_in] costs more memory than the bigger GEMM gains.
FLORA_STACKED_ROWS = 4096


def flora(x: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, pool: FloraPool, g: PoolGroup) -> None:
    """Semantics: y[t] = Σ_r a[r, s_t] ∘ ((x[t] ∘ b[r, s_t]) @ W0ᵀ) + bias   (paper eq. 5-6)

    = x[t] @ (W0 ∘ (B A)ᵀ)ᵀ + bias. Per row, b/a are gathered by slot; the R rank
    terms become R·n rows through the one shared W0 (stacked into as few GEMMs as
    FLORA_STACKED_ROWS allows), so the cost is R base GEMMs whatever the adapter mix.
    """
    xs, out = x[g.start : g.end], y[g.start : g.end]  # [n, d_in], [n, d_out]
    if pool.b.shape[0] == 1:  # rank 1, the common case: one GEMM straight into the output, scales fused
        weight.scaled_mm_into(out, xs, pool.b[0], pool.a[0], g.slots, bias)
        return
    _flora_rank_terms(xs, out, weight, pool, g)
    if bias is not None:
        out.add_(bias)


def _flora_rank_terms(xs: torch.Tensor, out: torch.Tensor, weight: BaseWeight, pool: FloraPool, g: PoolGroup) -> None:
    """out [n, d_out] = Σ_r a[r] ∘ ((xs ∘ b[r]) @ W0ᵀ), c rank terms per GEMM of c·n rows."""
    chunk = max(1, FLORA_STACKED_ROWS // len(xs))
    for r0 in range(0, pool.b.shape[0], chunk):
        b = g.gather(pool.b[r0 : r0 + chunk], dim=1)  # [c, n, d_in]
        a = g.gather(pool.a[r0 : r0 + chunk], dim=1)  # [c, n, d_out]
        terms = weight.mm((xs * b).flatten(0, 1)).view(a.shape).mul_(a)  # [c, n, d_out]
        if r0 == 0:
            torch.sum(terms, 0, out=out)
        else:
            out.add_(terms.sum(0))


def flora_segment(x: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, pool: FloraPool, g: PoolGroup) -> None:
    """Semantics: same as `flora`, computed per adapter segment with the merged weight

    W_s = W0 ∘ (B_s A_s)ᵀ, y[seg] = x[seg] @ W_sᵀ + bias. Costs R·d_in·d_out to merge
    plus one GEMM of the segment's rows: far cheaper than `flora` when each adapter
    has many rows (prefill), far dearer when every row is its own adapter. An int8 W0
    is dequantized for the merge.
    """
    w0 = weight.dense()  # [d_out, d_in]
    for seg in g.segments:
        delta_t = pool.a[:, seg.slot].T @ pool.b[:, seg.slot]  # [d_out, R] @ [R, d_in] = (B A)ᵀ
        DenseWeight(w0 * delta_t).mm_into(y[seg.start : seg.end], x[seg.start : seg.end], bias)


def lora_bmm(x: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, pool: LoraPool, g: PoolGroup) -> None:
    """Semantics: y[t] += (x[t] @ a[s_t]ᵀ) @ b[s_t]   (b holds scale · lora_Bᵀ)

    The paper's baseline (appendix A.2): every row's A and B are gathered into
    [n, R, d] copies (views when row i uses slot lo + i) and applied with two torch.bmm.
    """
    a, b = pool.read(g.gather, x.dtype)  # [n, R, d_in], [n, R, d_out]
    h = torch.bmm(x[g.start : g.end].unsqueeze(1), a.transpose(1, 2))  # [n, 1, R]
    # bmm then add, not baddbmm_: y may be a column slice of a fused projection's output, and an
    # in-place bmm into a strided view takes a slow path (measured 5x: docs/engine.md).
    y[g.start : g.end] += torch.bmm(h, b).squeeze(1)  # [n, d_out]


def lora_bgmv(x: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, pool: LoraPool, g: PoolGroup) -> None:
    """Semantics: y[t] += (x[t] @ a[s_t]ᵀ) @ b[s_t]

    BGMV as Punica's and vLLM's kernels do it: one fused C++ pass per row reads that row's
    A and B where they lie in the pool (csrc/lora_ops.cpp), so nothing is gathered or copied
    and the whole group is one call whatever its adapter mix. Sums in fp32.
    """
    native.ops().lora_bgmv_(y, x, pool.a, pool.b, g.slots, g.start, pool.a_scale, pool.b_scale)  # rows [g.start, g.start + n)


def lora_segment(x: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, pool: LoraPool, g: PoolGroup) -> None:
    """Semantics: y[t] += (x[t] @ a[s_t]ᵀ) @ b[s_t]

    SGMV-style (Punica / S-LoRA): rows are grouped by adapter (they already are,
    see adapter_batch), one shrink GEMM and one expand GEMM per segment, no copies.
    Costs 2 GEMM launches per distinct adapter.
    """
    for seg in g.segments:
        rows = slice(seg.start, seg.end)
        a, b = pool.read(operator.itemgetter(seg.slot), x.dtype)  # [R, d_in], [R, d_out]
        y[rows] += (x[rows] @ a.T) @ b  # [m, R] @ [R, d_out]


def lora_stacked(x: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, pool: LoraPool, g: PoolGroup) -> None:
    """Semantics: y[t] += (x[t] @ a[s_t]ᵀ) @ b[s_t]

    The group's U distinct adapters stacked into one [U·R, d] A and B: every row is
    shrunk by all of them in one GEMM, the columns of other adapters are masked to
    zero, and one GEMM expands. Two GEMMs and a mask whatever U, at U times the MACs
    of the gathering paths: the fastest path for a few adapters (say 2 tenants' LoRA
    splitting a batch), the slowest for many.
    """
    a, b = pool.read(g.gather_adapters, x.dtype)  # [U, R, d_in], [U, R, d_out]
    rows = x[g.start : g.end]
    h = (rows @ a.flatten(0, 1).T).view(len(rows), len(g.segments), -1).mul_(g.adapter_mask.unsqueeze(-1))  # [n, U, R]
    y[g.start : g.end] += h.flatten(1) @ b.flatten(0, 1)  # not addmm_: see lora_bmm


def ia3(x: torch.Tensor, y: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, pool: Ia3Pool, g: PoolGroup) -> None:
    """Semantics: y[t] *= l_out[s_t]   (PEFT IA3 on an ordinary layer: (x W0ᵀ + bias) ∘ l)

    The feed-forward variant (x ∘ l_in) W0ᵀ + bias scales the GEMM's input instead:
    see `scale_ia3_inputs`, which the layer applies before the base GEMM.
    """
    y[g.start : g.end] *= g.gather(pool.scale_out)


def scale_ia3_inputs(x_base: torch.Tensor, pool: Ia3Pool, g: PoolGroup) -> None:
    """Semantics: x_base[t] *= l_in[s_t], in place, for the group's rows."""
    x_base[g.start : g.end] *= g.gather(pool.scale_in)


Kernel = Callable[[torch.Tensor, torch.Tensor, BaseWeight, torch.Tensor | None, PoolStorage, PoolGroup], None]

KERNELS: dict[KernelPath, Kernel] = {
    KernelPath.FLORA: flora,
    KernelPath.FLORA_SEGMENT: flora_segment,
    KernelPath.LORA_BMM: lora_bmm,
    KernelPath.LORA_BGMV: lora_bgmv,
    KernelPath.LORA_SEGMENT: lora_segment,
    KernelPath.LORA_STACKED: lora_stacked,
    KernelPath.IA3: ia3,
}
