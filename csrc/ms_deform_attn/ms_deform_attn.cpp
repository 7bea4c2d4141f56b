// Declares the rankdetr operators and makes rankdetr._C an importable Python module.
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
