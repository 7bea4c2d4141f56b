"""Precision helpers: lift half precision to float32 where accuracy matters, never lower float64."""

from __future__ import annotations

import torch

__all__ = ["at_least_float32", "lift_to_float32"]


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 -> float32; float32 and float64 unchanged."""
    return torch.promote_types(dtype, torch.float32)


def lift_to_float32(x: torch.Tensor) -> torch.Tensor:
    """A floating tensor in at least float32 (half precision is lifted; float64 stays float64);
    other tensors unchanged."""
    if not x.is_floating_point():
        return x
    return x.to(at_least_float32(x.dtype))
