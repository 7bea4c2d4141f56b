#!/usr/bin/env python
"""Parameters, GFLOPs and inference FPS of a LazyConfig's model (the paper's Table 6).

    .venv/bin/python tools/model_stats.py --config-file configs/rank_detr/rank_detr_r50_12ep.py
    .venv/bin/python tools/model_stats.py --config-file configs/demo/rank_detr_r18_shapes.py \\
        --image-size 160 224 --device cpu --repeats 5

Columns:

* params: the parameters inference uses. The per-query tables (content query embeddings, RCH
  class biases, QRL rank embeddings) have rows for the one-to-one and the one-to-many queries;
  only the one-to-one rows are used at inference, so only they are counted (Rank-DETR R50:
  49.06 M, the paper 49.10 M). The next column counts every parameter.
* GFLOPs: fvcore's count (one multiply-add = one flop, as in the DETR papers) of the network on
  one random image of `--image-size` (default 800x1333, fed as is, without the test resize), from
  the normalised image to the last decoder layer's logits and boxes. Elementwise ops, sorting and
  top-k count zero, as fvcore does. Handles added here: rankdetr's deformable-attention op (see
  :func:`ms_deform_attn_macs`), scaled-dot-product attention and bilinear grid_sample (the op's
  pure-PyTorch fallback).
* FPS: 1 / the median time of `--repeats` full inferences (preprocessing, network, top-k
  postprocessing) of that image, batch 1, after `--warmup` untimed runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from tabulate import tabulate
from torch import nn

# The per-query tables of RankDETR: rows [num_queries:] serve only the one-to-many queries.
PER_QUERY_TABLES = ("query_embedding", "decoder.rank_class_bias", "decoder.rank_content_query")


def inference_parameter_count(model: nn.Module) -> int:
    """Parameters used at inference: all, except the per-query tables' rows beyond the
    one-to-one queries (a model without `num_queries` counts every parameter)."""
    num_queries = getattr(model, "num_queries", None)
    total = 0
    for name, parameter in model.named_parameters():
        if num_queries is not None and name.startswith(PER_QUERY_TABLES):
            total += parameter[:num_queries].numel()
        else:
            total += parameter.numel()
    return total


def ms_deform_attn_macs(value_shape, sampling_locations_shape) -> int:
    """Multiply-adds of multi-scale deformable attention.

    value (N, S, H, D), sampling_locations (N, Lq, H, L, P, 2): each of the N * Lq * H * L * P
    sampling points reads D channels bilinearly, 4 corner products per channel, and adds them
    to the output with its attention weight, 1 more per channel:

        MACs = 5 * N * Lq * H * L * P * D

    The per-point corner weights (a few ops per point, independent of D) are not counted.
    """
    n, _, heads, channels = value_shape
    _, queries, _, levels, points, _ = sampling_locations_shape
    return 5 * n * queries * heads * levels * points * channels


def ms_deform_attn_flop_handle(inputs, outputs) -> int:
    """fvcore handle of `rankdetr::ms_deform_attn_forward` (value, spatial_shapes,
    level_start_index, sampling_locations, attention_weights)."""
    return ms_deform_attn_macs(get_shape(inputs[0]), get_shape(inputs[3]))


def sdpa_flop_handle(inputs, outputs) -> int:
    """fvcore handle of `aten::scaled_dot_product_attention`: q (..., Lq, E), k (..., Lk, E),
    v (..., Lk, Ev) -> Q K^T (Lq * Lk * E MACs) and softmax(.) V (Lq * Lk * Ev) per batch entry."""
    q_shape, k_shape, v_shape = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q_shape[:-2])
    return batch * q_shape[-2] * k_shape[-2] * (q_shape[-1] + v_shape[-1])


def grid_sampler_flop_handle(inputs, outputs) -> int:
    """fvcore handle of 2-D `aten::grid_sampler`: 4 MACs per output value when bilinear (mode 0),
    none for nearest; output (N, C, H_out, W_out)."""
    mode = inputs[2].toIValue()
    return 4 * math.prod(get_shape(outputs[0])) if mode == 0 else 0


FLOP_HANDLES = {
    "rankdetr::ms_deform_attn_forward": ms_deform_attn_flop_handle,
    "aten::scaled_dot_product_attention": sdpa_flop_handle,
    "aten::grid_sampler": grid_sampler_flop_handle,
}


class NetworkForward(nn.Module):
    """RankDETR or DINO at inference as a traceable tensor function: (3, H, W) uint8 image -> the
    last decoder layer's logits (1, Q, K) and boxes (1, Q, 4), the queries inference uses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, padding_mask = self.model.preprocess_images([{"image": image}])
        outputs = self.model.predict(images.tensor, padding_mask)  # inference queries only
        return outputs["logits"][-1], outputs["boxes"][-1]


