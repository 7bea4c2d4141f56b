"""The CUDA kernels compile (FORCE_CUDA=1, Hopper) even on a machine without a GPU.

This keeps a kernel that does not build from ever landing: CI machines have the CUDA toolkit but
no GPU. The build goes to build/cuda-check (ninja makes a rerun incremental) and never replaces
the installed extension; the result is loaded in a separate process to check that its CUDA
kernels are registered.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cuda-check"


def nvcc_path():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_major(nvcc: str) -> int | None:
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.", output)
    return int(match.group(1)) if match else None


def skip_reason() -> str | None:
    if os.environ.get("RANKDETR_SKIP_CUDA_BUILD") == "1":
        return "RANKDETR_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    nvcc = nvcc_path()
    if nvcc is None:
        return "no CUDA toolkit (nvcc) on this machine"
    if nvcc_major(nvcc) != int(torch.version.cuda.split(".")[0]):
        return f"nvcc's CUDA major version differs from torch's ({torch.version.cuda})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
def test_cuda_extension_compiles_for_hopper_without_a_gpu():
    env = {**os.environ, "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext"]
        + ["--build-temp", str(BUILD / "temp"), "--build-lib", str(BUILD / "lib")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-8000:]
    libraries = list((BUILD / "lib" / "rankdetr").glob("_C*.so"))
    assert len(libraries) == 1, libraries

    check = f"""
import torch
torch.ops.load_library({str(libraries[0])!r})
assert torch.ops.rankdetr.cuda_compiled()
for op in ("ms_deform_attn_forward", "ms_deform_attn_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("rankdetr::" + op, key), (op, key)
print("ok")
"""
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert loaded.stdout.strip() == "ok"
