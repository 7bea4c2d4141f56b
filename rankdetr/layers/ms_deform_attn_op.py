"""Multi-scale deformable attention (Deformable DETR's sampling op), compiled and reference.

Shapes, with N batch, S = sum_l h_l * w_l keys, H heads, D channels per head, Lq queries, L levels
and P points per level:

* ``value``: (N, S, H, D), the keys of all levels concatenated level by level.
* ``spatial_shapes``: (L, 2) integer, ``(h_l, w_l)`` of each level.
* ``level_start_index``: (L,) integer, where each level starts inside S.
* ``sampling_locations``: (N, Lq, H, L, P, 2), normalised ``(x, y)``; (0, 0) is the top-left
  corner of a level's map and (1, 1) its bottom-right corner.
* ``attention_weights``: (N, Lq, H, L, P).
* output: (N, Lq, H * D), the attention-weighted sum of the bilinearly sampled values.

Sampling equals ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` on
the grid ``2 * sampling_locations - 1``: points outside a map read zeros, and a NaN or infinite
location yields NaN.

Precision under autocast (CPU or CUDA): the op runs in float32. ``value`` and the attention
weights (bf16/fp16 out of autocast's linear layers) and the sampling locations are cast to float32
first, and the output is float32 (the next linear layer autocasts it again). Sampling locations
are never rounded to half precision: near 1.0 a bf16 step is 1/128, 0.4 px on a 100-px level. The
rule is registered with the dispatcher for ``torch.ops.rankdetr.ms_deform_attn_forward`` and
applied by :func:`ms_deform_attn` itself (which the pure-PyTorch fallback also goes through).
Outside autocast the three floating inputs must share one dtype (the CUDA kernel takes float16
and bfloat16 too, accumulating in float32).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rankdetr._ext import extension_available, extension_has_cuda

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]

_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)
# Resolved once at import, as plain bools, so torch.compile does not trace into importlib.
_HAS_EXTENSION = extension_available()
_HAS_CUDA_KERNEL = extension_has_cuda()
_warned_no_cuda_kernel = False


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_shapes: list[tuple[int, int]] | None = None,
    sample_level: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention built on ``F.grid_sample``.

    Same arguments, result and gradients as :func:`ms_deform_attn` (see the module docstring for
    shapes), but slower and more memory hungry; it is the fallback where the compiled op is
    missing, and the baseline of the tests and benchmarks. It reads ``spatial_shapes`` and
    ``level_start_index`` on the host (a device sync on GPU) and does no input validation.

    ``level_shapes``, the (h, w) of each level as Python (or symbolic) ints taken from the
    feature maps' shapes, replaces that host read when given: the levels then start at the
    running sum of h * w. The ONNX export passes them so that the traced graph computes the
    slices from the input size instead of baking in the sizes it was traced at.

    ``sample_level(value (N*H, D, h, w), grid (N*H, Lq, P, 2)) -> (N*H, D, Lq, P)`` replaces
    :func:`bilinear_samples` (the ONNX export passes the same sampling as one opaque op).
    """
    sample_level = sample_level or bilinear_samples
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if level_shapes is None:
        shapes, starts = spatial_shapes.tolist(), level_start_index.tolist()
    else:
        shapes, starts = level_shapes, _running_starts(level_shapes)
    # Both rearranged once, so that each level below is a view: (N, Lk, H, D) -> (N*H, D, Lk),
    # and the grid, which spans [-1, 1] across the outer pixel edges (align_corners=False),
    # (N, Lq, H, L, P, 2) -> (L, N*H, Lq, P, 2). Rearranged level by level, the same copies
    # took L times the ops (in the exported ONNX graph too).
    values = value.permute(0, 2, 3, 1).reshape(n * heads, d, -1)
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 1, 4, 5).flatten(1, 2)
    # (N, Lq, H, L, P) -> (N*H, 1, Lq, L, P), to weight each level's (N*H, D, Lq, P) samples.
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, lq, levels, points)
    out = None
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        level_value = values[:, :, start : start + h * w].unflatten(-1, (h, w))  # (N*H, D, h, w)
        samples = sample_level(level_value, grids[level])  # (N*H, D, Lq, P)
        # Summed level by level rather than over a stack of all levels' samples: the stack
        # would hold L times the largest intermediate and cost a copy of it (in ONNX Runtime,
        # ~30 % of the R50 encoder's attention time at 800x1333).
        level_sum = (samples * weights[..., level, :]).sum(-1)  # (N*H, D, Lq)
        out = level_sum if out is None else out + level_sum
    return out.view(n, heads * d, lq).transpose(1, 2).contiguous()


