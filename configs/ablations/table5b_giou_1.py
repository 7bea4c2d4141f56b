"""Table 5b: matching cost p[c] * ((GIoU + 1) / 2)^1 (Rank-DETR R50 12 epochs otherwise)."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.hmc_quality = "giou"
model.rank.hmc_power = 1.0
train.output_dir = "./output/ablations/table5b_giou_1"
