// Multi-adapter LoRA, one row at a time, reading each row's adapter in place (BGMV, as
// Punica's GPU kernel): no gathered copies of A and B, one call for the whole pool group
// whatever the adapter mix. Per row t with slot s = slots[t]:
//
//     h = a[s] @ x[t]           [R]        shrink: R dot products of length d_in
//     y[t] += h @ b[s]          [d_out]    expand: R axpys of length d_out
//
// a [S, R, d_in] is lora_A, b [S, R, d_out] is scale * lora_B^T (adapter_slots.LoraPool).
// Sums are in fp32 for fp32/bf16 storage (at::opmath_type), fp64 for fp64. Reference: reference.reference_row (plain torch),
// which the tests hold every kernel path to.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrainMacs = 1 << 16;  // multiply-adds per parallel task: below this, one thread

template <typename T>
void lora_rows(T* y, int64_t y_stride, const T* x, int64_t x_stride, const T* a, const T* b, const int64_t* slots,
               int64_t rows, int64_t rank, int64_t d_in, int64_t d_out) {
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / (rank * (d_in + d_out)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    using Acc = at::opmath_type<T>;
    std::vector<Acc> h(rank), delta(std::is_same_v<T, Acc> ? 0 : d_out);
    for (int64_t t = begin; t < end; ++t) {
      const T* xt = x + t * x_stride;
      const T* at_ = a + slots[t] * rank * d_in;
      const T* bt = b + slots[t] * rank * d_out;
      for (int64_t r = 0; r < rank; ++r) {
        const T* ar = at_ + r * d_in;
        Acc acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < d_in; ++k) acc += static_cast<Acc>(ar[k]) * static_cast<Acc>(xt[k]);
        h[r] = acc;
      }
      T* yt = y + t * y_stride;
      if constexpr (std::is_same_v<T, Acc>) {
        for (int64_t r = 0; r < rank; ++r) {
          const Acc hr = h[r];
          const T* br = bt + r * d_out;
#pragma omp simd
          for (int64_t n = 0; n < d_out; ++n) yt[n] += hr * br[n];
        }
      } else {  // reduced precision: sum the row's delta in fp32, round once
        std::fill(delta.begin(), delta.end(), Acc(0));
        for (int64_t r = 0; r < rank; ++r) {
          const Acc hr = h[r];
          const T* br = bt + r * d_out;
#pragma omp simd
          for (int64_t n = 0; n < d_out; ++n) delta[n] += hr * static_cast<Acc>(br[n]);
        }
        for (int64_t n = 0; n < d_out; ++n) yt[n] = static_cast<T>(static_cast<Acc>(yt[n]) + delta[n]);
      }
    }
  });
}

// y [n, d_out] += per row t: (x[t] @ a[slots[t]]^T) @ b[slots[t]], in place.
void lora_bgmv_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& slots) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3 && b.dim() == 3 && slots.dim() == 1,
              "expected y [n, d_out], x [n, d_in], a [S, R, d_in], b [S, R, d_out], slots [n]");
  const int64_t rows = x.size(0), d_in = x.size(1), d_out = y.size(1), num_slots = a.size(0), rank = a.size(1);
  TORCH_CHECK(y.size(0) == rows && slots.size(0) == rows, "x, y and slots must have the same number of rows: ", rows, ", ",
              y.size(0), ", ", slots.size(0));
  TORCH_CHECK(a.size(2) == d_in && b.size(0) == num_slots && b.size(1) == rank && b.size(2) == d_out,
              "a ", a.sizes(), " and b ", b.sizes(), " do not match x ", x.sizes(), " and y ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == y.scalar_type() && b.scalar_type() == y.scalar_type(),
              "x, y, a and b must share one dtype");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.is_contiguous() && b.is_contiguous(),
              "x and y need contiguous rows, a and b must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu() && slots.device().is_cpu(),
              "lora_bgmv_ runs on the CPU");
  if (rows == 0 || rank == 0) return;
  const int64_t* s = slots.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(s, s + rows);
  TORCH_CHECK(*lo >= 0 && *hi < num_slots, "slots must lie in [0, ", num_slots, "), got [", *lo, ", ", *hi, "]");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "lora_bgmv_", [&] {
    lora_rows<scalar_t>(y.mutable_data_ptr<scalar_t>(), y.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
                        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), s, rows, rank, d_in, d_out);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flora, m) {
  m.def("lora_bgmv_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor slots) -> ()", &lora_bgmv_);
}
