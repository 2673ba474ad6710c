"""How a layer's shared weight W0 is stored and multiplied: dense, or int8 (w8a8).

Every linear of the model computes `y = x @ W0ᵀ (+ bias)` through one of these, and
the multi-adapter kernels use the same call for FLoRA's scaled-input GEMMs, so the
adapter paths work unchanged over either storage.

Int8 is the CPU serving format: a decode step is a GEMM of ~32 rows against every
weight of the model, so it streams all the weights from memory and, on a CPU with
AVX512-VNNI, int8 dot products run ~2.5x as many MACs per cycle as fp32
(docs/engine.md has the measurements). The scheme is the one llama.cpp's Q8 and
LLM.int8 use without the outlier split:

    W0[o, :] ≈ Wq[o, :] · w_scale[o]     Wq int8, symmetric per output channel (absmax / 127)
    x[t, :]  ≈ xq[t, :] · x_scale[t]     quantized per row at every call (dynamic)
    y[t, o]  = (Σ_i xq[t, i] Wq[o, i]) · x_scale[t] · w_scale[o]     int32 sums, exact

Per-row activation scales keep every request's output independent of the others in
the batch: the integer sums are exact, so a row's result is bitwise the same in any
batch (a per-tensor scale would let one tenant's outlier coarsen another's output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch

from services.engine import native

INT8_MAX = 127
_TINY = 1e-12  # an all-zero row gets this scale: it quantizes to zeros instead of dividing by 0


class Quantization(str, Enum):
    NONE = "none"  # weights in the model dtype
    INT8 = "int8"  # w8a8 as above


@dataclass(frozen=True)
class FloraRows:
    """Rank-1 FLoRA on rows [start, T) of a GEMM's output: row t is
    out_scale[s] ∘ ((x[t] ∘ in_scale[s]) @ W0ᵀ) + bias with s = slots[t - start] (kernels.flora)."""

    start: int
    in_scale: torch.Tensor  # [S, d_in]
    out_scale: torch.Tensor  # [S, d_out]
    slots: torch.Tensor  # [T - start] int64


class BaseWeight(Protocol):
    """W0 [d_out, d_in] as the kernels see it."""

    d_in: int
    d_out: int
    dtype: torch.dtype  # of the activations it multiplies and the outputs it writes
    device: torch.device

    def mm_into(self, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """out [T, d_out] = x [T, d_in] @ W0ᵀ + bias, in place (out may be a row slice of a larger output)."""
        ...

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d_in] -> x @ W0ᵀ + bias [T, d_out]"""
        ...

    def scaled_mm_into(
        self, out: torch.Tensor, x: torch.Tensor, in_scale: torch.Tensor, out_scale: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """out[t] = out_scale[slots[t]] ∘ ((x[t] ∘ in_scale[slots[t]]) @ W0ᵀ) + bias, in place: rank-1 FLoRA.
        in_scale [S, d_in] and out_scale [S, d_out] are pools of per-slot vectors, slots [T] int64."""
        ...

    def parts_mm(
        self, x: torch.Tensor, bias: torch.Tensor | None, splits: Sequence[int], flora: Sequence[FloraRows | None]
    ) -> tuple[torch.Tensor, ...]:
        """W0's rows as consecutive parts of splits[p] rows each (a fused projection's q, k, v):
        per part, x @ W0_pᵀ + bias_p [T, splits[p]], its rows from flora[p].start on rank-1 FLoRA
        (flora[p] None: plain). Parts whose inputs differ cannot share one GEMM; this computes
        them all in one call."""
        ...

    def dense(self) -> torch.Tensor:
        """W0 [d_out, d_in] as a float tensor (dequantized for int8)."""
        ...

    def rows(self, start: int, end: int) -> "BaseWeight":
        """Output channels [start, end) of W0 as a view (a part of a fused projection)."""
        ...


class DenseWeight:
    """W0 in the model dtype; `weight` is the layer's parameter itself, not a copy."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [d_out, d_in]
        self.d_out, self.d_in = weight.shape
        self.dtype, self.device = weight.dtype, weight.device

    def mm_into(self, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if bias is None:
            torch.mm(x, self.weight.T, out=out)
        else:
            torch.addmm(bias, x, self.weight.T, out=out)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, bias)

    def scaled_mm_into(
        self, out: torch.Tensor, x: torch.Tensor, in_scale: torch.Tensor, out_scale: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        self.mm_into(out, x * in_scale.index_select(0, slots))
        out.mul_(out_scale.index_select(0, slots))
        if bias is not None:
            out.add_(bias)

    def parts_mm(
        self, x: torch.Tensor, bias: torch.Tensor | None, splits: Sequence[int], flora: Sequence[FloraRows | None]
    ) -> tuple[torch.Tensor, ...]:
        outs = []
        biases = [None] * len(splits) if bias is None else bias.split(list(splits))
        for w, b, f in zip(self.weight.split(list(splits)), biases, flora):
            part = DenseWeight(w)
            if f is None:
                outs.append(part.mm(x, b))
                continue
            y = torch.empty(x.shape[0], part.d_out, dtype=x.dtype, device=x.device)
            part.mm_into(y[: f.start], x[: f.start], b)
            part.scaled_mm_into(y[f.start :], x[f.start :], f.in_scale, f.out_scale, f.slots, b)
            outs.append(y)
        return tuple(outs)

    def dense(self) -> torch.Tensor:
        return self.weight

    def rows(self, start: int, end: int) -> "DenseWeight":
        return DenseWeight(self.weight[start:end])


class Int8Weight:
    """W0 ≈ Wq · w_scale. The whole linear is one C++ op (csrc/int8_ops.cpp: int8_linear_into):
    per-row activation quantization, torch._int_mm per block of output columns (one block per
    thread), the fp32 epilogue. Wq [d_out, d_in] row-major goes into _int_mm as the transposed
    view Wqᵀ, which oneDNN reads without reordering it (one GEMM: 1.1-1.3x faster at 32 rows, 4x
    at one row, than a contiguous [d_in, d_out] copy), and a block of columns is then a block of
    Wq's rows."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        self.qweight = qweight  # [d_out, d_in] int8, rows contiguous
        self.scale = scale  # [d_out] fp32
        self.d_out, self.d_in = qweight.shape
        self.dtype, self.device = torch.float32, qweight.device  # activations and outputs are fp32
        self._linear_into = native.ops().int8_linear_into

    @staticmethod
    def quantize(weight: torch.Tensor) -> "Int8Weight":
        """float32 [d_out, d_in] -> symmetric per-output-channel int8 (absmax / 127)."""
        if weight.dim() != 2 or weight.dtype != torch.float32:
            raise TypeError(f"int8 quantization takes a float32 [d_out, d_in] weight, got {weight.dtype} {tuple(weight.shape)}")
        qweight, scale = quantize_last_dim(weight)
        # .contiguous(): the model's dense weights are laid out as their transpose (BuildSpec.linear),
        # and pointwise ops keep that layout; int8 wants rows contiguous (see the class docstring).
        return Int8Weight(qweight.contiguous(), scale.contiguous())

    def rows(self, start: int, end: int) -> "Int8Weight":
        return Int8Weight(self.qweight[start:end], self.scale[start:end])

    def mm_into(self, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self._linear_into(out, x, self.qweight, self.scale, bias)

    def mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.d_out, dtype=x.dtype, device=x.device)
        self.mm_into(out, x, bias)
        return out

    def scaled_mm_into(
        self, out: torch.Tensor, x: torch.Tensor, in_scale: torch.Tensor, out_scale: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        # The scales ride along in the quantization and the epilogue: bitwise DenseWeight's order of ops.
        self._linear_into(out, x, self.qweight, self.scale, bias, in_scale, out_scale, slots)

    def parts_mm(
        self, x: torch.Tensor, bias: torch.Tensor | None, splits: Sequence[int], flora: Sequence[FloraRows | None]
    ) -> tuple[torch.Tensor, ...]:
        # One op: each part's input quantized (FLoRA rows scaled), one GEMM per part, whole parts
        # spread over the threads (csrc/int8_ops.cpp: int8_parts_into); bitwise the per-part ops.
        out = torch.empty(x.shape[0], self.d_out, dtype=x.dtype, device=x.device)
        starts = [x.shape[0] if f is None else f.start for f in flora]
        in_scales = [None if f is None else f.in_scale for f in flora]
        out_scales = [None if f is None else f.out_scale for f in flora]
        slots = [None if f is None else f.slots for f in flora]
        native.ops().int8_parts_into(out, x, self.qweight, self.scale, bias, list(splits), starts, in_scales, out_scales, slots)
        return out.split(list(splits), dim=1)

    def dense(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


def quantize_last_dim(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., d] float -> (q [..., d] int8, scale [...] fp32), w ≈ q · scale[..., None]: symmetric,
    absmax / 127 per vector along the last dim, in fp32. How weights are stored in int8: W0 per
    output channel here, LoRA per rank row (adapter_slots). The activations' row quantizer does
    the same math, so it runs as that one op (`quantize_rows` is its reference): loading a
    SmolLM2 LoRA adapter into int8 slots took 27 ms with 7 torch ops per tensor, 20 ms so."""
    q, scale = native.ops().quantize_rows(w.reshape(-1, w.shape[-1]).float().contiguous())
    return q.view(w.shape), scale.view(w.shape[:-1])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] float -> (xq [T, d] int8, x_scale [T, 1] fp32), x ≈ xq · x_scale, symmetric per row.
    The reference for the fused kernel Int8Weight uses (csrc/int8_ops.cpp)."""
    x_scale = x.abs().amax(1, keepdim=True).float().clamp_min_(_TINY).div_(INT8_MAX)
    return torch.round(x / x_scale).to(torch.int8), x_scale


def dequantize(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """acc [T, d_out] int32 -> acc · x_scale [T, 1] · w_scale [d_out] (+ bias) in fp32.
    The reference for the fused epilogue (csrc/int8_ops.cpp)."""
    out = acc * x_scale * w_scale
    return out if bias is None else out + bias


def int8_reference_mm(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """The oracle for Int8Weight.mm, plain float64 math on the dequantized operands:
    (xq · x_scale) @ (Wq · w_scale)ᵀ. Equal to the kernel up to the fp32 epilogue's rounding."""
    xq, x_scale = quantize_rows(x)
    w = weight.qweight.double() * weight.scale.double()[:, None]  # [d_out, d_in]
    return (xq.double() * x_scale.double()) @ w.T


def base_weight(weight: torch.Tensor, quantization: Quantization) -> DenseWeight | Int8Weight:
    return Int8Weight.quantize(weight) if quantization is Quantization.INT8 else DenseWeight(weight)
