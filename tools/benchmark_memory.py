#!/usr/bin/env python
"""Peak memory (RSS) and time of one CPU training step, with and without activation checkpointing.

The R50 model config (300 + 1500 queries, 80 classes; or `--config-file`'s model) trains one step
on a batch of random images (default two at 800x1333, two boxes each). Each variant runs in its
own process, because a peak RSS can only grow: the parent prints one table, with the ratio
against the plain run.

    .venv/bin/python tools/benchmark_memory.py                     # 800x1333, both variants
    .venv/bin/python tools/benchmark_memory.py --image-size 480 640
    .venv/bin/python tools/benchmark_memory.py \
        --config-file configs/rank_detr/rank_detr_swin_t_12ep.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "rank_detr" / "rank_detr_r50_12ep.py"


def one_step(config: str, checkpointing: bool, height: int, width: int, batch: int) -> dict:
    """Build the config's model, run one training step, return peak RSS (GB) and seconds."""
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import Boxes, Instances

    cfg = LazyConfig.load(config)
    cfg.model.num_classes = 80
    cfg.model.activation_checkpointing = checkpointing
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(
            torch.tensor([[40.0, 50.0, 300.0, 400.0], [350.0, 80.0, 700.0, 600.0]])
        )
        instances.gt_classes = torch.tensor([3, 17])
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        inputs.append({"image": image, "instances": instances})
    start = time.perf_counter()
    losses = model(inputs)
    sum(losses.values()).backward()
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_rss_gb": peak_kb / 1024**2, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(CONFIG), metavar="CFG",
                        help="the model to measure (default: the R50 config)")  # fmt: skip
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--child", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not Path(args.config_file).is_file():
        parser.error(f"--config-file {args.config_file}: no such file")
    height, width = args.image_size
    if args.child:
        result = one_step(
            args.config_file, args.child == "checkpointing", height, width, args.batch
        )
        print("RESULT " + json.dumps(result))
        return
    rows = {}
    for variant in ("plain", "checkpointing"):
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        output = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--config-file", args.config_file,
             "--image-size", str(height), str(width), "--batch", str(args.batch)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        rows[variant] = json.loads(output.split("RESULT ", 1)[1])
    plain = rows["plain"]
    model = Path(args.config_file).name
    print(
        f"\n{model}, training step, batch {args.batch} of {height}x{width}, CPU (one process each)"
    )
    print()
    headers = ("activation checkpointing", "peak RSS (GB)", "step (s)", "RSS vs plain",
               "time vs plain")  # fmt: skip
    cells = [
        ("on" if variant == "checkpointing" else "off", f"{row['peak_rss_gb']:.2f}",
         f"{row['seconds']:.1f}", f"{row['peak_rss_gb'] / plain['peak_rss_gb']:.2f}x",
         f"{row['seconds'] / plain['seconds']:.2f}x")
        for variant, row in rows.items()
    ]  # fmt: skip
    print(tabulate(cells, headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
