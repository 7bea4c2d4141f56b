#!/usr/bin/env python
"""Seconds per training step and per inference of Rank-DETR R50 two-stage on a fixed CPU input.

The input: batch 2, images 320x320 and 288x320 with 2 boxes each, 300 one-to-one + 1500
one-to-many queries, all four rank components on. Rows: rankdetr as built (compiled
MSDeformAttn), and the same model with the pure-PyTorch MSDeformAttn as the in-process baseline.
`--profile` adds the top operators of one training step (torch.profiler). `--amp bf16` adds
rankdetr under CPU bf16 autocast, with how far its losses and detection scores are from float32
on the same batch and weights. `--dino` adds DINO R50 (900 queries, contrastive denoising with
dn_number 100) and Rank-DINO (all four components) rows on the same batch, beside the H-DETR-based
model.

    .venv/bin/python tools/benchmark_train_step.py --repeats 3 --profile
    .venv/bin/python tools/benchmark_train_step.py --amp bf16 --skip-baseline
    .venv/bin/python tools/benchmark_train_step.py --dino --skip-baseline
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from functools import partial

import torch
from detectron2.structures import Boxes, Instances
from tabulate import tabulate
from tqdm import tqdm

import rankdetr.layers.multi_scale_deform_attn as msda_module
from rankdetr.layers.ms_deform_attn_op import ms_deform_attn_reference
from rankdetr.modeling.backbone import ResNetBackbone
from rankdetr.modeling.dino import DINO
from rankdetr.modeling.neck import ChannelMapper
from rankdetr.modeling.rank_detr import RankDETR
from rankdetr.modeling.rank_options import RankOptions


def build_model(kind: type = RankDETR, **kwargs) -> RankDETR | DINO:
    """R50 with 80 classes: Rank-DETR (H-DETR base, 300 + 1500 queries) or DINO (900 queries)."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=50)
    neck = ChannelMapper(in_channels=backbone.out_channels, out_channels=256, num_extra_levels=1)
    return kind(backbone=backbone, neck=neck, num_classes=80, **kwargs)


def fixed_batch() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    inputs = []
    for h, w in [(320, 320), (288, 320)]:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(
            torch.tensor([[20.0, 30.0, 150.0, 200.0], [160.0, 40.0, 300.0, 250.0]])
        )
        instances.gt_classes = torch.tensor([3, 17])
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        inputs.append({"image": image, "instances": instances, "height": h, "width": w})
    return inputs


@contextmanager
def reference_op(enabled: bool):
    """Swap the pure-PyTorch MSDeformAttn into the attention module (the baseline row)."""
    original = msda_module.ms_deform_attn
    if enabled:
        msda_module.ms_deform_attn = ms_deform_attn_reference
    try:
        yield
    finally:
        msda_module.ms_deform_attn = original


def train_step(model, optimizer, batch, amp: torch.dtype | None = None) -> None:
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()


def time_it(fn, repeats: int, desc: str) -> float:
    fn()  # warm-up
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true", help="print the top ops of a step")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--amp", choices=["bf16"], default=None, help="add a CPU autocast row")
    parser.add_argument(
        "--compile", action="store_true", help="add a row with torch.compile'd transformer layers"
    )
    parser.add_argument("--dino", action="store_true", help="add DINO and Rank-DINO R50 rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = fixed_batch()

    amp = torch.bfloat16 if args.amp == "bf16" else None
    if amp is not None:
        print_autocast_differences(model, batch, amp)

    def train(amp=None, model=model, optimizer=optimizer):
        model.train()
        train_step(model, optimizer, batch, amp)

    def infer(amp=None, model=model):
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=bool(amp)):
            model(batch)

    variants = [("rankdetr", False, None)]
    if amp is not None:
        variants.append((f"rankdetr, {args.amp} autocast", False, amp))
    if not args.skip_baseline:
        variants.append(("pure-PyTorch MSDeformAttn", True, None))
    if args.compile:  # last: compiling changes the model for good
        variants.append(("rankdetr, compiled layers", False, None))
    rows = []
    for name, use_reference, variant_amp in variants:
        if name.endswith("compiled layers"):
            model.compile_layers()
            start = time.perf_counter()
            train(None)  # the first steps compile (timed separately below)
            infer(None)
            print(f"compiling the layers took {time.perf_counter() - start:.0f} s")
        with reference_op(use_reference):
            train_s = time_it(partial(train, variant_amp), args.repeats, f"{name} train")
            infer_s = time_it(partial(infer, variant_amp), args.repeats, f"{name} infer")
        rows.append((name, train_s, infer_s))
    if args.dino:
        for name, rank in (("DINO R50, 900 queries + denoising", None),
                           ("Rank-DINO R50 (RCH, QRL, GCL, HMC)", RankOptions())):  # fmt: skip
            dino = build_model(DINO, rank=rank)
            dino_optimizer = torch.optim.AdamW(
                [p for p in dino.parameters() if p.requires_grad], lr=1e-4
            )
            train_fn = partial(train, None, model=dino, optimizer=dino_optimizer)
            train_s = time_it(train_fn, args.repeats, f"{name} train")
            infer_s = time_it(partial(infer, None, model=dino), args.repeats, f"{name} infer")
            rows.append((name, train_s, infer_s))

    print(
        f"\nR50 two-stage, 300+1500 queries (DINO: 900 + denoising), batch 2 (320x320, 288x320), "
        f"CPU, {args.threads} threads."
    )
    baseline = [row for row in rows if row[0].startswith("pure-PyTorch")] or rows[:1]
    base_train, base_infer = baseline[0][1], baseline[0][2]
    headers = ("variant", "train step (s)", "inference (s)", "train vs baseline",
               "infer vs baseline")  # fmt: skip
    cells = [
        (name, f"{train_s:.2f}", f"{infer_s:.2f}", f"{base_train / train_s:.2f}x",
         f"{base_infer / infer_s:.2f}x")
        for name, train_s, infer_s in rows
    ]  # fmt: skip
    print(tabulate(cells, headers, tablefmt="github", disable_numparse=True))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        train()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train()
        print("\nTop operators of one training step (self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def print_autocast_differences(model, batch, amp: torch.dtype) -> None:
    """Losses and detection scores under autocast against float32, same weights and batch."""
    results = {}
    for name, dtype in (("fp32", None), ("amp", amp)):
        with (
            torch.no_grad(),
            torch.autocast("cpu", dtype=dtype or torch.float32, enabled=bool(dtype)),
        ):
            model.train()
            losses = {k: v.item() for k, v in model(batch).items()}
            model.eval()
            scores = [r["instances"].scores.sort(descending=True).values for r in model(batch)]
        results[name] = losses, scores
    (losses32, scores32), (losses_amp, scores_amp) = results["fp32"], results["amp"]
    total32, total_amp = sum(losses32.values()), sum(losses_amp.values())
    term = max(losses32, key=lambda k: abs(losses_amp[k] - losses32[k]) / abs(losses32[k]))
    score_error = max((a - b).abs().max().item() for a, b in zip(scores32, scores_amp))
    print(
        f"\n{amp} autocast vs float32: total loss {total_amp:.4f} vs {total32:.4f} "
        f"({abs(total_amp - total32) / total32:.2%}); largest term difference {term} "
        f"{losses_amp[term]:.4f} vs {losses32[term]:.4f}; sorted detection scores differ by at "
        f"most {score_error:.4f}"
    )


if __name__ == "__main__":
    main()
