"""The checks of `tools/gpu_selftest.py`: is the compiled op right on this machine, how fast is it,
and does a real model train and infer here.

Each check returns rows (section, check, status, detail); status is "ok", "FAIL" or "skipped".
Correctness checks compare against float64 computations on the CPU (the pure-PyTorch reference
op, built on grid_sample); timing rows are always "ok" and carry their figures.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rankdetr._ext import extension_available, extension_has_cuda
from rankdetr.layers.ms_deform_attn_op import ms_deform_attn, ms_deform_attn_reference

__all__ = ["Row", "op_correctness", "op_gradcheck", "op_speed", "model_run", "run_all"]

ROOT = Path(__file__).resolve().parents[1]
# Shapes that exercise the edges: points off the maps, 1x1 levels, batch 1, D not a multiple of
# the vector width.
CASES = {
    "several levels": {"levels": [(5, 7), (3, 4), (2, 2), (1, 1)], "batch": 2, "channels": 32},
    "far outside": {"levels": [(3, 3), (2, 4)], "batch": 2, "channels": 8, "spread": 2.0},
    "1x1 levels": {"levels": [(1, 1), (1, 1)], "batch": 2, "channels": 16},
    "batch 1, D=5": {"levels": [(6, 3), (2, 5)], "batch": 1, "channels": 5},
}
# Relative to the largest |value| of the reference.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class Row:
    section: str
    check: str
    status: str
    detail: str = ""


def _inputs(levels, batch, channels, spread=0.2, queries=7, heads=2, points=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=g, dtype=torch.float64)
    shape = (batch, queries, heads, len(levels), points)
    locations = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    weights = torch.rand(*shape, generator=g, dtype=torch.float64)
    return value, shapes, starts, locations, weights


def _run(op, inputs, device, dtype, non_contiguous=False):
    value, shapes, starts, locations, weights = inputs
    floats = []
    for t in (value, locations, weights):
        t = t.to(device, dtype)
        if non_contiguous:  # same values, other strides
            t = t.transpose(0, 1).contiguous().transpose(0, 1)
        floats.append(t.requires_grad_())
    out = op(floats[0], shapes.to(device), starts.to(device), floats[1], floats[2])
    grad = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(device, dtype)
    grads = torch.autograd.grad(out, floats, grad)
    return [t.detach().double().cpu() for t in (out, *grads)]


def _dtypes(device: str) -> list[torch.dtype]:
    if device == "cpu":
        return [torch.float64, torch.float32]
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def op_correctness(device: str) -> list[Row]:
    """The compiled op (output and the three gradients) against the float64 reference."""
    rows = []
    for name, case in CASES.items():
        inputs = _inputs(**case)
        expected = _run(ms_deform_attn_reference, inputs, "cpu", torch.float64)
        for dtype in _dtypes(device):
            for non_contiguous in (False, True):
                got = _run(ms_deform_attn, inputs, device, dtype, non_contiguous)
                worst = max(
                    ((g - e).abs().max() / e.abs().max().clamp(min=1e-12)).item()
                    for g, e in zip(got, expected)
                )
                label = f"{name}, {str(dtype).removeprefix('torch.')}"
                label += ", non-contiguous" if non_contiguous else ""
                status = "ok" if worst <= TOLERANCES[dtype] else "FAIL"
                rows.append(Row(f"op on {device}", label, status, f"rel. error {worst:.1e}"))
    return rows


def op_gradcheck(device: str) -> list[Row]:
    inputs = _inputs([(3, 4), (2, 2)], batch=1, channels=3, queries=3)
    value, shapes, starts, locations, weights = (t.to(device) for t in inputs)
    args = (value.requires_grad_(), shapes, starts, locations.requires_grad_(),
            weights.requires_grad_())  # fmt: skip
    try:
        torch.autograd.gradcheck(ms_deform_attn, args, eps=1e-6, atol=1e-6, rtol=1e-4)
        return [Row(f"op on {device}", "gradcheck, float64", "ok")]
    except Exception as error:  # noqa: BLE001  (any failure is the finding)
        return [Row(f"op on {device}", "gradcheck, float64", "FAIL", str(error).splitlines()[0])]


def _median_seconds(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_speed(device: str, repeats: int = 5) -> list[Row]:
    """Decoder-size op (2 images of an 800x1333 pyramid, 1800 queries): ours against the
    reference, forward and forward + backward, and ours' backward / forward ratio."""
    levels = [(100, 167), (50, 84), (25, 42), (13, 21)]
    inputs = _inputs(levels, batch=2, channels=32, queries=1800, heads=8, points=4, spread=0.0)
    dtype = torch.float32
    timings = {
        name: _op_timings(op, inputs, device, dtype, repeats)
        for name, op in (("ours", ms_deform_attn), ("reference", ms_deform_attn_reference))
    }
    (fwd, both), (ref_fwd, ref_both) = timings["ours"], timings["reference"]
    section = f"op speed on {device}"
    return [
        Row(section, "forward, decoder size", "ok",
            f"{fwd * 1e3:.1f} ms (reference {ref_fwd * 1e3:.1f} ms, {ref_fwd / fwd:.1f}x)"),
        Row(section, "forward + backward", "ok",
            f"{both * 1e3:.1f} ms (reference {ref_both * 1e3:.1f} ms, {ref_both / both:.1f}x)"),
        Row(section, "backward / forward", "ok", f"{(both - fwd) / fwd:.2f}"),
    ]  # fmt: skip


