"""DINO, ResNet-50, 4 scales, 36 epochs (lr x0.1 at epoch 30, as detrex)."""

from ..common.schedule import lr_multiplier_36ep
from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

lr_multiplier = lr_multiplier_36ep  # noqa: F811
train.max_iter = 270000  # 36 epochs x 7,500
train.output_dir = "./output/dino_r50_4scale_36ep"
