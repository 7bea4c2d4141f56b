"""Rank-DETR, Swin-T, 12 epochs (paper: 52.7 AP, Table 2), the release's Swin-T recipe.

Backbone as the release's `rank_detr_swin_tiny_two_stage_12ep.py`: detectron2's SwinTransformer
(our SwinBackbone computes the same maps) with embed 96, depths (2, 2, 6, 2), heads
(3, 6, 12, 24), window 7 (pretrained at 224 px), drop path 0.2, stages 1-3 (strides 8/16/32, 192 /
384 / 768 channels) each with its output LayerNorm. The rest is the R50 recipe (lr 2e-4, backbone
x0.1). ImageNet weights: Microsoft's `swin_tiny_patch4_window7_224.pth`, as the release,
downloaded on first use; without internet pass a local copy:

    tools/train_net.py --config-file configs/rank_detr/rank_detr_swin_t_12ep.py \\
        train.init_checkpoint=/path/to/swin_tiny_patch4_window7_224.pth
"""

from detectron2.config import LazyCall as L

from rankdetr.modeling.swin import SWIN_T, SwinBackbone

from .rank_detr_r50_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

# Microsoft's ImageNet Swin weights (the files the release's Swin configs name).
SWIN_RELEASES = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"

model.backbone = L(SwinBackbone)(**SWIN_T, window_size=7, drop_path_rate=0.2, out_indices=(1, 2, 3))
model.neck.in_channels = [192, 384, 768]
train.init_checkpoint = f"{SWIN_RELEASES}/swin_tiny_patch4_window7_224.pth"
train.output_dir = "./output/rank_detr_swin_t_12ep"
