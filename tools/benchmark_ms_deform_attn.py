#!/usr/bin/env python
"""Time rankdetr's compiled MSDeformAttn against the pure-PyTorch grid_sample reference.

Prints a markdown table with the median forward and forward+backward times of both, in one
process and on the same inputs, for Deformable-DETR sizes of an 800x1333 image:

* encoder: N=2, levels (100,167), (50,84), (25,42), (13,21), Lq=S=22223, H=8, D=32, P=4;
* decoder: the same value, Lq=1800 queries.

Sampling locations look like the model's: each query has a reference point (its own pixel in the
encoder, a uniform random point in the decoder) plus offsets of a few pixels, so the memory access
pattern is realistic rather than uniformly random.

    python tools/benchmark_ms_deform_attn.py                       # CPU, and CUDA if present
    python tools/benchmark_ms_deform_attn.py --device cuda --repeats 20
    python tools/benchmark_ms_deform_attn.py --amp bf16 --sizes decoder   # the autocast contract

`--amp` adds a table for the op's precision contract under autocast: ours (half-precision value
and weights, float32 locations, computed in float32) against computing everything in half
precision (locations rounded too), each as time and error against float32 on float32 inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from tabulate import tabulate
from tqdm import tqdm

from rankdetr._ext import extension_available, extension_has_cuda
from rankdetr.layers.ms_deform_attn_op import ms_deform_attn, ms_deform_attn_reference

LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
BATCH, HEADS, CHANNELS, POINTS, DECODER_QUERIES = 2, 8, 32, 4, 1800
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Inputs:
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor

    def args(self, requires_grad: bool) -> tuple[torch.Tensor, ...]:
        floats = [self.value, self.sampling_locations, self.attention_weights]
        floats = [t.detach().requires_grad_(requires_grad) for t in floats]
        return floats[0], self.spatial_shapes, self.level_start_index, floats[1], floats[2]


def make_inputs(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> Inputs:
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    keys = int(sizes.sum())
    levels = len(LEVELS)
    if size == "encoder":
        # One query per key, referenced at its own pixel centre.
        centres = []
        for h, w in LEVELS:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        reference = torch.cat(centres).expand(BATCH, -1, -1)
    elif size == "decoder":
        reference = torch.rand(BATCH, DECODER_QUERIES, 2, generator=generator)
    else:
        raise ValueError(f"unknown size {size!r}")
    queries = reference.shape[1]
    # Offsets of ~2 pixels of each sampled level, like a trained sampling_offsets layer.
    pixel = 1.0 / shapes.flip(-1).to(torch.float32)  # (L, 2) as (1/w, 1/h)
    offsets = torch.randn(BATCH, queries, HEADS, levels, POINTS, 2, generator=generator) * 2.0
    locations = reference[:, :, None, None, None, :] + offsets * pixel[None, None, None, :, None]
    logits = torch.randn(BATCH, queries, HEADS, levels * POINTS, generator=generator)
    weights = logits.softmax(-1).view(BATCH, queries, HEADS, levels, POINTS)
    value = torch.randn(BATCH, keys, HEADS, CHANNELS, generator=generator)
    return Inputs(
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        locations.to(device, dtype),
        weights.to(device, dtype),
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, inputs: Inputs, backward: bool, repeats: int, warmup: int, device: str) -> float:
    """Median seconds of fn (and of backward through it when backward is True)."""
    grad = None
    times = []
    for step in range(warmup + repeats):
        args = inputs.args(requires_grad=backward)
        _sync(device)
        start = time.perf_counter()
        if backward:
            out = fn(*args)
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
        else:
            with torch.no_grad():
                out = fn(*args)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        del out, args
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        nargs="+",
        choices=["cpu", "cuda"],
        default=None,
        help="devices to time (default: cpu, plus cuda when available)",
    )
    parser.add_argument("--sizes", nargs="+", choices=["encoder", "decoder"], default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument(
        "--cuda-dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--amp", choices=["bf16", "fp16"], default=None, help="also print the autocast table"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    sizes = args.sizes or ["encoder", "decoder"]
    if not extension_available():
        raise SystemExit("rankdetr._C is not built: there is nothing to compare the reference to")
    if "cuda" in devices and not (torch.cuda.is_available() and extension_has_cuda()):
        raise SystemExit("--device cuda needs a GPU and rankdetr._C built with its CUDA kernel")

    configs = [
        (device, dtype_name, size)
        for device in devices
        for dtype_name in (["fp32"] if device == "cpu" else args.cuda_dtypes)
        for size in sizes
    ]
    implementations = {"ours": ms_deform_attn, "reference": ms_deform_attn_reference}
    results = {}
    progress = tqdm(total=len(configs) * 4, desc="benchmark", unit="case")
    for device, dtype_name, size in configs:
        inputs = make_inputs(size, device, DTYPES[dtype_name])
        for impl_name, fn in implementations.items():
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                progress.set_postfix_str(f"{device} {dtype_name} {size} {impl_name} {mode}")
                seconds = time_call(fn, inputs, backward, args.repeats, args.warmup, device)
                results[device, dtype_name, size, impl_name, mode] = seconds
                progress.update()
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
    progress.close()

    threads = torch.get_num_threads()
    print(
        f"\nMSDeformAttn, median of {args.repeats} runs after {args.warmup} warm-up, "
        f"torch {torch.__version__}, {threads} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else "")
    )
    print()
    headers = (
        "device",
        "dtype",
        "size",
        "fwd ours (ms)",
        "fwd ref (ms)",
        "fwd speed-up",
        "fwd+bwd ours (ms)",
        "fwd+bwd ref (ms)",
        "fwd+bwd speed-up",
        "ours bwd/fwd",
    )
    cells = []
    for device, dtype_name, size in configs:
        r = {
            key[3:]: value
            for key, value in results.items()
            if key[:3] == (device, dtype_name, size)
        }
        fwd, ref_fwd = r["ours", "fwd"], r["reference", "fwd"]
        both, ref_both = r["ours", "fwd+bwd"], r["reference", "fwd+bwd"]
        cells.append(
            (device, dtype_name, size, f"{fwd * 1e3:.2f}", f"{ref_fwd * 1e3:.2f}",
             f"{ref_fwd / fwd:.1f}x", f"{both * 1e3:.2f}", f"{ref_both * 1e3:.2f}",
             f"{ref_both / both:.1f}x", f"{(both - fwd) / fwd:.2f}")
        )  # fmt: skip
    print(_markdown_table(cells, headers, left_columns=3))
    if args.amp:
        print_autocast_table(args, devices, sizes)


def autocast_choice_rows(device: str, size: str, half: torch.dtype, repeats: int, warmup: int):
    """(variant, forward seconds, max abs error, error relative to max |output|) rows, the
    errors against the float32 op on float32 inputs."""
    inputs = make_inputs(size, device, torch.float32)
    exact = ms_deform_attn(*inputs.args(False))
    scale = exact.abs().max().item()
    rounded = Inputs(
        inputs.value.to(half),
        inputs.spatial_shapes,
        inputs.level_start_index,
        inputs.sampling_locations,
        inputs.attention_weights.to(half),
    )
    all_half = Inputs(
        rounded.value,
        inputs.spatial_shapes,
        inputs.level_start_index,
        inputs.sampling_locations.to(half),
        rounded.attention_weights,
    )

    def under_autocast(*args):
        with torch.autocast(device, dtype=half):
            return ms_deform_attn(*args)

    variants = [
        ("float32 inputs, float32 op", ms_deform_attn, inputs),
        ("autocast: half value/weights, fp32 locations, fp32 op (ours)", under_autocast, rounded),
        ("all half, locations rounded too (reference op)", ms_deform_attn_reference, all_half),
    ]
    rows = []
    for name, fn, variant_inputs in variants:
        with torch.no_grad():
            error = (fn(*variant_inputs.args(False)).float() - exact).abs().max().item()
        seconds = time_call(fn, variant_inputs, False, repeats, warmup, device)
        rows.append((name, seconds, error, error / scale))
    return rows


def print_autocast_table(args, devices, sizes) -> None:
    half = DTYPES[args.amp]
    print(f"\nPrecision under autocast ({args.amp}), forward, error against float32:\n")
    headers = ("device", "size", "variant", "fwd (ms)", "max abs error",
               "relative to max |output|")  # fmt: skip
    cells = []
    for device in devices:
        if device == "cpu" and half == torch.float16:
            continue  # CPU autocast is bf16
        for size in sizes:
            for name, seconds, error, relative in autocast_choice_rows(
                device, size, half, args.repeats, args.warmup
            ):
                cells.append((device, size, name, f"{seconds * 1e3:.2f}", f"{error:.2e}",
                              f"{relative:.2e}"))  # fmt: skip
    print(_markdown_table(cells, headers, left_columns=3))


def _markdown_table(cells: list, headers: tuple, left_columns: int) -> str:
    """Text columns left, measured numbers right (already formatted as strings)."""
    align = ["left"] * left_columns + ["right"] * (len(headers) - left_columns)
    return tabulate(cells, headers, tablefmt="github", colalign=align, disable_numparse=True)


if __name__ == "__main__":
    main()
