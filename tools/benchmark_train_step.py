#!/usr/bin/env python
"""Seconds per training step and per inference of Rank-DETR R50 two-stage on a fixed CPU input.

The input: batch 2, images 320x320 and 288x320 with 2 boxes each, 300 one-to-one + 1500
one-to-many queries, all four rank components on. Rows: rankdetr as built (compiled
MSDeformAttn), and the same model with the pure-PyTorch MSDeformAttn as the in-process baseline.
`--profile` adds the top operators of one training step (torch.profiler). `--amp bf16` adds
rankdetr under CPU bf16 autocast, with how far its losses and detection scores are from float32
on the same batch and weights. `--dino` adds DINO R50 (900 queries, contrastive denoising with
dn_number 100) and Rank-DINO (all four components) rows on the same batch, beside the H-DETR-based
model. `--release-path` puts the original release (LeapLabTHU/Rank-DETR, a detrex tree) beside
rankdetr in one process: the release's R50 two-stage model, its weights copied into ours by the
converter, the same batch and threads, their losses compared, then training steps and
inferences timed interleaved (ours, release, ours, ...) so that machine load hits both alike.

    .venv/bin/python tools/benchmark_train_step.py --repeats 3 --profile
    .venv/bin/python tools/benchmark_train_step.py --amp bf16 --skip-baseline
    .venv/bin/python tools/benchmark_train_step.py --dino --skip-baseline
    .venv/bin/python tools/benchmark_train_step.py --release-path /tmp/release \
        --release-deps /tmp/release_deps --threads 2 --repeats 5 --amp bf16 --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path

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

# The original release's model config (--release-path), and how far the one-to-one loss terms of
# the two may differ on the same weights: float32 rounding (seen: 2e-7).
RELEASE_CONFIG = "projects/rank_detr/configs/models/rank_detr_r50.py"
LOSS_RTOL = 1e-4

# The benchmark's sizes, and tiny ones for a quick run (tests): ResNet depth, one-to-one and
# one-to-many queries, image sizes (h, w).
SIZES = {
    "r50": {"depth": 50, "queries": (300, 1500), "images": ((320, 320), (288, 320))},
    "tiny": {"depth": 18, "queries": (20, 60), "images": ((96, 96), (80, 96))},
}


def build_model(kind: type = RankDETR, depth: int = 50, **kwargs) -> RankDETR | DINO:
    """80 classes: Rank-DETR (H-DETR base, 300 + 1500 queries) or DINO (900 queries); R50."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=depth)
    neck = ChannelMapper(in_channels=backbone.out_channels, out_channels=256, num_extra_levels=1)
    return kind(backbone=backbone, neck=neck, num_classes=80, **kwargs)


