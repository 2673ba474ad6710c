// Decode attention over the paged KV cache, reading keys and values where they lie.
//
// For a decode row (one new token whose K/V are already written to the cache) at
// context length L with cache slots kv_index[i, 0..L):
//
//     out[row, h] = softmax_p(q[row, h] . K[slot_p, h / group] * scale) @ V[slot_p, h / group]
//
// The padded SDPA path (attention.py) first gathers every sequence's K/V into a
// [B, kvH, Cmax, D] copy and then reads it again; for one query per sequence that
// copy is most of the work. Here each (row, kv head) task streams its slots once and
// serves the `group` query heads that share that kv head (GQA/MQA). Softmax and sums
// in fp32 for fp32/bf16 (at::opmath_type), fp64 for fp64.
// Reference: attention.py's padded SDPA path; the tests compare both with dense attention.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "ops.h"
#include "vec_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// s[0..len) <- softmax(s), in place; exp vectorized (Sleef, as torch's own softmax).
template <typename Acc>
void softmax_(Acc* s, int64_t len) {
  using Vec = at::vec::Vectorized<Acc>;
  const Acc top = *std::max_element(s, s + len);
  at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, s, s, len);
  const Acc total = at::vec::reduce_all([](Vec a, Vec b) { return a + b; }, s, len);
  at::vec::map([total](Vec x) { return x / Vec(total); }, s, s, len);
}

template <typename T>
void decode_rows(T* out, const T* q, const T* k_cache, const T* v_cache, const int64_t* rows, const int64_t* kv_index,
                 const int64_t* lengths, int64_t num_rows, int64_t max_len, int64_t heads, int64_t kv_heads, int64_t dim,
                 double scale) {
  using Acc = at::opmath_type<T>;
  const int64_t group = heads / kv_heads;
  const int64_t row_stride = heads * dim, slot_stride = kv_heads * dim;
  // One task per (row, kv head); a few per thread at decode sizes.
  at::parallel_for(0, num_rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scores(group * max_len), qs(group * dim), os(group * dim);
    std::vector<const T*> keys(max_len), values(max_len);  // read in place; bf16 is widened as it is loaded
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / kv_heads, g = task % kv_heads, len = lengths[i];
      const int64_t* slots = kv_index + i * max_len;
      const T* qg = q + rows[i] * row_stride + g * group * dim;  // the group's query heads, [group, dim]
      for (int64_t e = 0; e < group * dim; ++e) qs[e] = static_cast<Acc>(qg[e]);
      for (int64_t p = 0; p < len; ++p) {  // this kv head's key and value rows, where they lie
        keys[p] = k_cache + slots[p] * slot_stride + g * dim;
        values[p] = v_cache + slots[p] * slot_stride + g * dim;
      }
      for (int64_t j = 0; j < group; ++j) {
        Acc* s = scores.data() + j * max_len;
        for (int64_t p = 0; p < len; ++p) s[p] = flora_vec::dot(keys[p], qs.data() + j * dim, dim) * static_cast<Acc>(scale);
        softmax_(s, len);
        flora_vec::weighted_sum<false>(os.data() + j * dim, s, values.data(), len, dim);
      }
      T* og = out + rows[i] * row_stride + g * group * dim;
      for (int64_t e = 0; e < group * dim; ++e) og[e] = static_cast<T>(os[e]);
    }
  });
}

}  // namespace

namespace flora {

// k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t] for every new token t: this step's keys and
// values into the paged cache, both in one call (torch's index_copy_, the reference, took ~30 us
// per call here, two per layer). k and v [T, kvH, D] may be strided views of the fused q,k,v
// output (GPTBigCode interleaves heads); each head's D values must be contiguous.
void write_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 3 && k.dim() == 3 && v.dim() == 3, "expected k_cache/v_cache [slots, kvH, D] and k/v [T, kvH, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k.sizes() == v.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ",
              v_cache.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " must match pairwise");
  TORCH_CHECK(k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(2), "k ", k.sizes(), " does not fit the cache ", k_cache.sizes());
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(), "the caches, k and v must share one dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->stride(2) == 1, "k and v need each head's D values contiguous (stride 1 along dim 2)");
  }
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be a contiguous int64 [", k.size(0), "]");
  TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  slots.device().is_cpu(), "write_kv_ runs on the CPU");
  const int64_t tokens = k.size(0), heads = k.size(1), num_slots = k_cache.size(0);
  if (tokens == 0) return;
  const int64_t* s = slots.const_data_ptr<int64_t>();
  flora_checks::slots_in_range(s, tokens, num_slots);
  const int64_t size = k.element_size(), head_bytes = k.size(2) * size;
  auto copy = [&](at::Tensor& cache, const at::Tensor& src) {
    auto* dst = static_cast<char*>(cache.data_ptr());
    const auto* from = static_cast<const char*>(src.const_data_ptr());
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(dst + (s[t] * heads + h) * head_bytes, from + (t * src.stride(0) + h * src.stride(1)) * size, head_bytes);
      }
    }
  };
  copy(k_cache, k);
  copy(v_cache, v);
}

// out [T, H, D]: rows `rows` [N] written; q [T, H, D]; k_cache/v_cache [slots, kvH, D];
// kv_index [N, Cmax] cache slot of each context position; lengths [N] context length (>= 1).
void paged_decode_attention_(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& rows, const at::Tensor& kv_index, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(out.dim() == 3 && q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "expected out/q [T, H, D] and k_cache/v_cache [slots, kvH, D]");
  TORCH_CHECK(out.sizes() == q.sizes(), "out ", out.sizes(), " and q ", q.sizes(), " differ");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(), " differ");
  const int64_t heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1), num_slots = k_cache.size(0);
  TORCH_CHECK(k_cache.size(2) == dim && kv_heads > 0 && heads % kv_heads == 0, "q ", q.sizes(), " does not fit the cache ",
              k_cache.sizes(), " (heads must be a multiple of kv heads)");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(), "out, q and the caches must share one dtype");
  TORCH_CHECK(out.is_contiguous() && q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "out, q and the caches must be contiguous");
  TORCH_CHECK(rows.dim() == 1 && kv_index.dim() == 2 && lengths.dim() == 1 && kv_index.size(0) == rows.size(0) &&
                  lengths.size(0) == rows.size(0), "expected rows [N], kv_index [N, Cmax], lengths [N]");
  for (const at::Tensor* t : {&rows, &kv_index, &lengths}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(), "rows, kv_index and lengths must be contiguous int64");
  }
  TORCH_CHECK(out.device().is_cpu() && q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention_ runs on the CPU");
  const int64_t num_rows = rows.size(0), max_len = kv_index.size(1);
  if (num_rows == 0) return;
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t* kv = kv_index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < num_rows; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < q.size(0), "rows[", i, "] = ", r[i], " is not a row of q (", q.size(0), " rows)");
    TORCH_CHECK(len[i] >= 1 && len[i] <= max_len, "lengths[", i, "] = ", len[i], " is not in [1, ", max_len, "]");
    const auto [lo, hi] = std::minmax_element(kv + i * max_len, kv + i * max_len + len[i]);
    TORCH_CHECK(*lo >= 0 && *hi < num_slots, "kv_index row ", i, " points outside the cache's ", num_slots, " slots");
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode_attention_", [&] {
    decode_rows<scalar_t>(out.mutable_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                          v_cache.const_data_ptr<scalar_t>(), r, kv, len, num_rows, max_len, heads, kv_heads, dim, scale);
  });
}

}  // namespace flora
