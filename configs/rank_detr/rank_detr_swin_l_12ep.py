"""Rank-DETR, Swin-L (384), 12 epochs (paper: 57.3 AP, Table 2)."""

from .rank_detr_swin_t_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone.model_name = "swin_large_patch4_window12_384"
model.backbone.drop_path_rate = 0.3
model.neck.in_channels = [384, 768, 1536]
train.output_dir = "./output/rank_detr_swin_l_12ep"
