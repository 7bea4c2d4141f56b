"""Table 4 ablation, 4a row 2, 4b row 2: RCH=True, QRL=False, GCL=False, HMC=False."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = True
model.rank.qrl = False
model.rank.gcl = False
model.rank.hmc = False
train.output_dir = "./output/ablations/table4_rch"
