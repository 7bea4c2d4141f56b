"""DINO, Swin-L (ImageNet-22k, 384 px, window 12), 4 scales, 12 epochs (paper Table 3: 56.8 AP),
detrex's `dino_swin_large_384_4scale_12ep.py`: stages 1-3 (384 / 768 / 1536 channels), drop path
0.2. ImageNet weights: Microsoft's `swin_large_patch4_window12_384_22kto1k.pth` (the file detrex's
config names), downloaded on first use; without internet pass a local copy as
`train.init_checkpoint`.
"""

from detectron2.config import LazyCall as L

from rankdetr.modeling.swin import SWIN_L, SwinBackbone

from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

SWIN_RELEASES = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0"

model.backbone = L(SwinBackbone)(
    **SWIN_L, window_size=12, drop_path_rate=0.2, out_indices=(1, 2, 3)
)
model.neck.in_channels = [384, 768, 1536]
train.init_checkpoint = f"{SWIN_RELEASES}/swin_large_patch4_window12_384_22kto1k.pth"
train.output_dir = "./output/dino_swin_l_384_4scale_12ep"
