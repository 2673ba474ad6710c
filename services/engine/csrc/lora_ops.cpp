// Multi-adapter LoRA, one row at a time, reading each row's adapter in place (BGMV, as
// Punica's GPU kernel): no gathered copies of A and B, one call for the whole pool group
// whatever the adapter mix. Per row t with slot s = slots[t]:
//
//     h = a[s] @ x[t]           [R]        shrink: R dot products of length d_in
//     y[t] += h @ b[s]          [d_out]    expand: R axpys of length d_out
//
// a [S, R, d_in] is lora_A, b [S, R, d_out] is scale * lora_B^T (adapter_slots.LoraPool),
// stored in the activations' dtype, or under fp32 activations in bf16 or in int8 with one fp32
// scale per (slot, rank row): a[s, r] = a_q[s, r] * a_scale[s, r], likewise b
// (EngineConfig.lora_dtype: every row reads its own adapter, so with many tenants a decode
// step streams all their weights from memory; bf16 halves those bytes, int8 quarters them).
// The int8 scales fold into h: h[r] = a_scale[r] * (a_q[r] . x) * b_scale[r], then
// y += h @ b_q. Sums are in fp32 for fp32/bf16/int8 (at::opmath_type), fp64 for fp64.
// Reference: reference.reference_row (plain torch), which the tests hold every kernel path to.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "vec_ops.h"

namespace {

constexpr int64_t kGrainMacs = 1 << 16;  // multiply-adds per parallel task: below this, one thread
// Each row reads its own adapter from memory (a decode step's rows all differ): the kernel asks for
// the next row's A and B before computing this one, into L1 when they fit in this much of it, else
// into L2. In the engine (int8 SmolLM2, 32 rank-8 adapters) the LoRA calls of a step took 4.22 ms
// instead of 4.59 (docs/engine.md).
constexpr int64_t kPrefetchL1Bytes = 16 << 10;

// h[0..rank) = a[r] . x for every rank row r of one adapter, four rows per pass over x.
template <typename Acc, typename W>
void shrink(Acc* h, const W* a, const Acc* x, int64_t rank, int64_t d_in) {
  int64_t r = 0;
  for (; r + 4 <= rank; r += 4) flora_vec::dots<4>(h + r, a + r * d_in, d_in, x, d_in);
  for (; r < rank; ++r) h[r] = flora_vec::dot(a + r * d_in, x, d_in);
}

// The LoRA pool as the kernel reads it. W: the stored weights (T, or bf16 / int8 under fp32
// activations); scales: int8's per-(slot, rank row) fp32 scales [S, R], null otherwise.
template <typename W>
struct Pool {
  const W* a;  // [S, R, d_in]
  const W* b;  // [S, R, d_out]
  const float* a_scale;
  const float* b_scale;
};

// T: activations x and y.
template <typename T, typename W>
void lora_rows(T* y, int64_t y_stride, const T* x, int64_t x_stride, const Pool<W>& pool, const int64_t* slots,
               int64_t rows, int64_t rank, int64_t d_in, int64_t d_out) {
  using Acc = at::opmath_type<T>;
  constexpr bool kWiden = !std::is_same_v<T, Acc>;  // bf16 activations: the row is widened into fp32 buffers
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (rank * (d_in + d_out)));
  // One row's adapter: 9 KB for rank 8 on SmolLM2's q in int8 (L1 holds 32 KB or more), 37 KB in fp32.
  const bool to_l1 = rank * (d_in + d_out) * static_cast<int64_t>(sizeof(W)) <= kPrefetchL1Bytes;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> h(rank), x_acc(kWiden ? d_in : 0), y_acc(kWiden ? d_out : 0);
    std::vector<const W*> b_rows(rank);
    for (int64_t t = begin; t < end; ++t) {
      if (t + 1 < end && slots[t + 1] != slots[t]) {  // the next row's adapter arrives while this row computes
        flora_vec::prefetch(pool.a + slots[t + 1] * rank * d_in, rank * d_in * sizeof(W), to_l1);
        flora_vec::prefetch(pool.b + slots[t + 1] * rank * d_out, rank * d_out * sizeof(W), to_l1);
      }
      const T* xt = x + t * x_stride;
      T* yt = y + t * y_stride;
      const W* at_ = pool.a + slots[t] * rank * d_in;
      for (int64_t r = 0; r < rank; ++r) b_rows[r] = pool.b + (slots[t] * rank + r) * d_out;
      if constexpr (kWiden) {
        std::transform(xt, xt + d_in, x_acc.begin(), [](T v) { return static_cast<Acc>(v); });
        std::transform(yt, yt + d_out, y_acc.begin(), [](T v) { return static_cast<Acc>(v); });
        shrink(h.data(), at_, x_acc.data(), rank, d_in);
        flora_vec::weighted_sum<true>(y_acc.data(), h.data(), b_rows.data(), rank, d_out);
        std::transform(y_acc.begin(), y_acc.end(), yt, [](Acc v) { return static_cast<T>(v); });  // one rounding
      } else {
        shrink(h.data(), at_, xt, rank, d_in);
        if constexpr (std::is_same_v<W, int8_t>) {
          const float* a_scale = pool.a_scale + slots[t] * rank;
          const float* b_scale = pool.b_scale + slots[t] * rank;
          for (int64_t r = 0; r < rank; ++r) h[r] = h[r] * a_scale[r] * b_scale[r];
        }
        flora_vec::weighted_sum<true>(yt, h.data(), b_rows.data(), rank, d_out);
      }
    }
  });
}

