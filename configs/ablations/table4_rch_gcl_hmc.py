"""Table 4 ablation, 4c row 3 (-QRL): RCH=True, QRL=False, GCL=True, HMC=True."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = True
model.rank.qrl = False
model.rank.gcl = True
model.rank.hmc = True
train.output_dir = "./output/ablations/table4_rch_gcl_hmc"