def adamw(model: torch.nn.Module, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, lr 1e-4. fused=True is what our configs train with
    (configs/common/optim.py: ~27 ms a step for R50's 393 tensors on 2 cores, ~90 ms as the
    default per-tensor loop); the release's train_net builds the default AdamW (fused=False)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=fused)


def fixed_batch(sizes=SIZES["r50"]["images"]) -> list[dict]:
    """Two uint8 RGB images of the given (h, w) with the same two boxes (absolute xyxy)."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for h, w in sizes:
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


def train_step(model, optimizer, batch, amp: torch.dtype | None = None) -> float:
    """Forward, weighted losses, backward, clipping at 0.1 and the optimizer step (AdamW,
    :func:`adamw`); returns the total loss."""
    model.train()
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    return total.item()


def inference(model, batch, amp: torch.dtype | None = None) -> None:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=bool(amp)):
        model(batch)


def time_it(fn, repeats: int, desc: str) -> float:
    fn()  # warm-up
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(jobs: dict, repeats: int) -> dict[object, list[float]]:
    """Seconds of each run of each job, run in turn (A, B, A, B, ...) after one warm-up each, so
    that a change of machine load during the run affects every job alike."""
    for fn in jobs.values():
        fn()
    times = {key: [] for key in jobs}
    for _ in tqdm(range(repeats), desc="interleaved", leave=False):
        for key, fn in jobs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--release-path", type=Path, default=None,
        help="the original release's tree: time it beside rankdetr on the same weights "
        "(with --amp and --compile rows; --profile, --dino and the op baseline are not run)",
    )  # fmt: skip
    parser.add_argument(
        "--release-deps", type=Path, default=None,
        help="a pip --target folder with the release's extra packages (fairscale, einops)",
    )  # fmt: skip
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="r50", help="tiny: R18, 20+60 queries (tests)"
    )
    args = parser.parse_args(argv)
    if args.release_path is not None and not (args.release_path / RELEASE_CONFIG).is_file():
        parser.error(f"--release-path {args.release_path}: no {RELEASE_CONFIG} there")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SIZES[args.size]
    num_queries, num_one2many = sizes["queries"]
    model = build_model(
        depth=sizes["depth"], num_queries=num_queries, num_queries_one2many=num_one2many
    )
    optimizer = adamw(model)
    batch = fixed_batch(sizes["images"])
    amp = torch.bfloat16 if args.amp == "bf16" else None
    if args.release_path is not None:
        compare_with_release(args, model, batch, amp)
        return
    if amp is not None:
        print_autocast_differences(model, batch, amp)

    def train(amp=None, model=model, optimizer=optimizer):
        train_step(model, optimizer, batch, amp)

    def infer(amp=None, model=model):
        inference(model, batch, amp)

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
            dino_optimizer = adamw(dino)
            train_fn = partial(train, None, model=dino, optimizer=dino_optimizer)
            train_s = time_it(train_fn, args.repeats, f"{name} train")
            infer_s = time_it(partial(infer, None, model=dino), args.repeats, f"{name} infer")
            rows.append((name, train_s, infer_s))

    images = ", ".join(f"{h}x{w}" for h, w in sizes["images"])
    dino_rows = " (DINO: 900 + denoising)" if args.dino else ""
    print(
        f"\n{args.size.upper()} two-stage, {num_queries}+{num_one2many} queries{dino_rows}, "
        f"batch 2 ({images}), CPU, {args.threads} threads; our AdamW fused "
        f"(configs/common/optim.py)."
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


# The original release, side by side (--release-path): read and imported at run time only.


def import_release(release_path: Path, deps_path: Path | None) -> None:
    """Make the release's `detrex` and `projects` importable without what a CPU run never uses.

    `detrex/__init__` imports its data, config and logging packages too (wandb, detectron2's
    point_rend, pkg_resources); an empty package object pointing at the folder imports only the
    modules the model needs. An empty `detrex._C` stands in for the unbuilt CUDA extension: on
    CPU the release's MSDeformAttn runs its pure-PyTorch path and never calls it. `deps_path`
    (fairscale, einops, installed with pip --target) goes last on sys.path, so that it never
    shadows this environment's packages.
    """
    sys.path.insert(0, str(release_path))
    if deps_path is not None:
        sys.path.append(str(deps_path))
    package = types.ModuleType("detrex")
    package.__path__ = [str(release_path / "detrex")]
    sys.modules.setdefault("detrex", package)
    sys.modules.setdefault("detrex._C", types.ModuleType("detrex._C"))
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # detrex's logging only


def build_release_model(release_path: Path, size: str) -> torch.nn.Module:
    """The release's model as its `rank_detr_r50_two_stage_12ep.py` builds it (the model config
    with box refinement and two-stage on: RCH, QRL, GCL, HMC, 80 classes), at our `SIZES`."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.layers import ShapeSpec

    cfg = LazyConfig.load(str(release_path / RELEASE_CONFIG))
    cfg.model.update(device="cpu", with_box_refine=True, as_two_stage=True)
    sizes = SIZES[size]
    cfg.model.backbone.stages.depth = sizes["depth"]
    if sizes["depth"] < 50:  # BasicBlock stages: 128, 256, 512 channels out of res3..res5
        del cfg.model.backbone.stages.stride_in_1x1
        cfg.model.neck.input_shapes = {
            f"res{i}": ShapeSpec(channels=64 * 2 ** (i - 2)) for i in (3, 4, 5)
        }
    num_queries, num_one2many = sizes["queries"]
    cfg.model.update(num_queries_one2one=num_queries, num_queries_one2many=num_one2many)
    cfg.model.transformer.two_stage_num_proposals = num_queries + num_one2many
    torch.manual_seed(0)
    return instantiate(cfg.model)


