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

`--phases` adds where a step goes by part of the model: the forward of each of the model's
top-level modules (backbone, neck, encoder, proposals, decoder, criterion, ...), the rest of the
forward, backward, the optimizer step and what is left (data, loss sum, clipping, metrics), in
milliseconds per step and in operators dispatched per step (nested calls not counted): the table
to start from when a step is bound by per-operator overhead rather than by arithmetic.

    tools/profile_train_step.py --config-file configs/demo/rank_detr_r18_shapes.py --phases
"""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument(
        "--phases", action="store_true", help="also time each part: modules, backward, optimizer"
    )
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


class _Phases:
    """Wall time and dispatched operators per part of a training step: the forward of each of the
    model's direct children, the loss's backward and the optimizer step, attributed to the
    innermost part running (a part called inside another counts for itself alone)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.seconds: dict[str, float] = {}
        self.operators: dict[str, int] = {}
        self.stack = ["step, rest"]
        self.last_switch: float | None = None
        self.model, self.optimizer = model, optimizer

    def _enter(self, name: str) -> None:
        now = time.perf_counter()
        self._charge(now)
        self.stack.append(name)

    def _leave(self) -> None:
        self._charge(time.perf_counter())
        self.stack.pop()

    def _charge(self, now: float) -> None:
        """Time since the last switch goes to the part running until now."""
        if self.last_switch is not None:
            name = self.stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last_switch
        self.last_switch = now

    def _wrap(self, name: str, function):
        def wrapped(*args, **kwargs):
            self._enter(name)
            try:
                return function(*args, **kwargs)
            finally:
                self._leave()

        return wrapped

    @contextlib.contextmanager
    def recording(self, count_operators: bool):
        """Within: every top-level module's forward, Tensor.backward and the optimizer's step are
        timed (and their operators counted); the model is as before afterwards."""
        from torch.utils._python_dispatch import TorchDispatchMode

        phases = self

        class CountOperators(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = phases.stack[-1]
                phases.operators[name] = phases.operators.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        # The model's own forward code (pre- and post-processing around its parts) is "forward,
        # rest"; the trainer's code around forward, backward and optimizer is "step, rest".
        modules = {"forward, rest": self.model, **dict(self.model.named_children())}
        own = {name: module.__dict__.get("forward") for name, module in modules.items()}
        backward, step = torch.Tensor.backward, self.optimizer.step
        own_step = self.optimizer.__dict__.get("step")
        try:
            for name, module in modules.items():
                module.forward = self._wrap(name, module.forward)
            torch.Tensor.backward = self._wrap("backward", backward)
            self.optimizer.step = self._wrap("optimizer", step)
            self.last_switch = time.perf_counter()
            with CountOperators() if count_operators else contextlib.nullcontext():
                yield self
            self._charge(time.perf_counter())
        finally:
            for name, module in modules.items():
                if own[name] is None:
                    del module.forward  # the class's forward again
                else:
                    module.forward = own[name]
            torch.Tensor.backward = backward
            if own_step is None:
                del self.optimizer.step
            else:
                self.optimizer.step = own_step


def phase_table(trainer, model: torch.nn.Module, steps: int) -> str:
    """Milliseconds and dispatched operators per step, by part (see _Phases), as a table."""
    timed = _Phases(model, trainer.optimizer)
    with EventStorage(0), timed.recording(count_operators=False):
        start = time.perf_counter()
        for _ in range(steps):
            trainer.run_step()
        total = time.perf_counter() - start
    counted = _Phases(model, trainer.optimizer)
    with EventStorage(0), counted.recording(count_operators=True):
        trainer.run_step()  # operators are the same every step; counting slows the step down
    parts = sorted(timed.seconds, key=lambda name: -timed.seconds[name])
    rows = [f"{'part':<20} {'ms/step':>9} {'share':>6} {'operators':>10}"]
    for name in parts:
        ms = 1000 * timed.seconds[name] / steps
        share = 100 * timed.seconds[name] / total
        rows.append(f"{name:<20} {ms:>9.1f} {share:>5.1f}% {counted.operators.get(name, 0):>10}")
    rows.append(f"{'step':<20} {1000 * total / steps:>9.1f} {100.0:>5.1f}% "
                f"{sum(counted.operators.values()):>10}")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config_file, [*args.opts, "train.device=cpu"])
    cfg.dataloader.train.num_workers = 0
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    count = args.warmup + args.steps + args.profile_steps + (args.steps + 1 if args.phases else 0)
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
    if args.phases:
        print(f"\nwhere a step goes (mean of {args.steps} steps; operators of one step):")
        print(phase_table(trainer, model, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors(main))
