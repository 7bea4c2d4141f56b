"""H-DETR baseline: Rank-DETR swin_t 36 epochs with all four rank components off (Table 2)."""

from ..rank_detr.rank_detr_swin_t_36ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.rank.rch = False
model.rank.qrl = False
model.rank.gcl = False
model.rank.hmc = False
train.output_dir = "./output/h_detr_swin_t_36ep"