def randomize_zero_parameters(model: torch.nn.Module) -> None:
    """Small random values in the parameters initialised to zero (last box-head layers, RCH
    biases, attention-weight projections), as after training. At zero every decoder layer
    predicts the proposals' boxes unchanged, and the matcher then meets exact ties that float32
    rounding breaks either way."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.count_nonzero() == 0:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


def unpadded_batch(batch: list[dict]) -> list[dict]:
    """The batch with every image at the first one's size (no padding), for the loss check.

    The release selects padded positions as two-stage proposals; such proposals are identical,
    so their queries tie exactly, and which of them the query rank layer puts first is decided by
    the rounding of the release's matrix products, which depends on a query's row (seen on an
    AVX2-only AMD EPYC: equal queries 0.0584316738 and 0.0584316999 after its sigmoid). Ours
    ranks ties by index; from the first swapped pair on the later layers' terms part (6e-4 at
    the last layer there, 2e-7 with the padding gone)."""
    h, w = batch[0]["height"], batch[0]["width"]
    return fixed_batch([(h, w)] * len(batch))


def check_same_losses(model, release, batch) -> None:
    """Both models' losses on the same weights and batch, before any step: every one-to-one term
    (last layer, auxiliary layers, encoder proposals) must agree to LOSS_RTOL. Give it an
    unpadded batch (:func:`unpadded_batch`).

    The one-to-many terms are printed, not checked: sorting 1500 queries by near-equal scores
    (QRL) and matching them to targets repeated 6 times turn on float32 rounding (our model alone
    differs by up to ~1e-2 in them between float32 and float64)."""
    with torch.no_grad():
        ours = {k: v.item() for k, v in model.train()(batch).items()}
        theirs = {k: v.item() for k, v in release.train()(batch).items()}
    theirs = {
        "o2m_" + k.removesuffix("_one2many") if k.endswith("_one2many") else k: v
        for k, v in theirs.items()
    }
    assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
    one2one = [k for k in ours if not k.startswith("o2m_")]
    worst = max(one2one, key=lambda k: abs(ours[k] - theirs[k]) / abs(theirs[k]))
    worst_difference = abs(ours[worst] - theirs[worst]) / abs(theirs[worst])
    totals = [sum(losses[k] for k in keys) for losses in (ours, theirs)
              for keys in (one2one, [k for k in ours if k.startswith("o2m_")])]  # fmt: skip
    print(
        f"\nlosses on the same weights and batch: one-to-one terms rankdetr {totals[0]:.6f}, "
        f"release {totals[2]:.6f} (largest relative difference of a term: {worst_difference:.1e}, "
        f"{worst}); one-to-many terms {totals[1]:.6f} vs {totals[3]:.6f}"
    )
    if not worst_difference < LOSS_RTOL:
        raise SystemExit(f"{worst} differs by more than {LOSS_RTOL:g}: not the same computation")


def compare_with_release(args, model, batch, amp: torch.dtype | None) -> None:
    """Ours and the release's on the same weights and batch: their losses, then
    training steps and inferences timed interleaved; `amp` adds rankdetr under autocast."""
    from rankdetr.checkpoint import convert_release_state_dict

    import_release(args.release_path, args.release_deps)
    release = build_release_model(args.release_path, args.size)
    randomize_zero_parameters(release)
    result = model.load_state_dict(convert_release_state_dict(release.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    models = {"rankdetr": model, "original release": release}
    optimizers = {"rankdetr": adamw(model), "original release": adamw(release, fused=False)}
    check_same_losses(model, release, unpadded_batch(batch))
    variants = [(name, m, optimizers[name], None) for name, m in models.items()]
    if amp is not None:
        print_autocast_differences(model, batch, amp)
        variants.insert(1, (f"rankdetr, {args.amp} autocast", model, optimizers["rankdetr"], amp))
    if args.compile:  # a copy, as compiling changes a model for good; compiled in the warm-up
        compiled = copy.deepcopy(model)
        compiled.compile_layers()
        compiled_optimizer = adamw(compiled)
        variants.insert(1, ("rankdetr, compiled layers", compiled, compiled_optimizer, None))
    jobs = {}
    for name, m, optimizer, variant_amp in variants:
        jobs[name, "train"] = partial(train_step, m, optimizer, batch, variant_amp)
        jobs[name, "infer"] = partial(inference, m, batch, variant_amp)
    times = time_interleaved(jobs, args.repeats)

    def seconds(name, kind):
        values = times[name, kind]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    def ratio(name, kind):  # of each run to the release's run beside it
        pairs = zip(times[name, kind], times["original release", kind])
        return f"{statistics.median(ours / theirs for ours, theirs in pairs):.2f}x"

    cells = [
        (name, seconds(name, "train"), seconds(name, "infer"), ratio(name, "train"),
         ratio(name, "infer"))
        for name, *_ in variants
    ]  # fmt: skip
    num_queries, num_one2many = SIZES[args.size]["queries"]
    images = ", ".join(f"{h}x{w}" for h, w in SIZES[args.size]["images"])
    print(
        f"\n{args.size.upper()} two-stage, {num_queries}+{num_one2many} queries, batch 2 "
        f"({images}), CPU, {torch.get_num_threads()} threads; seconds: median (range) of "
        f"{args.repeats} interleaved repeats; ratios: median of each run's to the release's "
        f"run beside it. AdamW: ours fused (our configs), the release's default (its train_net)."
    )
    headers = ("model", "train step (s)", "inference (s)", "train / release", "infer / release")
    print(tabulate(cells, headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
