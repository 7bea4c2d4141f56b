"""Table 4 ablation, 4c row 4 (-GCL): RCH=True, QRL=True, GCL=False, HMC=True."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = True
model.rank.qrl = True
model.rank.gcl = False
model.rank.hmc = True
train.output_dir = "./output/ablations/table4_rch_qrl_hmc"
