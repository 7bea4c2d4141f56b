"""Rank-DETR on DINO: configs/dino/dino_r50_4scale_36ep.py with all four rank components on.

RCH and QRL act on the matching queries only (the denoising queries are tied to their targets and
keep their slots); GCL also scores the denoising positives by their localisation quality; HMC
from 75 % of training.
"""

from ..dino.dino_r50_4scale_36ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = True
model.rank.qrl = True
model.rank.gcl = True
model.rank.hmc = True
train.output_dir = "./output/rank_dino_r50_4scale_36ep"
