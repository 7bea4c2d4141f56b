"""Softmax attention on CPUs where PyTorch's fused kernel fails in half precision.

PyTorch's CPU flash-attention kernel packs bf16 / fp16 operands for AMX whenever the CPU has
AMX, but the packing exists only in its AVX-512 build of the kernel. When ATen's CPU capability
is forced lower on such a CPU (`ATEN_CPU_CAPABILITY=default` or `=avx2`, e.g. to reproduce
another machine's code path), every half-precision attention raises "pack_vnni2 is only
supported when avx512 is supported". There, and only there, attention on the CPU under half
precision uses PyTorch's math kernel instead (same formula, unfused); everywhere else this
changes nothing.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["cpu_half_precision_attention_is_broken", "working_attention_kernel"]

_HALF = (torch.bfloat16, torch.float16)


def cpu_half_precision_attention_is_broken() -> bool:
    """Whether this process's ATen runs below AVX-512 on a CPU with AMX (module docstring)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return has_amx and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")


# Read once: the capability is fixed when ATen loads, and a constant keeps compiled layers free
# of the check (their graphs never see the context below on an unaffected machine).
_BROKEN = cpu_half_precision_attention_is_broken()


def working_attention_kernel(query: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context for attention on `query` (any shape): the math kernel where the fused one would
    fail (a CPU tensor in half precision, or under CPU autocast to half precision), else none."""
    if not _BROKEN or query.device.type != "cpu":
        return contextlib.nullcontext()
    autocast_half = torch.is_autocast_enabled("cpu") and (torch.get_autocast_dtype("cpu") in _HALF)
    if query.dtype in _HALF or autocast_half:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
