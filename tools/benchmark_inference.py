#!/usr/bin/env python
"""Inference speed on the CPU: PyTorch eager against ONNX Runtime, one table.

Each model is built from its config (the initial weights of seed 0: speed does not depend on
them), exported with rankdetr's ONNX exporter (or read from `--onnx NAME=FILE`, a file exported
from the same weights), and run on the same random
image, batch 1, by PyTorch (eager, the compiled deformable-attention op) and by ONNX Runtime
(CPU execution provider, its graph optimisations on, as by default). The two run interleaved
(eager, ORT, eager, ...) so that a slower spell of the machine hits both; the table gives the
median and the fastest latency, images per second from the median, the ratio against eager, and
the largest score difference between the two as a sanity check.

    .venv/bin/python tools/benchmark_inference.py                      # demo and R50, 2 threads
    .venv/bin/python tools/benchmark_inference.py --models demo --repeats 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (config, overrides, default (H, W)): the demo at its test size, R50 at COCO's.
MODELS = {
    "demo": ("configs/demo/rank_detr_r18_shapes.py", ["model.num_classes=5"], (160, 160)),
    "r50": ("configs/rank_detr/rank_detr_r50_12ep.py", ["model.num_classes=80"], (800, 1333)),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="for every model (default: each model's own)")  # fmt: skip
    parser.add_argument("--onnx", action="append", default=[], metavar="NAME=FILE",
                        help="an exported file for model NAME (else it is exported)")  # fmt: skip
    return parser.parse_args(argv)


def build_model(name: str):
    import torch

    from rankdetr.engine.runner import build_model as build
    from rankdetr.engine.runner import load_config

    config, overrides, _ = MODELS[name]
    cfg = load_config(str(ROOT / config), [*overrides, "train.device=cpu"])
    torch.manual_seed(0)  # the same initial weights as a file exported earlier by this tool
    return build(cfg).eval()


def time_backends(model, session, image, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of eager PyTorch and of the ORT session on `image` (1, 3, H, W),
    interleaved, after one untimed warm-up run of each."""
    import torch

    inputs = [{"image": image[0]}]
    feed = {"image": image.numpy()}
    times = {"eager": [], "onnxruntime": []}
    with torch.no_grad():
        for run in range(repeats + 1):
            start = time.perf_counter()
            eager = model(inputs)
            middle = time.perf_counter()
            ort_scores = session.run(["scores"], feed)[0]
            end = time.perf_counter()
            if run:  # the first run of each warms up (allocations, ORT's arena)
                times["eager"].append(middle - start)
                times["onnxruntime"].append(end - middle)
    eager_scores = eager[0]["instances"].scores.numpy()
    times["score_difference"] = float(abs(eager_scores - ort_scores[0]).max())
    return times


def rows_of(name: str, size: tuple[int, int], times: dict) -> list[list]:
    eager = statistics.median(times["eager"])
    rows = []
    for backend in ("eager", "onnxruntime"):
        median = statistics.median(times[backend])
        rows.append([name, f"{size[0]}x{size[1]}", backend, 1000 * median,
                     1000 * min(times[backend]), 1 / median, eager / median,
                     times["score_difference"] if backend == "onnxruntime" else None])  # fmt: skip
    return rows


def benchmark(name: str, args, onnx_files: dict[str, str], workdir: Path) -> list[list]:
    import torch

    from rankdetr.export.onnx import export_onnx, onnx_session

    model = build_model(name)
    size = tuple(args.image_size or MODELS[name][2])
    path = onnx_files.get(name)
    if path is None:
        path = workdir / f"{name}.onnx"
        print(f"[{name}] exporting to {path} ...", flush=True)
        result = export_onnx(model, path)
        print(f"[{name}] exported in {result.seconds:.0f} s", flush=True)
    session = onnx_session(path, threads=args.threads)
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    print(f"[{name}] timing {args.repeats} runs per backend at {size[0]}x{size[1]} ...", flush=True)
    return rows_of(name, size, time_backends(model, session, image, args.repeats))


def main(args: argparse.Namespace) -> None:
    import torch
    from tabulate import tabulate

    from rankdetr.export.onnx import require_onnx_packages

    require_onnx_packages()
    torch.set_num_threads(args.threads)
    onnx_files = dict(item.split("=", 1) for item in args.onnx)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rankdetr-bench-") as workdir:
        for name in args.models:
            rows += benchmark(name, args, onnx_files, Path(workdir))
    headers = ["model", "H x W", "backend", "median ms", "min ms", "images/s", "x eager",
               "max |Δ score|"]  # fmt: skip
    print(f"\nbatch 1, {args.threads} threads, {args.repeats} runs each (interleaved), "
          f"torch {torch.__version__}")  # fmt: skip
    formats = ("", "", "", ".1f", ".1f", ".2f", ".2f", ".1e")
    print(tabulate(rows, headers, tablefmt="github", floatfmt=formats, missingval=""))


if __name__ == "__main__":
    from rankdetr.errors import report_user_errors

    sys.exit(report_user_errors(main, parse_args()))
