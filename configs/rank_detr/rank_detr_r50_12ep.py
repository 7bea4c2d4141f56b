"""Rank-DETR, ResNet-50, 12 epochs on COCO: the full config every variant builds on.

    tools/train_net.py --config-file configs/rank_detr/rank_detr_r50_12ep.py --num-gpus 8

Starts from detectron2's ImageNet R-50 (torchvision's weights), as detrex does: downloaded on first
use into detectron2's cache; without internet pass a local copy with
`train.init_checkpoint=/path/to/R-50.pkl`. Paper: 50.2 AP (Table 1).
"""

from ..common.data.coco_detr import dataloader  # noqa: F401
from ..common.optim import optimizer  # noqa: F401
from ..common.schedule import lr_multiplier_12ep as lr_multiplier  # noqa: F401
from ..common.train import train
from ..models.rank_detr_r50 import model  # noqa: F401

train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.max_iter = 90000  # 12 epochs x 7,500 iterations (configs/common/schedule.py)
train.output_dir = "./output/rank_detr_r50_12ep"