def _op_timings(op, inputs, device: str, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """Median seconds of op's forward, and of forward + backward."""
    value, shapes, starts, locations, weights = (t.to(device) for t in inputs)
    value, locations, weights = (t.to(dtype).requires_grad_() for t in (value, locations, weights))
    args = (value, shapes, starts, locations, weights)

    def forward():
        with torch.no_grad():
            op(*args)

    def forward_backward():
        op(*args).sum().backward()

    return _median_seconds(forward, device, repeats), _median_seconds(
        forward_backward, device, repeats
    )


def model_run(device: str, config: str, size: tuple[int, int], iterations: int,
              amp: torch.dtype | None) -> list[Row]:  # fmt: skip
    """`iterations` training steps of a config on two random images of `size`: finite losses,
    seconds per iteration, peak memory; then inference frames per second."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import Boxes, Instances

    cfg = LazyConfig.load(str(ROOT / config))
    cfg.model.num_classes = 80
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    h, w = size
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        instances = Instances((h, w))
        corners = [[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]]
        instances.gt_boxes = Boxes(torch.tensor(corners))
        instances.gt_classes = torch.tensor([3, 17])
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": instances})
    name = f"{Path(config).stem}, {h}x{w}, {str(amp).removeprefix('torch.') if amp else 'fp32'}"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    finite, times = True, []
    for _ in range(iterations):
        start = time.perf_counter()
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            losses = model(batch)
        total = sum(losses.values())
        finite &= bool(torch.isfinite(total))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    memory = (f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
              if device == "cuda" else "")  # fmt: skip
    per_iteration = statistics.median(times[1:] or times)
    rows = [Row(f"train on {device}", name, "ok" if finite else "FAIL",
                f"{iterations} it, {per_iteration:.2f} s/it{memory}"
                + ("" if finite else ", non-finite loss"))]  # fmt: skip
    model.eval()
    with torch.no_grad():
        fps = 1.0 / _median_seconds(lambda: model(batch[:1]), device, 3)
    rows.append(Row(f"infer on {device}", name.rsplit(",", 1)[0], "ok", f"{fps:.2f} FPS"))
    return rows


def run_all(device: str, quick: bool = False) -> list[Row]:
    """Every check for `device`; what cannot run here is listed as skipped."""
    rows = []
    if not extension_available() or (device == "cuda" and not extension_has_cuda()):
        rows.append(Row(f"op on {device}", "compiled kernel", "FAIL", "rankdetr._C has none"))
        return rows
    rows += op_correctness(device) + op_gradcheck(device)
    if device == "cuda":
        rows += op_correctness_cuda_vs_cpu()
    rows += op_speed(device, repeats=2 if quick else 5)
    if device == "cuda":
        for amp in (None, torch.bfloat16):
            rows += model_run(device, "configs/rank_detr/rank_detr_r50_12ep.py", (800, 1333),
                              5 if quick else 30, amp)  # fmt: skip
    else:
        rows.append(Row("train on cpu", "R50 at 800x1333, 30 iterations", "skipped",
                        "needs a GPU; a demo-sized run instead"))  # fmt: skip
        rows += model_run(device, "configs/demo/rank_detr_r18_shapes.py", (160, 192),
                          2 if quick else 5, None)  # fmt: skip
    return rows


def op_correctness_cuda_vs_cpu() -> list[Row]:
    """The CUDA op against the CPU op in float32 (both compiled kernels)."""
    rows = []
    for name, case in CASES.items():
        inputs = _inputs(**case)
        cpu = _run(ms_deform_attn, inputs, "cpu", torch.float32)
        cuda = _run(ms_deform_attn, inputs, "cuda", torch.float32)
        worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                    for a, b in zip(cuda, cpu))  # fmt: skip
        status = "ok" if worst <= 1e-4 else "FAIL"
        rows.append(
            Row("op cuda vs cpu", f"{name}, float32", status, f"rel. difference {worst:.1e}")
        )
    return rows
