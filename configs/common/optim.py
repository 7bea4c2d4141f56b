"""AdamW, lr 1e-4, weight decay 1e-4; backbone and sampling offsets at 0.1x the lr."""

import torch
from detectron2.config import LazyCall as L

from rankdetr.engine.optim import param_groups_with_lr_multipliers

optimizer = L(torch.optim.AdamW)(
    params=L(param_groups_with_lr_multipliers)(
        model=None,  # filled in by the trainer
        base_lr="${..lr}",
        lr_multipliers={"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1},
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
