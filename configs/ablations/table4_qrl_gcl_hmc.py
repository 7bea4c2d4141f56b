"""Table 4 ablation, 4c row 2 (-RCH): RCH=False, QRL=True, GCL=True, HMC=True."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = False
model.rank.qrl = True
model.rank.gcl = True
model.rank.hmc = True
train.output_dir = "./output/ablations/table4_qrl_gcl_hmc"
