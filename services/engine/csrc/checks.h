// Argument checks shared by the kernels: one wording for one mistake.

#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace flora_checks {

// Every slot index in s[0..n) must address one of `num_slots` pool slots (or cache slots).
inline void slots_in_range(const int64_t* s, int64_t n, int64_t num_slots) {
  if (n == 0) return;
  const auto [lo, hi] = std::minmax_element(s, s + n);
  TORCH_CHECK(*lo >= 0 && *hi < num_slots, "slots must lie in [0, ", num_slots, "), got [", *lo, ", ", *hi, "]");
}

}  // namespace flora_checks
