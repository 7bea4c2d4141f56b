"""Rank-DETR, Swin-T, 12 epochs (paper: 52.7 AP, Table 2). ImageNet weights: a local timm or
Microsoft checkpoint, loaded with rankdetr.checkpoint.backbone_weights (no download)."""

from detectron2.config import LazyCall as L

from rankdetr.modeling.backbone import TimmBackbone

from .rank_detr_r50_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.backbone = L(TimmBackbone)(
    model_name="swin_tiny_patch4_window7_224", out_indices=(1, 2, 3), drop_path_rate=0.2
)
model.neck.in_channels = [192, 384, 768]
train.output_dir = "./output/rank_detr_swin_t_12ep"
