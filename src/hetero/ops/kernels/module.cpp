// The Python module: binds the entry points of kernels.h (loaded by hetero/ops/kernels/__init__.py).
#include <torch/extension.h>
#include <map>
#include <string>
#include "kernels.h"

namespace {

// Kind codes by precision name: Python reads them here, so the two sides cannot drift apart.
std::map<std::string, int64_t> kinds() {
  return {{"fp32", KIND_F32}, {"bf16", KIND_BF16}, {"int8", KIND_INT8}, {"int4", KIND_INT4},
          {"q8_0", KIND_Q8_0}, {"q4_0", KIND_Q4_0}, {"q4_1", KIND_Q4_1}, {"q4_k", KIND_Q4_K},
          {"q5_k", KIND_Q5_K}, {"q6_k", KIND_Q6_K}};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_f32", &gemv_f32);
  m.def("gemv_bf16", &gemv_bf16);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
  m.def("dequant_int4", &dequant_int4);
  m.def("gemv_gguf", &gemv_gguf);
  m.def("dequant_gguf", &dequant_gguf);
  m.def("rmsnorm", &rmsnorm);
  m.def("add_rmsnorm", &add_rmsnorm);
  m.def("decode_attention", &decode_attention);
  m.def("silu_mul", &silu_mul);
  m.def("kinds", &kinds);
  m.def("has_bf16_dot", &has_bf16_dot);
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("n_layers", &DecodeStack::n_layers)
      .def("step", &DecodeStack::step);
}