def bilinear_samples(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w), (N, Lq, P, 2) in [-1, 1] -> (N, D, Lq, P): bilinear samples, zero
    outside the map, the grid spanning the outer pixel edges (``align_corners=False``)."""
    return F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _running_starts(level_shapes: list[tuple[int, int]]) -> list[int]:
    """Where each level starts in the flattened keys: 0, h_0 * w_0, h_0 * w_0 + h_1 * w_1, ..."""
    starts, start = [], 0
    for h, w in level_shapes:
        starts.append(start)
        start = start + h * w
    return starts


def _describe(name: str, tensor: torch.Tensor) -> str:
    return f"{name} {tuple(tensor.shape)}"


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise TypeError/ValueError naming the offending tensors.

    Only metadata is inspected, so the checks cost no device sync, with one exception: when
    ``spatial_shapes`` and ``level_start_index`` live on the CPU (and we are not being traced by
    torch.compile), their values are checked too (sum of h * w equals S, starts are the running
    sum). On a GPU those two value checks are skipped rather than paid for with a sync.
    """
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor)}")
    devices = {name: tensor.device for name, tensor in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"ms_deform_attn: all inputs must be on one device, got {listing}")

    float_dtypes = {
        name: named[name].dtype for name in ("value", "sampling_locations", "attention_weights")
    }
    for name, dtype in float_dtypes.items():
        if not dtype.is_floating_point:
            raise TypeError(f"ms_deform_attn: {name} must be floating point, got {dtype}")
    if len(set(float_dtypes.values())) > 1:
        listing = ", ".join(f"{name} {dtype}" for name, dtype in float_dtypes.items())
        raise TypeError(f"ms_deform_attn: floating inputs must share one dtype, got {listing}")
    for name in ("spatial_shapes", "level_start_index"):
        tensor = named[name]
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise TypeError(f"ms_deform_attn: {name} must be an integer tensor, got {tensor.dtype}")

    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, H, D), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Lq, H, L, P, 2), got "
            f"{tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            "ms_deform_attn: attention_weights must be (N, Lq, H, L, P), got "
            f"{tuple(attention_weights.shape)}"
        )
    n, s, heads, _ = value.shape
    n_loc, lq, heads_loc, levels, points, _ = sampling_locations.shape
    if (n_loc, heads_loc) != (n, heads):
        raise ValueError(
            "ms_deform_attn: batch N and heads H disagree between "
            f"{_describe('value', value)} (N={n}, H={heads}) and "
            f"{_describe('sampling_locations', sampling_locations)} (N={n_loc}, H={heads_loc})"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            "ms_deform_attn: attention_weights must be (N, Lq, H, L, P) = "
            f"{tuple(sampling_locations.shape[:-1])} like sampling_locations, got "
            f"{_describe('attention_weights', attention_weights)}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape != (levels, 2):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (L, 2) = ({levels}, 2) with L taken from "
            f"sampling_locations, got {_describe('spatial_shapes', spatial_shapes)}"
        )
    if level_start_index.shape != (levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) = ({levels},), got "
            f"{_describe('level_start_index', level_start_index)}"
        )

    if spatial_shapes.device.type != "cpu" or torch.compiler.is_compiling():
        return
    shapes = spatial_shapes.tolist()
    sizes = [h * w for h, w in shapes]
    if any(h < 0 or w < 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes has a negative size: {shapes}")
    if sum(sizes) != s:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {shapes} hold sum(h * w) = {sum(sizes)} keys but "
            f"value has S = {s} ({_describe('value', value)})"
        )
    if level_start_index.device.type == "cpu":
        starts = level_start_index.tolist()
        expected = [sum(sizes[:level]) for level in range(levels)]
        if starts != expected:
            raise ValueError(
                f"ms_deform_attn: level_start_index {starts} does not match spatial_shapes "
                f"{shapes}, whose levels start at {expected}"
            )


