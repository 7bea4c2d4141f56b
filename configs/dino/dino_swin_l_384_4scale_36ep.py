"""DINO, Swin-L 384, 4 scales, 36 epochs (lr x0.1 at epoch 30, as detrex)."""

from ..common.schedule import lr_multiplier_36ep
from .dino_swin_l_384_4scale_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

lr_multiplier = lr_multiplier_36ep  # noqa: F811
train.max_iter = 270000
train.output_dir = "./output/dino_swin_l_384_4scale_36ep"
