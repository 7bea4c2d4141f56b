"""Rank-DETR on DINO on the bundled shapes dataset: configs/demo/dino_r18_shapes.py with the four
rank components on.

    tools/train_net.py --config-file configs/demo/rank_dino_r18_shapes.py
"""

from .dino_r18_shapes import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.rank.rch = True
model.rank.qrl = True
model.rank.gcl = True
model.rank.hmc = True
train.output_dir = "./output/demo_rank_dino"
