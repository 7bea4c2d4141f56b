#!/usr/bin/env python
"""Seconds per training step of any config's model on its own training data, and the operators
that step spends its time in (torch.profiler), on the CPU.

    tools/profile_train_step.py --config-file configs/demo/rank_detr_r18_shapes.py
    tools/profile_train_step.py --config-file configs/demo/rank_detr_r18_shapes.py \\
        model.encoder_layers=2 dataloader.train.mapper.crop_probability=0.3   # the old demo

The batches are read before timing (the data path is not measured); the step is training's:
forward under the config's `train.amp` choice (`auto` resolved as training resolves it), the
sum of the losses, backward, gradient clipping to `train.clip_grad` and the optimizer: the
trainer's own run_step (rankdetr.engine.trainer.RankDETRTrainer). It prints the mean of `--steps`
timed steps after `--warmup` untimed ones, the ATen calls per step and the top operators by self
CPU time over `--profile-steps` more steps.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from detectron2.config import instantiate  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from rankdetr.engine.runner import build_model, load_config  # noqa: E402
from rankdetr.engine.trainer import RankDETRTrainer  # noqa: E402
from rankdetr.errors import report_user_errors  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="CFG")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--rows", type=int, default=25, help="operators listed (default 25)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return parser.parse_args(argv)


def make_trainer(cfg, model: torch.nn.Module, batches: list) -> RankDETRTrainer:
    """The trainer `tools/train_net.py` builds (autocast choice, clipping, non-finite check,
    optimizer), reading `batches` in order: each run_step() is one training step."""
    cfg.optimizer.params.model = model
    return RankDETRTrainer(
        model,
        batches,
        instantiate(cfg.optimizer),
        device_type="cpu",
        amp=cfg.train.amp.dtype if cfg.train.amp.enabled else None,
        clip_grad_params=cfg.train.clip_grad.params if cfg.train.clip_grad.enabled else None,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, [*args.opts, "train.device=cpu"])
    cfg.dataloader.train.num_workers = 0
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    count = args.warmup + args.steps + args.profile_steps
    batches = list(itertools.islice(iter(instantiate(cfg.dataloader.train)), count))
    trainer = make_trainer(cfg, model, batches)
    with EventStorage(0):  # the trainer writes its metrics there
        for _ in range(args.warmup):
            trainer.run_step()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.run_step()
        seconds = (time.perf_counter() - start) / max(args.steps, 1)

    from torch.profiler import ProfilerActivity, profile

    with EventStorage(0), profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.profile_steps):
            trainer.run_step()
    events = profiler.key_averages()
    calls = sum(e.count for e in events if e.key.startswith("aten::")) / args.profile_steps
    print(f"config: {args.config_file} {' '.join(args.opts)}")
    amp = trainer.amp_choice
    print(f"precision: {amp.dtype or 'float32'} ({amp.reason}); threads: {torch.get_num_threads()}")
    print(f"seconds per step: {seconds:.4f} (mean of {args.steps} after {args.warmup} warm-up)")
    print(f"ATen calls per step (nested included): {calls:.0f}")
    print(
        events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48)
    )
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
