// The int8 linear (base_weights.Int8Weight): per-row activation quantization, torch._int_mm,
// the fp32 epilogue, as one op (int8_linear_into). In plain torch the glue alone was 8 and 3
// ops per linear (~50 us and ~20 us at 32 x 576 on a 2-core Xeon, most of it dispatch); here
// each is one pass over the rows. Both passes optionally scale each row by its own vector
// from a pool, picked by the row's slot: FLoRA's y = a ∘ ((x ∘ b) W0ᵀ) (kernels.flora) is
// then one quantize, one GEMM and one epilogue, with nothing gathered or copied.
// The plain-torch versions in base_weights.py are the oracles: the tests require bitwise
// equality, so the arithmetic below keeps torch's exact order (true division, no FMA
// contraction: built with -ffp-contract=off).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>

#include "checks.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kTiny = 1e-12f;       // base_weights._TINY: an all-zero row quantizes to zeros
constexpr int64_t kGrainElems = 1 << 15;  // elements per parallel task: below this, one thread

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, width)); }

void check_rows(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must have contiguous rows (stride 1 along dim 1)");
}

// The epilogue's per-column operands for `width` output columns.
void check_epilogue(const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, int64_t width) {
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == width && w_scale.is_contiguous(),
              "w_scale must be a contiguous float32 [", width, "]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == width && bias->is_contiguous(),
                "bias must be a contiguous float32 [", width, "]");
  }
}

// A pool of per-slot row scales [S, width] float32 and each row's slot, checked; null when absent.
const float* row_scales(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& slots, int64_t rows,
                        int64_t width, const char* name) {
  TORCH_CHECK(scale.has_value() == slots.has_value(), name, " and slots come together");
  if (!scale.has_value()) return nullptr;
  TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->dim() == 2 && scale->size(1) == width &&
                  scale->is_contiguous(), name, " must be a contiguous float32 [slots, ", width, "], got ", scale->scalar_type(), " ",
              scale->sizes());
  TORCH_CHECK(slots->device().is_cpu() && slots->scalar_type() == at::kLong && slots->dim() == 1 && slots->size(0) == rows &&
                  slots->is_contiguous(), "slots must be a contiguous int64 [", rows, "], got ", slots->scalar_type(), " ", slots->sizes());
  flora_checks::slots_in_range(slots->const_data_ptr<int64_t>(), rows, scale->size(0));
  return scale->const_data_ptr<float>();
}

// One row: v = in (* sc, when given) -> out int8, returns its scale.
//   scale = max(absmax(v), tiny) / 127;  out = round_half_even(v / scale)
float quantize_row(int8_t* out, const float* in, const float* sc, int64_t width) {
  float absmax = 0.0f;
  if (sc) {  // v = x * scale, rounded to fp32 as torch's `x * scale` is, computed in both passes
#pragma omp simd reduction(max : absmax)
    for (int64_t k = 0; k < width; ++k) absmax = std::max(absmax, std::fabs(in[k] * sc[k]));
    const float s = std::max(absmax, kTiny) / kInt8Max;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k) out[k] = static_cast<int8_t>(std::nearbyint((in[k] * sc[k]) / s));
    return s;
  }
#pragma omp simd reduction(max : absmax)
  for (int64_t k = 0; k < width; ++k) absmax = std::max(absmax, std::fabs(in[k]));
  const float s = std::max(absmax, kTiny) / kInt8Max;
#pragma omp simd
  for (int64_t k = 0; k < width; ++k) out[k] = static_cast<int8_t>(std::nearbyint(in[k] / s));
  return s;
}

// One row of the epilogue: o = ((acc * x_scale) * w_scale) (* out_scale) (+ bias), torch's order.
void dequantize_row(float* o, const int32_t* a, float s, const float* ws, const float* rs, const float* b, int64_t width) {
  if (rs) {
#pragma omp simd
    for (int64_t n = 0; n < width; ++n) o[n] = static_cast<float>(a[n]) * s * ws[n] * rs[n];
  } else {
#pragma omp simd
    for (int64_t n = 0; n < width; ++n) o[n] = static_cast<float>(a[n]) * s * ws[n];
  }
  if (b) {
#pragma omp simd
    for (int64_t n = 0; n < width; ++n) o[n] += b[n];
  }
}

