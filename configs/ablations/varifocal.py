"""Sec. 4.3: varifocal loss (Eq. 7, t = IoU) instead of GCL, without HMC (vs Table 4a row 4)."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.gcl = False
model.rank.varifocal = True
model.rank.gcl_target = "iou"
model.rank.hmc = False
train.output_dir = "./output/ablations/varifocal"
