"""Table 4 ablation, 4a row 3: RCH=True, QRL=True, GCL=False, HMC=False."""

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
model.rank.hmc = False
train.output_dir = "./output/ablations/table4_rch_qrl"
