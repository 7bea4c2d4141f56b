"""The full Rank-DETR model tree (H-DETR base, R50, two-stage, 300 + 1500 queries).

Every variant imports this and changes a few fields. num_classes=None takes the number of
classes from the training data.
"""

from detectron2.config import LazyCall as L

from rankdetr.modeling.backbone import ResNetBackbone
from rankdetr.modeling.neck import ChannelMapper
from rankdetr.modeling.rank_detr import RankDETR
from rankdetr.modeling.rank_options import RankOptions

model = L(RankDETR)(
    backbone=L(ResNetBackbone)(depth=50, out_features=("res3", "res4", "res5"), freeze_at=1),
    neck=L(ChannelMapper)(
        in_channels=[512, 1024, 2048], out_channels=256, num_extra_levels=1, norm_groups=32
    ),
    num_classes=None,
    # The four rank-oriented components (Table 4) and their parameters (Table 5), in one node.
    rank=L(RankOptions)(
        rch=True,
        qrl=True,
        gcl=True,
        hmc=True,
        hmc_start=0.75,  # fraction of training; the release: 67,500 of 90,000 iterations
        hmc_power=4.0,
        hmc_quality="iou",
        gcl_target="giou",
        gcl_power=1.0,
        varifocal=False,
    ),
    num_queries=300,
    num_queries_one2many=1500,
    one2many_repeats=6,
    embed_dim=256,
    num_heads=8,
    num_points=4,
    ffn_dim=2048,
    dropout=0.0,
    encoder_layers=6,
    decoder_layers=6,
    look_forward_twice=True,
    # True recomputes encoder / decoder activations in backward: less memory, same gradients.
    activation_checkpointing=False,
    loss_weights={"class": 2.0, "bbox": 5.0, "giou": 2.0},
    weight_one2many=1.0,
    num_detections=300,
)
