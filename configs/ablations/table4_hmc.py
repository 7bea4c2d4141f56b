"""Table 4 ablation, 4b row 5: RCH=False, QRL=False, GCL=False, HMC=True."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = False
model.rank.qrl = False
model.rank.gcl = False
model.rank.hmc = True
train.output_dir = "./output/ablations/table4_hmc"
