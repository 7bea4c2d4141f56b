"""Table 4 ablation, 4a row 4, 4c row 5 (-HMC): RCH=True, QRL=True, GCL=True, HMC=False."""

from ..rank_detr.rank_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = True
model.rank.qrl = True
model.rank.gcl = True
model.rank.hmc = False
train.output_dir = "./output/ablations/table4_rch_qrl_gcl"
