// Declares the rankdetr operators, registers each backend's kernels for them, holds the input
// checks the backends share, and makes rankdetr._C an importable Python module.
#include <Python.h>
#include <torch/library.h>

#include "ms_deform_attn/ms_deform_attn.h"

extern "C" {
// Importing rankdetr._C loads this library, whose static initialisers register the operators.
// The module itself has no Python attributes: everything is reached through torch.ops.rankdetr.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rankdetr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, "
      "bool compute_grad_value=True) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_compiled() -> bool", []() -> bool {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

namespace rankdetr {

namespace {

void check_integer_table(const at::Tensor& table, const char* name, const char* op) {
  // Any integer width: the backends convert the tables to int64 themselves.
  TORCH_CHECK(at::isIntegralType(table.scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must be an integer tensor (int64), got ", table.scalar_type());
}

void check_dtype_of_value(const at::Tensor& t, const char* name, const Inputs& in, const char* op) {
  TORCH_CHECK(t.scalar_type() == in.value.scalar_type(), op, ": ", name,
              " must have value's dtype (", in.value.scalar_type(), "), got ", t.scalar_type());
}

// The operators' schema, unpacked into the backends' Inputs.
template <at::Tensor (*kForward)(const Inputs&)>
at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  return kForward({value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights});
}

template <Gradients (*kBackward)(const Inputs&, const at::Tensor&, bool)>
Gradients backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights, const at::Tensor& grad_output,
                   bool compute_grad_value) {
  return kBackward({value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights},
                   grad_output, compute_grad_value);
}

}  // namespace

Sizes check_shapes(const Inputs& in, const char* op) {
  TORCH_CHECK(in.value.dim() == 4, op, ": value must be (N, S, H, D), got shape ",
              in.value.sizes());
  Sizes s;
  s.N = in.value.size(0);
  s.S = in.value.size(1);
  s.H = in.value.size(2);
  s.D = in.value.size(3);
  TORCH_CHECK(in.spatial_shapes.dim() == 2 && in.spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must be (L, 2), got shape ", in.spatial_shapes.sizes());
  s.L = in.spatial_shapes.size(0);
  TORCH_CHECK(in.level_start_index.dim() == 1 && in.level_start_index.size(0) == s.L, op,
              ": level_start_index must be (L,) = (", s.L, ",), got shape ",
              in.level_start_index.sizes());
  const at::Tensor& loc = in.sampling_locations;
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == s.N && loc.size(2) == s.H && loc.size(3) == s.L &&
                  loc.size(5) == 2,
              op, ": sampling_locations must be (N, Lq, H, L, P, 2) with N=", s.N, ", H=", s.H,
              ", L=", s.L, ", got shape ", loc.sizes());
  s.Lq = loc.size(1);
  s.P = loc.size(4);
  TORCH_CHECK(in.attention_weights.sizes() == at::IntArrayRef({s.N, s.Lq, s.H, s.L, s.P}), op,
              ": attention_weights must be (N, Lq, H, L, P) = (", s.N, ", ", s.Lq, ", ", s.H,
              ", ", s.L, ", ", s.P, "), got shape ", in.attention_weights.sizes());
  check_integer_table(in.spatial_shapes, "spatial_shapes", op);
  check_integer_table(in.level_start_index, "level_start_index", op);
  check_dtype_of_value(in.sampling_locations, "sampling_locations", in, op);
  check_dtype_of_value(in.attention_weights, "attention_weights", in, op);
  return s;
}

void check_grad_output_shape(const at::Tensor& grad_output, const Sizes& s, const char* op) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.N, s.Lq, s.H * s.D}), op,
              ": grad_output must be (N, Lq, H * D) = (", s.N, ", ", s.Lq, ", ", s.H * s.D,
              "), got shape ", grad_output.sizes());
}

TORCH_LIBRARY_IMPL(rankdetr, CPU, m) {
  m.impl("ms_deform_attn_forward", &forward<ms_deform_attn_forward_cpu>);
  m.impl("ms_deform_attn_backward", &backward<ms_deform_attn_backward_cpu>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(rankdetr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &forward<ms_deform_attn_forward_cuda>);
  m.impl("ms_deform_attn_backward", &backward<ms_deform_attn_backward_cuda>);
}
#endif

}  // namespace rankdetr
