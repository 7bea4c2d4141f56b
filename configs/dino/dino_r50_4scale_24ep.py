"""DINO, ResNet-50, 4 scales, 24 epochs (lr x0.1 at epoch 20, as detrex)."""

from ..common.schedule import lr_multiplier_24ep
from .dino_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

lr_multiplier = lr_multiplier_24ep  # noqa: F811
train.max_iter = 180000  # 24 epochs x 7,500
train.output_dir = "./output/dino_r50_4scale_24ep"
