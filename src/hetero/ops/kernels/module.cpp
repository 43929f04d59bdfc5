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
  // The compute entry points touch only tensors: they let go of the interpreter lock while they run,
  // so the server's event loop (and any other Python thread) runs during a decode step instead of
  // queueing behind it, and never makes the step wait for the lock back.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gemv_f32", &gemv_f32, nogil);
  m.def("gemv_bf16", &gemv_bf16, nogil);
  m.def("gemv_int8", &gemv_int8, nogil);
  m.def("gemv_int4", &gemv_int4, nogil);
  m.def("dequant_int4", &dequant_int4, nogil);
  m.def("gemm_rows_int8", &gemm_rows_int8, nogil);
  m.def("gemm_rows_int4", &gemm_rows_int4, nogil);
  m.def("gemm_rows_dense", &gemm_rows_dense, nogil);
  m.def("gemm_rows_gguf", &gemm_rows_gguf, py::arg("x"), py::arg("data"), py::arg("kind"), py::arg("K"),
        py::arg("fp32_out") = false, nogil);
  m.def("gemv_gguf", &gemv_gguf, py::arg("x"), py::arg("data"), py::arg("kind"), py::arg("K"),
        py::arg("fp32_out") = false, nogil);
  m.def("dequant_gguf", &dequant_gguf, nogil);
  m.def("set_act_int8", &set_act_int8);
  m.def("act_int8", &act_int8);
  m.def("has_act_int8", &has_act_int8);
  m.def("rmsnorm", &rmsnorm, nogil);
  m.def("add_rmsnorm", &add_rmsnorm, nogil);
  m.def("decode_attention", &decode_attention, nogil);
  m.def("silu_mul", &silu_mul, nogil);
  m.def("experts_ffn", &experts_ffn, nogil);
  m.def("experts_rows", &experts_rows, nogil);
  m.def("kinds", &kinds);
  m.def("has_bf16_dot", &has_bf16_dot);
  py::class_<ExpertsRouted>(m, "ExpertsRouted")
      .def(py::init<torch::Tensor, int64_t, bool, int64_t, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>>())
      .def("step", &ExpertsRouted::step, nogil)
      .def("route_only", &ExpertsRouted::route_only, nogil);
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool>())
      // per linear: a kind and a weight, or lists of them (a block linear's row segments)
      .def("add_layer", [](DecodeStack& st, py::list kinds, py::list w, std::vector<torch::Tensor> s,
                           std::vector<torch::Tensor> b, torch::Tensor attn_norm, torch::Tensor mlp_norm) {
        TORCH_CHECK(kinds.size() == w.size(), "one weight (or list) per kind (or list)");
        std::vector<std::vector<int64_t>> ks;
        std::vector<std::vector<torch::Tensor>> ws;
        for (size_t i = 0; i < kinds.size(); ++i) {
          if (py::isinstance<py::int_>(kinds[i])) {
            ks.push_back({kinds[i].cast<int64_t>()});
            ws.push_back({w[i].cast<torch::Tensor>()});
          } else {
            ks.push_back(kinds[i].cast<std::vector<int64_t>>());
            ws.push_back(w[i].cast<std::vector<torch::Tensor>>());
          }
        }
        st.add_layer(ks, ws, s, b, attn_norm, mlp_norm);
      })
      .def("n_layers", &DecodeStack::n_layers)
      .def("step", &DecodeStack::step, nogil)
      .def("step_rows", &DecodeStack::step_rows, nogil)
      .def("step_q8", &DecodeStack::step_q8, nogil);
}