// int8 storage's scales [S, R] float32, checked; both absent for float storage.
void check_scales(const at::Tensor& a, const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale) {
  const bool quantized = a.scalar_type() == at::kChar;
  TORCH_CHECK(a_scale.has_value() == quantized && b_scale.has_value() == quantized,
              quantized ? "int8 a and b need a_scale and b_scale" : "a_scale and b_scale go with int8 a and b only");
  if (!quantized) return;
  for (const at::Tensor& s : {*a_scale, *b_scale}) {
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.device().is_cpu() && s.dim() == 2 && s.size(0) == a.size(0) &&
                    s.size(1) == a.size(1),
                "a_scale and b_scale must be contiguous float32 [", a.size(0), ", ", a.size(1), "] (slots, rank), got ", s.scalar_type(),
                " ", s.sizes());
  }
}

}  // namespace

namespace flora {

// y[start + t] += (x[start + t] @ a[slots[t]]^T) @ b[slots[t]] for t < n = len(slots), in place:
// one pool group's rows of the whole batch, addressed by offset (no sliced views to make per call).
void lora_bgmv_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& slots, int64_t start,
                const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3 && b.dim() == 3 && slots.dim() == 1,
              "expected y [T, d_out], x [T, d_in], a [S, R, d_in], b [S, R, d_out], slots [n]");
  const int64_t rows = slots.size(0), d_in = x.size(1), d_out = y.size(1), num_slots = a.size(0), rank = a.size(1);
  TORCH_CHECK(x.size(0) == y.size(0), "x and y must have the same number of rows: ", x.size(0), ", ", y.size(0));
  TORCH_CHECK(start >= 0 && start + rows <= x.size(0), "rows [", start, ", ", start + rows, ") are not all in x's ", x.size(0), " rows");
  TORCH_CHECK(a.size(2) == d_in && b.size(0) == num_slots && b.size(1) == rank && b.size(2) == d_out,
              "a ", a.sizes(), " and b ", b.sizes(), " do not match x ", x.sizes(), " and y ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == b.scalar_type(), "x and y must share one dtype, a and b another");
  const bool widened = (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kChar) && x.scalar_type() == at::kFloat;
  TORCH_CHECK(a.scalar_type() == x.scalar_type() || widened, "a and b must be ", x.scalar_type(),
              " like x (or bfloat16 or int8 under float32 x), got ", a.scalar_type());
  check_scales(a, a_scale, b_scale);
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.is_contiguous() && b.is_contiguous(),
              "x and y need contiguous rows, a and b must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() && slots.device().is_cpu(),
              "lora_bgmv_ runs on the CPU");
  if (rows == 0 || rank == 0) return;
  const int64_t* s = slots.const_data_ptr<int64_t>();
  flora_checks::slots_in_range(s, rows, num_slots);
  if (widened) {
    float* yf = y.mutable_data_ptr<float>() + start * y.stride(0);
    const float* xf = x.const_data_ptr<float>() + start * x.stride(0);
    if (a.scalar_type() == at::kChar) {
      const Pool<int8_t> pool{a.const_data_ptr<int8_t>(), b.const_data_ptr<int8_t>(), a_scale->const_data_ptr<float>(), b_scale->const_data_ptr<float>()};
      lora_rows<float, int8_t>(yf, y.stride(0), xf, x.stride(0), pool, s, rows, rank, d_in, d_out);
    } else {
      const Pool<at::BFloat16> pool{a.const_data_ptr<at::BFloat16>(), b.const_data_ptr<at::BFloat16>(), nullptr, nullptr};
      lora_rows<float, at::BFloat16>(yf, y.stride(0), xf, x.stride(0), pool, s, rows, rank, d_in, d_out);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "lora_bgmv_", [&] {
    const Pool<scalar_t> pool{a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), nullptr, nullptr};
    lora_rows<scalar_t, scalar_t>(y.mutable_data_ptr<scalar_t>() + start * y.stride(0), y.stride(0),
                                  x.const_data_ptr<scalar_t>() + start * x.stride(0), x.stride(0), pool, s, rows, rank, d_in, d_out);
  });
}

}  // namespace flora