// A part of a (possibly fused) int8 linear's output, output columns [col, col + width) of Wq.
// Rows from `start` on are rank-1 FLoRA rows, scaled by their slot's in_scale [S, d_in] and
// out_scale [S, width] rows (slots[m - start]); the rows before, or all rows without scales, are plain.
struct Part {
  int64_t col, width, start;
  const float* in_scale;
  const float* out_scale;
  const int64_t* slots;
};

// Columns [n0, n1) of part p from its quantized input (xq, x_scale xs): one single-threaded
// _int_mm with those rows of Wq, then the block's epilogue into out (row stride out_stride).
void gemm_block(const Part& p, int64_t n0, int64_t n1, const at::Tensor& xq, const float* xs, const at::Tensor& qweight,
                const float* w_scale, const float* bias, float* out, int64_t out_stride) {
  const at::Tensor acc = at::_int_mm(xq, qweight.slice(0, n0, n1).t());  // [M, n1 - n0] int32
  const int32_t* a = acc.const_data_ptr<int32_t>();
  for (int64_t m = 0; m < acc.size(0); ++m) {
    const float* rs = m < p.start ? nullptr : p.out_scale + p.slots[m - p.start] * p.width + (n0 - p.col);
    dequantize_row(out + m * out_stride + n0, a + m * acc.stride(0), xs[m], w_scale + n0, rs, bias ? bias + n0 : nullptr, n1 - n0);
  }
}

struct Block {  // columns [n0, n1) of one part, run by one thread
  const Part* part;
  int64_t n0, n1;
};

// Blocks per thread: whole parts, widest first, each to the thread with the least work so far,
// counting a GEMM call as kCallColumns columns on top of its width (measured at 32 rows x 576, one
// thread: ~17 us + 0.14 us per column, so q, k, v of SmolLM2 (576, 192, 192) split as q | k + v:
// 95 | 96 us). While there are fewer blocks than threads, the widest block is halved.
std::vector<std::vector<Block>> schedule(const std::vector<Part>& parts, int64_t threads) {
  constexpr int64_t kCallColumns = 120, kMinBlock = 64;
  std::vector<Block> blocks;
  for (const Part& p : parts) blocks.push_back({&p, p.col, p.col + p.width});
  auto wider = [](const Block& a, const Block& b) { return a.n1 - a.n0 > b.n1 - b.n0; };
  std::sort(blocks.begin(), blocks.end(), wider);
  while (static_cast<int64_t>(blocks.size()) < threads && blocks.front().n1 - blocks.front().n0 >= 2 * kMinBlock) {
    const Block widest = blocks.front();
    const int64_t mid = widest.n0 + (widest.n1 - widest.n0) / 2;
    blocks.front() = {widest.part, widest.n0, mid};
    blocks.push_back({widest.part, mid, widest.n1});
    std::sort(blocks.begin(), blocks.end(), wider);
  }
  const int64_t used = std::min<int64_t>(threads, blocks.size());
  std::vector<std::vector<Block>> per_thread(used);
  std::vector<int64_t> load(used, 0);
  for (const Block& b : blocks) {
    const int64_t j = std::min_element(load.begin(), load.end()) - load.begin();
    per_thread[j].push_back(b);
    load[j] += kCallColumns + (b.n1 - b.n0);
  }
  return per_thread;
}

}  // namespace

namespace flora {

// x [M, K] float32 (scaled row-wise: v = x[m] * scale[slots[m]] when given) ->
// (xq [M, K] int8, x_scale [M, 1] float32), v ~= xq * x_scale (quantize_row).
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, const std::optional<at::Tensor>& row_scale,
                                                 const std::optional<at::Tensor>& slots) {
  check_rows(x, at::kFloat, "x");
  const int64_t rows = x.size(0), width = x.size(1), stride = x.stride(0);
  const float* in_scales = row_scales(row_scale, slots, rows, width, "scale");
  const int64_t* slot = in_scales ? slots->const_data_ptr<int64_t>() : nullptr;
  at::Tensor xq = at::empty({rows, width}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({rows, 1}, x.options());
  const float* src = x.const_data_ptr<float>();
  int8_t* dst = xq.mutable_data_ptr<int8_t>();
  float* scales = scale.mutable_data_ptr<float>();
  at::parallel_for(0, rows, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      scales[m] = quantize_row(dst + m * width, src + m * stride, in_scales ? in_scales + slot[m] * width : nullptr, width);
    }
  });
  return {xq, scale};
}

