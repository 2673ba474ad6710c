// Vector building blocks shared by the kernels, written with at::vec at the width torch
// itself picked for this CPU (native.py passes its CPU_CAPABILITY). Explicit vectors, not
// `#pragma omp simd`: the compiler's own vectorization of these short loops ended every dot
// product in one scalar reduction chain and kept outputs in memory (measured 4-6x slower).
//
// Types: Acc is what sums are kept in (float for fp32/bf16 data, double for fp64); the
// stored operands W are Acc itself, bf16 or int8, widened to fp32 lane by lane as they are
// loaded (int8 as its integer value: the caller applies its scale).

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace flora_vec {

template <typename Acc>
using Vec = at::vec::Vectorized<Acc>;

// `count` (<= lanes) elements of p as Acc lanes, the rest zero.
template <typename Acc, typename W>
inline Vec<Acc> load(const W* p, int64_t count = Vec<Acc>::size()) {
  if constexpr (std::is_same_v<W, Acc>) {
    return Vec<Acc>::loadu(p, count);
  } else if constexpr (std::is_same_v<W, int8_t>) {
    static_assert(std::is_same_v<Acc, float>, "int8 is widened to fp32");
#if defined(CPU_CAPABILITY_AVX512)
    if (count == Vec<float>::size()) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
    if (count == Vec<float>::size()) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
    float lanes[Vec<float>::size()] = {};
    for (int64_t i = 0; i < count; ++i) lanes[i] = static_cast<float>(p[i]);
    return Vec<float>::loadu(lanes);
  } else {
    static_assert(std::is_same_v<Acc, float>, "only 16-bit floats are widened, to fp32");
    if (count == Vec<float>::size()) {
      Vec<float> v;
      at::vec::load_to_float(p, v);
      return v;
    }
    float lanes[Vec<float>::size()] = {};
    for (int64_t i = 0; i < count; ++i) lanes[i] = static_cast<float>(p[i]);
    return Vec<float>::loadu(lanes);
  }
}

// Ask for bytes [p, p + bytes) ahead of use, one request per 64-byte line; returns at once.
// to_l1: into L1 (the next row's adapter when it fits beside the current one), else into L2.
inline void prefetch(const void* p, int64_t bytes, bool to_l1) {
  const char* c = static_cast<const char*>(p);
  if (to_l1) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, /*rw=*/0, /*locality=*/3);
  } else {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, /*rw=*/0, /*locality=*/2);
  }
}

// out[i] = rows[i * stride .. + n) . x[0..n) for i < N: N independent FMA chains share each
// load of x, so the FMA latency is hidden (one chain alone waits ~4 cycles per vector).
template <int N, typename Acc, typename W>
inline void dots(Acc* out, const W* rows, int64_t stride, const Acc* x, int64_t n) {
  constexpr int64_t kLanes = Vec<Acc>::size();
  Vec<Acc> sum[N];
  for (int i = 0; i < N; ++i) sum[i] = Vec<Acc>(0);
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    const Vec<Acc> xv = Vec<Acc>::loadu(x + d);
    for (int i = 0; i < N; ++i) sum[i] = at::vec::fmadd(load<Acc>(rows + i * stride + d), xv, sum[i]);
  }
  if (d < n) {  // tail, zero-padded
    const Vec<Acc> xv = Vec<Acc>::loadu(x + d, n - d);
    for (int i = 0; i < N; ++i) sum[i] = at::vec::fmadd(load<Acc>(rows + i * stride + d, n - d), xv, sum[i]);
  }
  for (int i = 0; i < N; ++i) out[i] = at::vec::vec_reduce_all([](Vec<Acc> a, Vec<Acc> b) { return a + b; }, sum[i]);
}

template <typename Acc, typename W>
inline Acc dot(const W* a, const Acc* x, int64_t n) {
  Acc out;
  dots<1>(&out, a, 0, x, n);
  return out;
}

// out[d0 .. d0 + V lanes-vectors) (+)= sum_p w[p] * rows[p][...], the last vector `count` lanes
// wide: V is a compile-time count, so the V accumulators stay in registers across all p.
template <int V, bool Accumulate, typename Acc, typename W>
inline void weighted_sum_block(Acc* out, const Acc* w, const W* const* rows, int64_t len, int64_t d0, int64_t count) {
  constexpr int64_t kLanes = Vec<Acc>::size();
  auto lanes = [&](int v) { return v == V - 1 ? count : kLanes; };
  Vec<Acc> acc[V];
  for (int v = 0; v < V; ++v) acc[v] = Accumulate ? Vec<Acc>::loadu(out + d0 + v * kLanes, lanes(v)) : Vec<Acc>(0);
  for (int64_t p = 0; p < len; ++p) {
    const Vec<Acc> wp(w[p]);
    for (int v = 0; v < V; ++v) acc[v] = at::vec::fmadd(wp, load<Acc>(rows[p] + d0 + v * kLanes, lanes(v)), acc[v]);
  }
  for (int v = 0; v < V; ++v) acc[v].store(out + d0 + v * kLanes, lanes(v));
}

// out[0..n) (+)= sum_p w[p] * rows[p][0..n), p < len, in blocks of 4 vectors of columns.
// Accumulate: add to what out holds; otherwise overwrite it.
template <bool Accumulate, typename Acc, typename W>
inline void weighted_sum(Acc* out, const Acc* w, const W* const* rows, int64_t len, int64_t n) {
  constexpr int64_t kLanes = Vec<Acc>::size();
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= n; d0 += 4 * kLanes) weighted_sum_block<4, Accumulate>(out, w, rows, len, d0, kLanes);
  for (; d0 < n; d0 += kLanes) weighted_sum_block<1, Accumulate>(out, w, rows, len, d0, std::min(kLanes, n - d0));
}

}  // namespace flora_vec
