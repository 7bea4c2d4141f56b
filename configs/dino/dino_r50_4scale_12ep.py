"""DINO, ResNet-50, 4 scales, 12 epochs on COCO (paper Table 3: 49.0 AP; detrex's model zoo:
49.2), detrex's `dino_r50_4scale_12ep.py` recipe: AdamW lr 1e-4 with the backbone at 0.1x,
weight decay 1e-4, clip 0.1, batch 16, lr x0.1 at epoch 11.

    tools/train_net.py --config-file configs/dino/dino_r50_4scale_12ep.py --num-gpus 8

(The Rank-DETR release's copy of detrex has a `projects/dino/train_net.py` that builds AdamW by
hand at 2e-4; detrex's own DINO trains with its config's 1e-4, which the paper's "same setup as
the original papers" points to.)
"""

from ..common.data.coco_detr import dataloader  # noqa: F401
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier_12ep as lr_multiplier  # noqa: F401
from ..common.train import train
from ..models.dino_r50 import model  # noqa: F401

optimizer.lr = 1e-4
optimizer.params.lr_multipliers = {"backbone": 0.1}
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.max_iter = 90000  # 12 epochs x 7,500 iterations (configs/common/schedule.py)
train.output_dir = "./output/dino_r50_4scale_12ep"
