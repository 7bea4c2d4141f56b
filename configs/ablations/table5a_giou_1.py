"""Table 5a: GCL target t = ((GIoU + 1) / 2)^1 (Rank-DETR R50 12 epochs otherwise)."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.gcl_target = "giou"
model.rank.gcl_power = 1.0
train.output_dir = "./output/ablations/table5a_giou_1"
