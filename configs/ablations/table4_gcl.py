"""Table 4 ablation, 4b row 4: RCH=False, QRL=False, GCL=True, HMC=False."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = False
model.rank.qrl = False
model.rank.gcl = True
model.rank.hmc = False
train.output_dir = "./output/ablations/table4_gcl"
