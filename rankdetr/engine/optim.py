"""Optimiser parameter groups with per-name learning-rate multipliers."""

from __future__ import annotations

import torch

__all__ = ["param_groups_with_lr_multipliers"]


def param_groups_with_lr_multipliers(
    model: torch.nn.Module, base_lr: float, lr_multipliers: dict[str, float] | None = None
) -> list[dict]:
    """One group per distinct multiplier: a parameter whose name contains a key gets that key's
    multiplier (the first match, in the dict's order); frozen parameters are left out.

    Example: {"backbone": 0.1, "sampling_offsets": 0.1} gives the backbone and the deformable
    attention's offset predictors a tenth of the base learning rate (the Rank-DETR recipe). Each
    group's "lr" is base_lr * multiplier; LR schedules then scale every group alike.
    """
    lr_multipliers = dict(lr_multipliers or {})
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        multiplier = next((m for key, m in lr_multipliers.items() if key in name), 1.0)
        groups.setdefault(multiplier, []).append(param)
    return [{"params": params, "lr": base_lr * m} for m, params in groups.items()]


def step_lr_schedule(
    max_iter: int, drop_fraction: float = 11 / 12, factor: float = 0.1, warmup_iters: int = 0
):
    """LR multiplier: 1 until `drop_fraction` of training, then `factor` (fvcore scheduler).

    Given as a fraction, the drop follows `train.max_iter` when a run is shortened or lengthened
    (12 epochs: drop at 11/12; 36 epochs: at 30/36).
    """
    from detectron2.solver import WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    if max_iter < 2:  # a one-iteration run (a smoke test) has no room for a drop
        return MultiStepParamScheduler(values=[1.0], milestones=[], num_updates=max(max_iter, 1))
    drop = max(1, min(max_iter - 1, round(max_iter * drop_fraction)))
    steps = MultiStepParamScheduler(values=[1.0, factor], milestones=[drop], num_updates=max_iter)
    if not warmup_iters:
        return steps
    return WarmupParamScheduler(steps, warmup_factor=0.001, warmup_length=warmup_iters / max_iter)
