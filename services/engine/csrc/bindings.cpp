// The kernels of ops.h as one Python module (services/engine/native.py: `native.ops()`), bound with
// pybind11 rather than registered as torch.ops: the dispatcher's Python entry converts every argument
// by the op's schema into a boxed stack, which in the engine cost 10-20 us per call, ~450 calls per
// decode step with LoRA (docs/engine.md, "Bound as plain functions").
// Every kernel releases the GIL while it runs, as torch's ops do, so the engine's thread does not
// hold up the server's event loop. Errors (TORCH_CHECK) reach Python as RuntimeError.

#include <torch/python.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using py::arg;
  const auto none = py::none();
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("silu_mul", &flora::silu_mul, arg("gate"), arg("up"), nogil);
  m.def("argmax_rows", &flora::argmax_rows, arg("logits"), nogil);
  m.def("write_kv_", &flora::write_kv_, arg("k_cache"), arg("v_cache"), arg("k"), arg("v"), arg("slots"), nogil);
  m.def("paged_decode_attention_", &flora::paged_decode_attention_, arg("out"), arg("q"), arg("k_cache"), arg("v_cache"), arg("rows"),
        arg("kv_index"), arg("lengths"), arg("scale"), nogil);
  m.def("quantize_rows", &flora::quantize_rows, arg("x"), arg("scale") = none, arg("slots") = none, nogil);
  m.def("dequantize_into", &flora::dequantize_into, arg("out"), arg("acc"), arg("x_scale"), arg("w_scale"), arg("bias"),
        arg("out_scale") = none, arg("slots") = none, nogil);
  m.def("int8_linear_into", &flora::int8_linear_into, arg("out"), arg("x"), arg("qweight"), arg("w_scale"), arg("bias"),
        arg("in_scale") = none, arg("out_scale") = none, arg("slots") = none, nogil);
  m.def("int8_parts_into", &flora::int8_parts_into, arg("out"), arg("x"), arg("qweight"), arg("w_scale"), arg("bias"), arg("splits"),
        arg("starts"), arg("in_scales"), arg("out_scales"), arg("slots"), nogil);
  m.def("lora_bgmv_", &flora::lora_bgmv_, arg("y"), arg("x"), arg("a"), arg("b"), arg("slots"), arg("start"), arg("a_scale") = none,
        arg("b_scale") = none, nogil);
  m.def("rms_norm", &flora::rms_norm, arg("x"), arg("weight"), arg("eps"), nogil);
  m.def("rope", &flora::rope, arg("x"), arg("cos"), arg("sin"), arg("heads"), nogil);
}
