// SwiGLU's gate: out = silu(gate) * up, silu(x) = x / (1 + exp(-x)), in one pass over the rows
// of the fused gate|up output (plain torch: silu, then mul, each a full pass with a temporary).
// fp32 follows torch's own silu kernel op for op (the same Sleef exp on vectors of 2 x the SIMD
// width, std::exp on the remainder), so the result is bitwise F.silu(gate) * up (the reference);
// other dtypes compute in fp32 and round like torch's reduced-precision path.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops.h"

namespace {

constexpr int64_t kGrainElems = 1 << 15;  // elements per parallel task: below this, one thread

template <typename T>
void silu_mul_row(T* out, const T* gate, const T* up, int64_t n) {
  using Acc = at::opmath_type<T>;
  int64_t d = 0;
  if constexpr (std::is_same_v<T, float>) {
    using Vec = at::vec::Vectorized<float>;
    const Vec one(1.0f);
    for (; d + 2 * Vec::size() <= n; d += 2 * Vec::size()) {
      for (int64_t half = 0; half < 2 * Vec::size(); half += Vec::size()) {
        const Vec x = Vec::loadu(gate + d + half);
        const Vec silu = x / (one + x.neg().exp());
        (silu * Vec::loadu(up + d + half)).store(out + d + half);
      }
    }
  }
  for (; d < n; ++d) {
    const Acc x = static_cast<Acc>(gate[d]);
    const T silu = static_cast<T>(x / (Acc(1) + std::exp(-x)));
    out[d] = silu * up[d];
  }
}

}  // namespace

namespace flora {

// gate, up [T, F] (rows may be strided: the two halves of a fused gate|up output) -> [T, F].
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 && up.stride(1) == 1,
              "gate and up must be 2-D [T, F] of one shape with contiguous rows, got ", gate.sizes(), " and ", up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "gate and up must share one dtype");
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "silu_mul runs on the CPU");
  const int64_t rows = gate.size(0), width = gate.size(1);
  at::Tensor out = at::empty({rows, width}, gate.options());
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, width));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate.scalar_type(), "silu_mul", [&] {
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) silu_mul_row(o + t * width, g + t * gate.stride(0), u + t * up.stride(0), width);
    });
  });
  return out;
}

}  // namespace flora
