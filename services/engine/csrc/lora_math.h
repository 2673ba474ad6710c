// One LoRA row, the math every LoRA kernel shares (lora_ops.cpp's lora_bgmv_, and
// int8_ops.cpp's int8_lora_linear_into, which adds the rows inside the int8 linear's own op):
//
//     h = a[s] @ x              [R]        shrink (int8 slots: scales folded into h)
//     y[c0 : c0 + n] += h @ b[s][:, c0 : c0 + n]    expand, over any block of columns
//
// Each output element's arithmetic is the same whatever column block it is computed in
// (weighted_sum's fmadd chain over r), so a row expanded in pieces equals one expanded whole.

#pragma once

#include <cstdint>
#include <type_traits>

#include "vec_ops.h"

namespace flora_lora {

// The LoRA pool as the kernels read it. W: the stored weights (the activations' dtype, or
// bf16 / int8 under fp32 activations); scales: int8's per-(slot, rank row) fp32 scales [S, R],
// null otherwise. a[s, r] = a_q[s, r] * a_scale[s, r], likewise b.
template <typename W>
struct Pool {
  const W* a;  // [S, R, d_in]
  const W* b;  // [S, R, d_out]
  const float* a_scale;
  const float* b_scale;
  int64_t rank, d_in, d_out;

  const W* a_rows(int64_t slot) const { return a + slot * rank * d_in; }
  const W* b_row(int64_t slot, int64_t r) const { return b + (slot * rank + r) * d_out; }
};

// h[0..rank) = a[slot] @ x, four rank rows per pass over x; int8 slots fold both scales in:
// h[r] = (a_q[r] . x) * a_scale[r] * b_scale[r], so the expand reads b_q as it is.
template <typename Acc, typename W>
void shrink(Acc* h, const Pool<W>& pool, int64_t slot, const Acc* x) {
  const W* a = pool.a_rows(slot);
  int64_t r = 0;
  for (; r + 4 <= pool.rank; r += 4) flora_vec::dots<4>(h + r, a + r * pool.d_in, pool.d_in, x, pool.d_in);
  for (; r < pool.rank; ++r) h[r] = flora_vec::dot(a + r * pool.d_in, x, pool.d_in);
  if constexpr (std::is_same_v<W, int8_t>) {
    const float* a_scale = pool.a_scale + slot * pool.rank;
    const float* b_scale = pool.b_scale + slot * pool.rank;
    for (r = 0; r < pool.rank; ++r) h[r] = h[r] * a_scale[r] * b_scale[r];
  }
}

// y[0..n) += h @ b[slot][:, c0 : c0 + n); b_rows: scratch for `rank` row pointers.
template <typename Acc, typename W>
void expand(Acc* y, const Acc* h, const Pool<W>& pool, int64_t slot, int64_t c0, int64_t n, const W** b_rows) {
  for (int64_t r = 0; r < pool.rank; ++r) b_rows[r] = pool.b_row(slot, r) + c0;
  flora_vec::weighted_sum<true>(y, h, b_rows, pool.rank, n);
}

// Each row reads its own adapter from memory (a decode step's rows all differ), so the kernels ask
// for the next row's A and B before computing this one: into L1 when they fit in this much of it,
// else into L2. In the engine (int8 SmolLM2, 32 rank-8 adapters) the LoRA calls of a step took
// 4.22 ms instead of 4.59 (docs/engine.md).
constexpr int64_t kPrefetchL1Bytes = 16 << 10;

template <typename W>
bool fits_l1(const Pool<W>& pool, int64_t a_cols, int64_t b_cols) {
  return pool.rank * (a_cols + b_cols) * static_cast<int64_t>(sizeof(W)) <= kPrefetchL1Bytes;
}

// Ask for slot's A ahead of use.
template <typename W>
void prefetch_a(const Pool<W>& pool, int64_t slot, bool to_l1) {
  flora_vec::prefetch(pool.a_rows(slot), pool.rank * pool.d_in * sizeof(W), to_l1);
}

// Ask for slot's whole B ahead of use, as one span. (Asking row by row, with or without a branch
// to this span, made lora_bgmv_ 5 % slower over int8 pools in memory: measured, not understood.)
template <typename W>
void prefetch_b(const Pool<W>& pool, int64_t slot, bool to_l1) {
  flora_vec::prefetch(pool.b_row(slot, 0), pool.rank * pool.d_out * sizeof(W), to_l1);
}

// Ask for columns [c0, c0 + n) of slot's B rows ahead of use.
template <typename W>
void prefetch_b_columns(const Pool<W>& pool, int64_t slot, int64_t c0, int64_t n, bool to_l1) {
  for (int64_t r = 0; r < pool.rank; ++r) flora_vec::prefetch(pool.b_row(slot, r) + c0, n * sizeof(W), to_l1);
}

}  // namespace flora_lora
