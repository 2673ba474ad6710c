// The engine's kernels, as C++ functions: each is defined (and documented) in the file named
// above it and bound to Python in bindings.cpp (services/engine/native.py: `native.ops()`).
// Functions ending in `_` or `_into` write into their first tensor argument(s); the others return
// new tensors.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace flora {

// activation_ops.cpp
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);

// argmax_ops.cpp
at::Tensor argmax_rows(const at::Tensor& logits);

// attention_ops.cpp
void write_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots);
void paged_decode_attention_(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& rows, const at::Tensor& kv_index, const at::Tensor& lengths, double scale);

// int8_ops.cpp
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, const std::optional<at::Tensor>& row_scale,
                                                 const std::optional<at::Tensor>& slots);
void dequantize_into(at::Tensor& out, const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale,
                     const std::optional<at::Tensor>& slots);
void int8_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_scale,
                      const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& slots);
void int8_parts_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, const std::vector<int64_t>& splits, const std::vector<int64_t>& starts,
                     const std::vector<std::optional<at::Tensor>>& in_scales, const std::vector<std::optional<at::Tensor>>& out_scales,
                     const std::vector<std::optional<at::Tensor>>& slots);

// lora_ops.cpp
void lora_bgmv_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const at::Tensor& slots, int64_t start,
                const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale);

// norm_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// rope_ops.cpp
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads);

}  // namespace flora