def _warn_no_cuda_kernel() -> None:
    global _warned_no_cuda_kernel
    if _warned_no_cuda_kernel:
        return
    _warned_no_cuda_kernel = True
    warnings.warn(
        "ms_deform_attn: rankdetr._C was built without its CUDA kernel; using the slower "
        "pure-PyTorch reference on the GPU. Rebuild on a machine with nvcc (or FORCE_CUDA=1).",
        RuntimeWarning,
        stacklevel=3,
    )


def _use_compiled(value: torch.Tensor) -> bool:
    if not _HAS_EXTENSION:
        return False
    if value.device.type == "cpu":
        # The CPU kernel is float32/float64 only; half types take the reference.
        return value.dtype in _CPU_KERNEL_DTYPES
    if value.device.type == "cuda":
        if _HAS_CUDA_KERNEL:
            return True
        _warn_no_cuda_kernel()
    return False


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention: sample, weight and sum the values of every level.

    Args:
        value: (N, S, H, D) keys of all levels, concatenated level by level.
        spatial_shapes: (L, 2) integer ``(h, w)`` per level, on the same device as ``value``.
        level_start_index: (L,) integer offset of each level inside S.
        sampling_locations: (N, Lq, H, L, P, 2) normalised ``(x, y)``, [0, 1] inside the map.
        attention_weights: (N, Lq, H, L, P).

    Returns:
        (N, Lq, H * D) tensor, differentiable w.r.t. ``value``, ``sampling_locations`` and
        ``attention_weights``.

    Sampling is bilinear with zeros outside each map (``grid_sample``'s ``align_corners=False``
    convention); a NaN or infinite location makes its output row, and its gradients, NaN.

    Runs the compiled ``torch.ops.rankdetr`` kernel when rankdetr._C is built for the inputs'
    device (and, on CPU, for float32/float64), else :func:`ms_deform_attn_reference`. Raises
    TypeError/ValueError for inconsistent inputs; see :func:`_check_inputs` for which checks are
    skipped to avoid a device sync.
    """
    value, sampling_locations, attention_weights = _autocast_to_float32(
        value, sampling_locations, attention_weights
    )
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    # The kernels read int64 tables; .long() returns the tensor itself when it already is.
    spatial_shapes, level_start_index = spatial_shapes.long(), level_start_index.long()
    if _use_compiled(value):
        return torch.ops.rankdetr.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _autocast_to_float32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast on the tensors' device, floating inputs in float32 (float64 ones are kept
    and then lift the others to float64); otherwise unchanged. See the module docstring."""
    device_type = tensors[0].device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(
        device_type
    ):
        return tensors
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _setup_context(ctx, inputs, output) -> None:
    # Backward re-samples from all five inputs; the output itself is not needed.
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    # grad_value is the costly part (a scatter over all keys): skip it when value needs none.
    compute_grad_value = ctx.needs_input_grad[0]
    grad_value, grad_locations, grad_weights = torch.ops.rankdetr.ms_deform_attn_backward(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        grad_output,
        compute_grad_value,
    )
    # spatial_shapes and level_start_index are integer tables: no gradient.
    return grad_value if compute_grad_value else None, None, None, grad_locations, grad_weights


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, heads, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], heads * d))


def _backward_fake(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    grad_output,
    compute_grad_value=True,
):
    # The kernels return contiguous gradients whatever the inputs' strides; the fakes must agree.
    return (
        value.new_empty(value.shape if compute_grad_value else (0,)),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _register() -> None:
    # The op schemas live in rankdetr._C; without it there is nothing to attach these to.
    if not _HAS_EXTENSION:
        return
    torch.library.register_fake("rankdetr::ms_deform_attn_forward")(_forward_fake)
    torch.library.register_fake("rankdetr::ms_deform_attn_backward")(_backward_fake)
    torch.library.register_autograd(
        "rankdetr::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )
    for device_type in ("cpu", "cuda"):  # the precision contract of the module docstring
        torch.library.register_autocast(
            "rankdetr::ms_deform_attn_forward", device_type, torch.float32
        )


_register()
