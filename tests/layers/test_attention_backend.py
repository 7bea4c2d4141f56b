"""Half-precision attention on the CPU also where ATen's capability is forced below AVX-512.

On a CPU with AMX, PyTorch's fused CPU attention fails in bf16 when `ATEN_CPU_CAPABILITY` is
`default` or `avx2` ("pack_vnni2 is only supported when avx512 is supported");
`rankdetr.layers.attention_backend` switches to the math kernel there. The subprocess forces the
capability and runs the demo model's training step and inference, and a Swin window attention,
under bf16 autocast. On a CPU without AMX the workaround is off and the same runs pass anyway.
"""

import os
import subprocess
import sys

import torch

from rankdetr.layers.attention_backend import (
    cpu_half_precision_attention_is_broken,
    working_attention_kernel,
)

SCRIPT = r"""
import torch
from detectron2.config import LazyConfig, instantiate
from rankdetr.layers.attention_backend import cpu_half_precision_attention_is_broken
from rankdetr.modeling.swin import WindowAttention
from tests.modeling.test_wiring import batch

assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
print("workaround on:", cpu_half_precision_attention_is_broken())
cfg = LazyConfig.load("configs/demo/rank_detr_r18_shapes.py")
cfg.model.num_classes = 5
model = instantiate(cfg.model)
with torch.autocast("cpu", dtype=torch.bfloat16):
    losses = model(batch())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        model(batch())
    windows = WindowAttention(64, 4, 7)(torch.randn(3, 49, 64), None)
assert all(torch.isfinite(v) for v in losses.values())
assert windows.shape == (3, 49, 64)
print("ok")
"""


def test_bf16_attention_runs_with_the_cpu_capability_forced_to_default(repo_root):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=repo_root, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert f"workaround on: {has_amx}" in run.stdout
    assert run.stdout.strip().endswith("ok")


def test_the_workaround_is_off_at_this_process_s_own_capability():
    """Without a forced capability (AVX-512 on a CPU with AMX) nothing changes."""
    if torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2"):
        assert not cpu_half_precision_attention_is_broken()
    query = torch.zeros(2, 3, dtype=torch.bfloat16)
    if not cpu_half_precision_attention_is_broken():
        assert type(working_attention_kernel(query)).__name__ == "nullcontext"
