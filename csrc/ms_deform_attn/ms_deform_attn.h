// Multi-scale deformable attention (Deformable DETR), rankdetr's compiled op.
//
// Shapes (N batch, S = sum_l h_l * w_l keys, H heads, D channels per head, Lq queries,
// L levels, P points per level):
//   value               (N, S, H, D)
//   spatial_shapes      (L, 2) int64, (h, w) per level
//   level_start_index   (L,)   int64, offset of each level inside S
//   sampling_locations  (N, Lq, H, L, P, 2) normalised (x, y) in [0, 1]
//   attention_weights   (N, Lq, H, L, P)
//   output              (N, Lq, H * D)
// Sampling matches grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False).
//
// The operators are declared once (ms_deform_attn.cpp, TORCH_LIBRARY(rankdetr, ...)), where each
// backend's kernels are also registered for its dispatch key (TORCH_LIBRARY_IMPL), so
// torch.ops.rankdetr.* dispatches by device. Autograd and the fake (meta) implementation are
// registered from Python (rankdetr/layers/ms_deform_attn_op.py).
#pragma once

// ATen's Tensor class alone: torch/types.h (or ATen/ATen.h) declares every ATen operator, and
// parsing those headers was most of each file's compile time (each file includes the operators it
// calls from ATen/ops/).
#include <ATen/core/Tensor.h>

#include <tuple>

namespace rankdetr {

// The five inputs both operators start with, in their schema's order.
struct Inputs {
  const at::Tensor& value;
  const at::Tensor& spatial_shapes;
  const at::Tensor& level_start_index;
  const at::Tensor& sampling_locations;
  const at::Tensor& attention_weights;
};

// The sizes of one call, named as above.
struct Sizes {
  int64_t N, S, H, D, Lq, L, P;
};

// Checks the shapes and dtypes every backend relies on, so that a direct torch.ops call cannot
// index out of bounds (the Python wrapper checks first, with friendlier messages). `op` starts
// the messages. Devices, the supported dtypes and the level table are each backend's to check.
Sizes check_shapes(const Inputs& in, const char* op);
void check_grad_output_shape(const at::Tensor& grad_output, const Sizes& s, const char* op);

// Each backend's kernels, registered for its dispatch key in ms_deform_attn.cpp. The backward
// returns (grad_value, grad_sampling_locations, grad_attention_weights); with
// compute_grad_value == false, grad_value is an empty (0,) tensor and is never computed (only the
// locations and weights need a gradient).
using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor ms_deform_attn_forward_cpu(const Inputs& in);
Gradients ms_deform_attn_backward_cpu(
    const Inputs& in, const at::Tensor& grad_output, bool compute_grad_value);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const Inputs& in);
// Accumulates grad_value with atomics, so it is nondeterministic: under
// torch.use_deterministic_algorithms(True) it raises (alertNotDeterministic) when it has to
// compute grad_value.
Gradients ms_deform_attn_backward_cuda(
    const Inputs& in, const at::Tensor& grad_output, bool compute_grad_value);
#endif

}  // namespace rankdetr
