"""Table 4a/4b row 1: no rank component, i.e. the H-DETR R50 12-epoch baseline."""

from ..h_detr.h_detr_r50_12ep import (  # noqa: F401
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

train.output_dir = "./output/ablations/table4_none"
