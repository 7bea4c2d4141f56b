"""The full DINO model tree (R50, 4 scales, 900 queries, contrastive denoising), detrex's
`projects/dino/configs/models/dino_r50.py` in our modules.

Every DINO and Rank-DINO config imports this and changes a few fields; `model.rank` is the same
node as Rank-DETR's (all four components off here: DINO itself). num_classes=None takes the
number of classes from the training data.
"""

from detectron2.config import LazyCall as L

from rankdetr.modeling.backbone import ResNetBackbone
from rankdetr.modeling.dino import DINO
from rankdetr.modeling.neck import ChannelMapper
from rankdetr.modeling.rank_options import RankOptions

model = L(DINO)(
    backbone=L(ResNetBackbone)(depth=50, out_features=("res3", "res4", "res5"), freeze_at=1),
    neck=L(ChannelMapper)(
        in_channels=[512, 1024, 2048], out_channels=256, num_extra_levels=1, norm_groups=32
    ),
    num_classes=None,
    # The four rank-oriented components, as in configs/models/rank_detr_r50.py.
    rank=L(RankOptions)(
        rch=False,
        qrl=False,
        gcl=False,
        hmc=False,
        hmc_start=0.75,
        hmc_power=4.0,
        hmc_quality="iou",
        gcl_target="giou",
        gcl_power=1.0,
        varifocal=False,
    ),
    num_queries=900,
    embed_dim=256,
    num_heads=8,
    num_points=4,
    ffn_dim=2048,
    dropout=0.0,
    encoder_layers=6,
    decoder_layers=6,
    look_forward_twice=True,
    activation_checkpointing=False,
    # Contrastive denoising: about 2 x dn_number noised copies of the targets per batch.
    dn_number=100,
    label_noise_ratio=0.5,
    box_noise_scale=1.0,
    loss_weights={"class": 1.0, "bbox": 5.0, "giou": 2.0},
    matching_costs={"class": 2.0, "bbox": 5.0, "giou": 2.0},
    num_detections=300,
)