def count_flops(model: nn.Module, image: torch.Tensor) -> tuple[int, Counter]:
    """(MACs of one inference on `image` (3, H, W), Counter of the ops fvcore could not count)."""
    analysis = FlopCountAnalysis(NetworkForward(model).eval(), (image,))
    analysis.set_op_handle(**FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with torch.no_grad():
        return analysis.total(), analysis.unsupported_ops()


def measure_fps(model: nn.Module, image: torch.Tensor, warmup: int, repeats: int) -> float:
    """Images per second: 1 / median seconds of `repeats` full inferences after `warmup`."""
    inputs = [{"image": image}]

    def run() -> None:
        model(inputs)
        if image.device.type == "cuda":
            torch.cuda.synchronize(image.device)

    times = []
    with torch.no_grad():
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def random_image(height: int, width: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    return image.to(device)


def build(args) -> nn.Module:
    """The config's model on args.device, with the checkpoint's weights when one is given."""
    from rankdetr.engine.runner import build_model, load_config
    from rankdetr.predictor import load_checkpoint

    cfg = load_config(args.config_file, args.overrides)
    if "model" not in cfg:
        raise KeyError(f"config {args.config_file} has no 'model'")
    if "train" not in cfg:
        cfg.train = {}
    cfg.train.device = args.device
    model = build_model(cfg)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    return model.eval()


def format_table(rows: list[dict]) -> str:
    """A markdown table of the measured rows (what the README's tables hold)."""
    headers = ["model", "input", "params (M)", "all params (M)", "GFLOPs", "FPS", "device"]
    cells = [
        [row["model"], row["input"], f"{row['params'] / 1e6:.2f}",
         f"{row['all_params'] / 1e6:.2f}", f"{row['flops'] / 1e9:.2f}", f"{row['fps']:.2f}",
         row["device"]]
        for row in rows
    ]  # fmt: skip
    return tabulate(cells, headers, tablefmt="github", disable_numparse=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--checkpoint", help="weights to load (optional: the counts and the "
                        "speed do not depend on them)")  # fmt: skip
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                        help="network input size (default 800 1333)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (median)")
    parser.add_argument("--verbose", action="store_true", help="list the uncounted ops")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if min(args.image_size) < 32:
        parser.error(f"--image-size must be at least 32 x 32, got {args.image_size}")
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = build(args)
    except (KeyError, ValueError, OSError, RuntimeError) as error:
        print(f"model_stats: {error}", file=sys.stderr)
        return 1
    height, width = args.image_size
    image = random_image(height, width, model.device)
    flops, uncounted = count_flops(model, image)
    row = {
        "model": Path(args.config_file).stem,
        "input": f"{height}x{width}",
        "params": inference_parameter_count(model),
        "all_params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "fps": measure_fps(model, image, args.warmup, args.repeats),
        "device": str(image.device),
    }
    print(format_table([row]))
    if args.verbose and uncounted:
        print("ops counted as zero: " + ", ".join(f"{op} x{n}" for op, n in uncounted.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
