// Argument checks shared by the kernels: one wording for one mistake.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace flora_checks {

// Every slot index in s[0..n) must address one of `num_slots` pool slots (or cache slots).
inline void slots_in_range(const int64_t* s, int64_t n, int64_t num_slots) {
  if (n == 0) return;
  const auto [lo, hi] = std::minmax_element(s, s + n);
  TORCH_CHECK(*lo >= 0 && *hi < num_slots, "slots must lie in [0, ", num_slots, "), got [", *lo, ", ", *hi, "]");
}

// A LoRA pool's int8 storage needs its scales [S, R] float32 (one per slot and rank row); float
// storage has none. a: the pool's A [S, R, d_in].
inline void lora_scales(const at::Tensor& a, const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale) {
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

}  // namespace flora_checks