// out [M, N] float32 = acc [M, N] int32 * x_scale [M, 1] * w_scale [N] (* out_scale[slots[m]]) (+ bias [N]),
// in place. out may be a row slice or a column block of a larger tensor (any row stride).
void dequantize_into(at::Tensor& out, const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& out_scale,
                     const std::optional<at::Tensor>& slots) {
  check_rows(out, at::kFloat, "out");
  check_rows(acc, at::kInt, "acc");
  const int64_t rows = acc.size(0), width = acc.size(1);
  TORCH_CHECK(out.size(0) == rows && out.size(1) == width, "out has shape ", out.sizes(), ", acc ", acc.sizes());
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.numel() == rows && x_scale.is_contiguous(),
              "x_scale must be a contiguous float32 [", rows, ", 1]");
  check_epilogue(w_scale, bias, width);
  const bool has_bias = bias.has_value();
  const float* row_scale = row_scales(out_scale, slots, rows, width, "out_scale");
  const int64_t* slot = row_scale ? slots->const_data_ptr<int64_t>() : nullptr;
  const int32_t* in = acc.const_data_ptr<int32_t>();
  const float* xs = x_scale.const_data_ptr<float>();
  const float* ws = w_scale.const_data_ptr<float>();
  const float* b = has_bias ? bias->const_data_ptr<float>() : nullptr;
  float* dst = out.mutable_data_ptr<float>();
  const int64_t in_stride = acc.stride(0), out_stride = out.stride(0);
  at::parallel_for(0, rows, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      dequantize_row(dst + m * out_stride, in + m * in_stride, xs[m], ws, row_scale ? row_scale + slot[m] * width : nullptr, b, width);
    }
  });
}

// out [M, N] float32 = the whole int8 linear for x [M, K] float32 and Wq [N, K] int8 (rows contiguous):
//   quantize_rows(x [∘ in_scale[slots]]) -> _int_mm with Wqᵀ -> dequantize_into (w_scale, bias, out_scale)
// with the GEMM split by output columns, one block per thread, each a single-threaded oneDNN GEMM
// followed by its block's epilogue. oneDNN's own 2-thread split of a decode-sized GEMM (32 rows) ran
// only 1.2-1.5x its 1-thread time on this machine; disjoint column blocks share nothing but x
// (measured: 20-30 % faster for narrow outputs such as 576->576, even for wide ones; docs/engine.md).
void int8_linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scale,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_scale,
                      const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& slots) {
  check_rows(out, at::kFloat, "out");
  check_rows(qweight, at::kChar, "qweight");
  const int64_t rows = x.size(0), width = qweight.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == qweight.size(1), "x ", x.sizes(), " does not fit the weight [d_out, d_in] ", qweight.sizes());
  TORCH_CHECK(out.size(0) == rows && out.size(1) == width, "out has shape ", out.sizes(), ", expected [", rows, ", ", width, "]");
  check_epilogue(w_scale, bias, width);
  const auto [xq, x_scale] = quantize_rows(x, in_scale, slots);
  const float* row_scale = row_scales(out_scale, slots, rows, width, "out_scale");
  if (rows == 0) return;
  // One part, all columns; its input is quantized above, so only the output scales are needed.
  const Part whole{0, width, row_scale ? 0 : rows, nullptr, row_scale, row_scale ? slots->const_data_ptr<int64_t>() : nullptr};
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  constexpr int64_t kMinBlock = 64;  // columns per block at least: a floor against tiny GEMM calls (not tuned)
  const int64_t blocks = std::clamp<int64_t>(width / kMinBlock, 1, at::get_num_threads());
  const int64_t block = (width + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      gemm_block(whole, j * block, std::min(width, (j + 1) * block), xq, x_scale.const_data_ptr<float>(), qweight,
                 w_scale.const_data_ptr<float>(), b, out.mutable_data_ptr<float>(), out.stride(0));
    }
  });
}

