// Rotary position embedding (Hugging Face's "rotate half" form) in one pass:
//
//     out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[D/2:], x[:D/2])
//
// per row t and head h. In plain torch this is 5 ops and 3 temporaries per call. The
// arithmetic is written in the storage type T, one rounding per torch op, so the result
// is bitwise the reference's (models.llama.apply_rope) in fp32 and bf16 alike.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "ops.h"

namespace {

constexpr int64_t kGrainElems = 1 << 15;  // elements per parallel task: below this, one thread

template <typename T>
void rope_rows(T* out, const T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t dim, int64_t x_stride) {
  const int64_t half = dim / 2;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (heads * dim));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * dim;
      const T* s = sin + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xh = x + t * x_stride + h * dim;
        T* oh = out + (t * heads + h) * dim;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const T a = xh[d] * c[d];
          const T b = -xh[d + half] * s[d];
          oh[d] = a + b;
        }
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const T a = xh[d + half] * c[d + half];
          const T b = xh[d] * s[d + half];
          oh[d + half] = a + b;
        }
      }
    }
  });
}

}  // namespace

namespace flora {

// x [T, heads * D] (rows may be strided: a column block of a fused q,k,v output), cos/sin [T, D]
// -> [T, heads, D], contiguous.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D rows [T, heads * D] with contiguous rows, got ", x.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous [T, D], got ", cos.sizes(), " and ", sin.sizes());
  const int64_t rows = x.size(0), dim = cos.size(1);
  TORCH_CHECK(heads > 0 && dim % 2 == 0 && x.size(1) == heads * dim && cos.size(0) == rows, "x ", x.sizes(), " is not ", heads,
              " heads of the rotary width ", dim, " for ", cos.size(0), " rows (D must be even)");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "x, cos and sin must share one dtype");
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "rope runs on the CPU");
  at::Tensor out = at::empty({rows, heads, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
                        sin.const_data_ptr<scalar_t>(), rows, heads, dim, x.stride(0));
  });
  return out;
}

}  // namespace flora
