"""Rank-DETR, Swin-L, 12 epochs (paper: 57.3 AP, Table 2), the release's Swin-L recipe.

As the release's `rank_detr_swin_large_two_stage_12ep.py`: embed 192, depths (2, 2, 18, 2), heads
(6, 12, 24, 48), window 7 (the ImageNet-22k model at 224 px, not the 384-px / window-12 one), drop
path 0.2, stages 1-3 (384 / 768 / 1536 channels). ImageNet weights: Microsoft's
`swin_large_patch4_window7_224_22k.pth` (downloaded on first use; without internet pass a local
copy as `train.init_checkpoint`).
"""

from rankdetr.modeling.swin import SWIN_L

from .rank_detr_swin_t_12ep import (  # noqa: F401
    SWIN_RELEASES,
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.embed_dim = SWIN_L["embed_dim"]
model.backbone.depths = SWIN_L["depths"]
model.backbone.num_heads = SWIN_L["num_heads"]
model.neck.in_channels = [384, 768, 1536]
train.init_checkpoint = f"{SWIN_RELEASES}/swin_large_patch4_window7_224_22k.pth"
train.output_dir = "./output/rank_detr_swin_l_12ep"
