"""Which autocast dtype a training uses: ``train.amp.dtype`` = "bf16", "fp16" or "auto".

"auto" takes bf16 autocast where the hardware computes bf16 natively, and float32 elsewhere:

* CUDA: bf16 where ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else float32.
* CPU: bf16 where the CPU has AMX-BF16 or AVX-512 BF16, seen either by torch (its cpuinfo:
  ``torch.cpu._is_amx_tile_supported()``, ``torch.cpu._is_avx512_bf16_supported()``) or in the
  kernel's CPU flags (``amx_bf16``, ``avx512_bf16`` in /proc/cpuinfo), and torch's CPU
  capability (``torch.backends.cpu.get_cpu_capability()``) is AVX512 or better, so that its
  kernels take those paths. Elsewhere bf16 has no arithmetic units: each operation converts
  to and from float32, at 8 significant bits, so float32 is the default there (measured figures
  in the README).

Whatever is chosen, the losses, the matcher's costs, the box arithmetic and the deformable op's
sampling locations stay float32 (the modules cast them; ``tests/modeling/test_amp.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["AMP_DTYPES", "AmpChoice", "choose_amp_dtype", "cpu_bf16_features"]

AMP_DTYPES = ("bf16", "fp16", "auto")
_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_WIDE_CAPABILITIES = ("AVX512", "AMX", "AVX512_BF16", "AVX512_VNNI")


@dataclass(frozen=True)
class AmpChoice:
    """The resolved ``train.amp``: ``dtype`` "bf16", "fp16" or None (float32, autocast off),
    one sentence saying why, for the log, and whether that dtype is known to be slow here."""

    dtype: str | None
    reason: str
    slow: bool = False


def _proc_cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first processor's flags in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _torch_cpu_bf16_features() -> list[str]:
    """Native bf16 units as torch's cpuinfo sees them (private API: absent is none)."""
    found = []
    for name, probe in (
        ("AMX", "_is_amx_tile_supported"),
        ("AVX512-BF16", "_is_avx512_bf16_supported"),
    ):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            found.append(f"{name} (torch.cpu.{probe})")
    return found


def cpu_bf16_features(flags: set[str] | None = None) -> list[str]:
    """The evidence of native bf16 on this CPU, as readable strings; empty where there is none.

    Args:
        flags: the CPU flags to read (default: /proc/cpuinfo's); tests pass their own.
    """
    flags = _proc_cpuinfo_flags() if flags is None else flags
    found = _torch_cpu_bf16_features()
    found += [f"CPU flag {flag}" for flag in _CPU_FLAGS if flag in flags]
    return found


def choose_amp_dtype(
    dtype: str,
    device_type: str,
    *,
    cpu_features: list[str] | None = None,
    cpu_capability: str | None = None,
    cuda_bf16: bool | None = None,
) -> AmpChoice:
    """Resolve ``train.amp.dtype`` for a device ("cpu" or "cuda").

    Args:
        dtype: "bf16", "fp16" (kept as given) or "auto".
        device_type: the training device's type.
        cpu_features, cpu_capability, cuda_bf16: what the hardware offers (default: detected;
            tests pass them to take both branches on any machine).

    Returns:
        The choice and its reason. Raises ValueError for another dtype string.
    """
    if dtype not in AMP_DTYPES:
        raise ValueError(f"train.amp.dtype must be one of {AMP_DTYPES}, got {dtype!r}")
    if dtype == "bf16" and device_type == "cpu":
        features = cpu_bf16_features() if cpu_features is None else cpu_features
        if not features:
            # Seen on an AVX2-only AMD EPYC: a 2000x256x256 bf16 matmul 67x slower than float32.
            return AmpChoice(
                dtype,
                "train.amp.dtype=bf16 as configured, but this CPU has no native bf16 (no AMX-BF16 "
                "or AVX-512 BF16): its bf16 matmuls run tens of times slower than float32; "
                'train.amp.dtype="auto" picks float32 here',
                slow=True,
            )
    if dtype != "auto":
        return AmpChoice(dtype, f"train.amp.dtype={dtype} as configured")
    if device_type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return AmpChoice("bf16", "auto: the CUDA device computes bf16 natively")
        return AmpChoice(None, "auto: the CUDA device has no native bf16, so float32")
    features = cpu_bf16_features() if cpu_features is None else cpu_features
    capability = (
        torch.backends.cpu.get_cpu_capability() if cpu_capability is None else cpu_capability
    )
    if not features:
        return AmpChoice(
            None,
            f"auto: this CPU has no native bf16 (no AMX-BF16 or AVX-512 BF16; torch CPU "
            f"capability {capability}): bf16 would be converted, not computed, so float32",
        )
    if capability not in _WIDE_CAPABILITIES:
        return AmpChoice(
            None,
            f"auto: the CPU has {', '.join(features)}, but torch runs at CPU capability "
            f"{capability} (ATEN_CPU_CAPABILITY?), which does not use it, so float32",
        )
    return AmpChoice(
        "bf16",
        f"auto: the CPU computes bf16 natively ({', '.join(features)}; torch CPU "
        f"capability {capability})",
    )