// out [M, N] float32 = the parts of a fused projection, each an int8 linear of x [M, K] with its
// columns of Wq [N, K] (and w_scale, bias), some of them rank-1 FLoRA on their last rows (Part):
// per block, the part's input quantized (FLoRA rows scaled by in_scale), one single-threaded
// _int_mm, the block's epilogue (FLoRA rows by out_scale). The parts' inputs differ, so they
// cannot share one GEMM; run one after another (one int8_linear_into each) the narrow ones were
// split across both threads at 192 columns, where a GEMM call's fixed cost dominates: q, k, v of
// SmolLM2 took 153 us that way, 92 us as one plain fused GEMM. Each row's arithmetic is
// int8_linear_into's, so the result is bitwise the per-part ops'.
void int8_parts_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scale,
                     const std::optional<at::Tensor>& bias, const std::vector<int64_t>& splits, const std::vector<int64_t>& starts,
                     const std::vector<std::optional<at::Tensor>>& in_scales, const std::vector<std::optional<at::Tensor>>& out_scales,
                     const std::vector<std::optional<at::Tensor>>& slots) {
  check_rows(out, at::kFloat, "out");
  check_rows(x, at::kFloat, "x");
  check_rows(qweight, at::kChar, "qweight");
  const int64_t rows = x.size(0), d_in = x.size(1), width = qweight.size(0), num_parts = splits.size();
  TORCH_CHECK(d_in == qweight.size(1), "x ", x.sizes(), " does not fit the weight [d_out, d_in] ", qweight.sizes());
  TORCH_CHECK(out.size(0) == rows && out.size(1) == width, "out has shape ", out.sizes(), ", expected [", rows, ", ", width, "]");
  check_epilogue(w_scale, bias, width);
  TORCH_CHECK(num_parts >= 1 && static_cast<int64_t>(starts.size()) == num_parts && static_cast<int64_t>(in_scales.size()) == num_parts &&
                  static_cast<int64_t>(out_scales.size()) == num_parts && static_cast<int64_t>(slots.size()) == num_parts,
              "splits, starts, in_scales, out_scales and slots need one entry per part (", num_parts, ")");
  std::vector<Part> parts;
  int64_t col = 0;
  for (int64_t p = 0; p < num_parts; ++p) {
    TORCH_CHECK(splits[p] >= 1, "part ", p, " has width ", splits[p]);
    TORCH_CHECK(starts[p] >= 0 && starts[p] <= rows, "part ", p, "'s FLoRA rows start at ", starts[p], ", outside [0, ", rows, "]");
    const std::optional<at::Tensor>& in = in_scales[p];
    const std::optional<at::Tensor>& out_s = out_scales[p];
    const std::optional<at::Tensor>& sl = slots[p];
    TORCH_CHECK(in.has_value() == out_s.has_value(), "part ", p, ": in_scale and out_scale come together");
    const int64_t scaled_rows = in.has_value() ? rows - starts[p] : 0;
    parts.push_back({col, splits[p], starts[p], row_scales(in, sl, scaled_rows, d_in, "in_scale"),
                     row_scales(out_s, sl, scaled_rows, splits[p], "out_scale"), sl.has_value() ? sl->const_data_ptr<int64_t>() : nullptr});
    if (!in.has_value()) parts.back().start = rows;  // every row plain
    col += splits[p];
  }
  TORCH_CHECK(col == width, "the parts' widths sum to ", col, ", the weight has ", width, " rows");
  if (rows == 0) return;
  const float* src = x.const_data_ptr<float>();
  const float* ws = w_scale.const_data_ptr<float>();
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* dst = out.mutable_data_ptr<float>();
  const auto per_thread = schedule(parts, at::get_num_threads());
  at::parallel_for(0, per_thread.size(), 1, [&](int64_t first, int64_t last) {
    at::Tensor xq = at::empty({rows, d_in}, x.options().dtype(at::kChar));
    std::vector<float> xs(rows);
    const Part* quantized = nullptr;  // the part whose input xq holds: blocks of one part, or plain parts, share it
    for (int64_t j = first; j < last; ++j) {
      for (const Block& block : per_thread[j]) {
        const Part& p = *block.part;
        const bool same_input = quantized && (quantized == &p || (quantized->start == rows && p.start == rows));
        if (!same_input) {
          int8_t* q = xq.mutable_data_ptr<int8_t>();
          for (int64_t m = 0; m < rows; ++m) {
            const float* sc = m < p.start ? nullptr : p.in_scale + p.slots[m - p.start] * d_in;
            xs[m] = quantize_row(q + m * d_in, src + m * x.stride(0), sc, d_in);
          }
          quantized = &p;
        }
        gemm_block(p, block.n0, block.n1, xq, xs.data(), qweight, ws, b, dst, out.stride(0));
      }
    }
  });
}

}  // namespace flora
