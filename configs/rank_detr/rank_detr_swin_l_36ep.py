"""Rank-DETR, Swin-L (window 7, 224 px 22k weights), 36 epochs (paper: 58.2 AP, Table 2)."""

from ..common.schedule import lr_multiplier_36ep
from .rank_detr_swin_l_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

lr_multiplier = lr_multiplier_36ep  # noqa: F811
train.max_iter = 270000
train.output_dir = "./output/rank_detr_swin_l_36ep"
