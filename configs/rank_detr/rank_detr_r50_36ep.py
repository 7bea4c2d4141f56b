"""Rank-DETR, ResNet-50, 36 epochs (paper: 51.2 AP, Table 2)."""

from ..common.schedule import lr_multiplier_36ep
from .rank_detr_r50_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

lr_multiplier = lr_multiplier_36ep  # noqa: F811
train.max_iter = 270000  # 36 epochs x 7,500
train.output_dir = "./output/rank_detr_r50_36ep"
